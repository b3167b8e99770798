"""The documentation site's reference pages, each made from the code it describes when the site
is built (`docs/hooks.py`), so none of them can fall behind: settings, the `sine` command's
help, the metrics, the OpenAPI document, the manifest's fields and the chart's values.

`python -m devtools.reference NAME` prints one page (NAME from PAGES)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

# argparse wraps help to the terminal: fix the width so the page is the same everywhere
HELP_COLUMNS = "100"


def settings_page() -> str:
    from service.settings import env_table
    return ("# Settings\n\n"
            "Every option of the service is one field of `service.settings.Settings`, read from "
            "the environment variable named here (or given as a `sine serve` flag, or under the "
            "chart's `settings:`). An invalid value stops the service at start with a message "
            "that names the variable.\n\n" + env_table() + "\n")


def commands() -> dict[str, argparse.ArgumentParser]:
    """Each `sine` subcommand's parser, by name, in the order `sine --help` lists them."""
    from sine_cli.main import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **dict(subs.choices)}


def cli_page() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parts = ["# The `sine` command\n",
                 "Every command's `--help`, as the installed command prints it.\n"]
        for name, parser in commands().items():
            parts.append(f"## `sine{' ' + name if name else ''}`\n")
            parts.append("```text\n" + parser.format_help().rstrip() + "\n```\n")
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def metric_rows() -> list[dict[str, Any]]:
    """Every metric the app registers: name, type, help, labels and histogram buckets."""
    from prometheus_client import Counter, Gauge, Histogram

    from service.metrics import Metrics
    rows = []
    for m in vars(Metrics()).values():
        if not isinstance(m, Counter | Gauge | Histogram):
            continue
        kind = type(m).__name__.lower()
        name = m._name + ("_total" if kind == "counter" else "")
        buckets = [b for b in getattr(m, "_upper_bounds", []) if b != float("inf")]
        rows.append({"name": name, "type": kind, "help": m._documentation,
                     "labels": list(m._labelnames), "buckets": buckets})
    return rows


def metrics_page() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    buckets: dict[tuple[float, ...], list[str]] = {}
    for r in metric_rows():
        labels = ", ".join(f"`{x}`" for x in r["labels"]) or "none"
        rows.append(f"| `{r['name']}` | {r['type']} | {labels} | {_cell(r['help'])} |")
        if r["buckets"]:
            buckets.setdefault(tuple(r["buckets"]), []).append(r["name"])
    text = ["# Metrics\n",
            "What `GET /metrics` exposes (Prometheus text format), from `service.metrics`. The "
            "process and Python collectors of `prometheus_client` come beside these.\n",
            "\n".join(rows), "\n## Histogram buckets\n"]
    for b, names in buckets.items():
        text.append(f"- {', '.join(f'`{n}`' for n in names)}: "
                    f"{', '.join(f'{x:g}' for x in b)}")
    return "\n".join(text) + "\n"


def openapi_document() -> dict[str, Any]:
    from service.app import create_app
    from service.settings import Settings
    return create_app(Settings()).openapi()


def openapi_page() -> str:
    doc = openapi_document()
    rows = ["| method | path | summary | answers |", "|---|---|---|---|"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(f"| {method.upper()} | `{path}` | {_cell(op.get('summary', ''))} | "
                        f"{codes} |")
    return ("# OpenAPI\n\n"
            "The service's routes as its OpenAPI document states them; a running service serves "
            "the same document at `/openapi.json` and a browsable page at `/docs`.\n\n"
            + "\n".join(rows) + "\n\n## The document\n\n```json\n"
            + json.dumps(doc, indent=1, sort_keys=True) + "\n```\n")


def manifest_page() -> str:
    from index_builder.bundle import FILES, MANIFEST, MANIFEST_DOC, MANIFEST_FIELDS, OPTIONAL_FILES
    required = {".".join(p): getattr(t, "__name__", str(t)) for p, t in MANIFEST_FIELDS.items()}
    rows = ["| field | required | meaning |", "|---|---|---|"]
    for key, meaning in MANIFEST_DOC.items():
        need = f"yes ({required[key]})" if key in required else "no"
        rows.append(f"| `{key}` | {need} | {_cell(meaning)} |")
    files = "\n".join(f"- `{name}` ({key})" for key, name in {**FILES, **OPTIONAL_FILES}.items())
    return ("# The bundle manifest\n\n"
            f"Each bundle version is a folder whose `{MANIFEST}` describes it. The service and "
            "every tool load a bundle through `index_builder.bundle.load`, which refuses a "
            "manifest without a required field of the right type, a file whose hash differs, or "
            "dimensions that disagree.\n\nThe folder's files:\n\n" + files + "\n\n"
            + "\n".join(rows) + "\n")


def chart_values_page() -> str:
    from devtools.chart_values import table
    return ("# Chart values\n\n"
            "The Helm chart's `values.yaml`, one row per value; `settings:` holds every service "
            "setting under its field name.\n\n" + table() + "\n")


PAGES: dict[str, Callable[[], str]] = {
    "settings": settings_page, "cli": cli_page, "metrics": metrics_page,
    "openapi": openapi_page, "manifest": manifest_page, "chart-values": chart_values_page}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.reference",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("page", choices=list(PAGES))
    a = ap.parse_args(argv)
    sys.stdout.write(PAGES[a.page]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
