"""The chart's `values.schema.json` and its README's values table, both generated from
`values.yaml` (its defaults and the comment above each key) and, for `settings`, from the
service's own `Settings` (types, bounds, choices and descriptions).

    python -m devtools.chart_values          # check: exit 1 when either file is out of step
    python -m devtools.chart_values --write  # regenerate both

Helm checks the values against the schema on `install`, `upgrade`, `template` and `lint`, so a
mistyped or unknown value fails before anything reaches the cluster.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from model_export.configs import NEW_ITEM_INITS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "sine-retrieval"
VALUES, SCHEMA, README = CHART / "values.yaml", CHART / "values.schema.json", CHART / "README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"

# maps whose keys are the user's (labels, annotations, Kubernetes objects passed through)
FREE = {"podAnnotations", "podLabels", "nodeSelector", "affinity", "resources",
        "podSecurityContext", "securityContext", "serviceMonitor.labels", "gpu.nodeSelector",
        "service.annotations", "ingress.annotations", "serviceAccount.annotations",
        "prometheusRule.labels", "grafanaDashboard.labels", "grafanaDashboard.annotations",
        "bundle.download.resources", "redis.internal.resources", "refresh.resources",
        "probes.startup", "probes.readiness", "probes.liveness"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
NON_NEGATIVE = {"type": "number", "minimum": 0}
# what the defaults cannot tell: choices, bounds and formats
RULES: dict[str, dict[str, Any]] = {
    "replicaCount": {"type": "integer", "minimum": 0},
    "containerPort": PORT, "service.port": PORT,
    "service.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "bundle.source": {"enum": ["pvc", "download"]},
    "bundle.download.timeoutSeconds": {"type": "integer", "minimum": 1},
    "gpu.count": {"type": "integer", "minimum": 1},
    "refresh.trainMinutes": NON_NEGATIVE, "refresh.windowHours": NON_NEGATIVE,
    "refresh.tolerance": NON_NEGATIVE,
    "refresh.newItemInit": {"enum": list(NEW_ITEM_INITS)},
    "refresh.newItemOversample": {"type": "integer", "minimum": 1},
    "refresh.activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "refresh.backoffLimit": {"type": "integer", "minimum": 0},
    "tracing.sampler": {"enum": ["always_on", "always_off", "traceidratio",
                                 "parentbased_always_on", "parentbased_always_off",
                                 "parentbased_traceidratio"]},
    "tracing.samplerArg": {"type": "string", "pattern": r"^(0(\.\d+)?|1(\.0+)?)$"},
    "autoscaling.minReplicas": {"type": "integer", "minimum": 1},
    "autoscaling.maxReplicas": {"type": "integer", "minimum": 1},
    "autoscaling.targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1,
                                                   "maximum": 100},
    "preStopSleepSeconds": {"type": "integer", "minimum": 0},
    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
    "prometheusRule.bundleMaxAgeHours": NON_NEGATIVE,
    "prometheusRule.refreshMaxAgeHours": NON_NEGATIVE,
    "prometheusRule.p99Seconds": NON_NEGATIVE,
    "prometheusRule.errorRatio": {"type": "number", "minimum": 0, "maximum": 1},
    "prometheusRule.fallbackRatio": {"type": "number", "minimum": 0, "maximum": 1},
    "prometheusRule.clickLogLagEntries": {"type": "integer", "minimum": 0},
    "ingress.hosts": {"type": "array", "items": {
        "type": "object", "required": ["host", "paths"], "additionalProperties": False,
        "properties": {"host": {"type": "string"}, "paths": {"type": "array", "items": {
            "type": "object", "required": ["path", "pathType"], "additionalProperties": False,
            "properties": {"path": {"type": "string", "pattern": "^/"},
                           "pathType": {"enum": ["Exact", "Prefix",
                                                 "ImplementationSpecific"]}}}}}}},
}
for _img in ("image", "gpu.image", "refresh.image"):
    RULES[f"{_img}.digest"] = {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"}


def _type_of(default: Any) -> dict[str, Any]:
    if isinstance(default, bool):
        return {"type": "boolean"}
    if isinstance(default, int):
        return {"type": "integer"}
    if isinstance(default, float):
        return {"type": "number"}
    if isinstance(default, str):
        return {"type": "string"}
    if isinstance(default, list):
        return {"type": "array"}
    return {}


def _settings_schema() -> dict[str, Any]:
    from service.settings import Settings

    props = {}
    for name, prop in Settings.model_json_schema()["properties"].items():
        props[name] = {k: v for k, v in prop.items() if k not in ("title", "default")}
    return props


def _node(path: str, default: Any, settings: dict[str, Any]) -> dict[str, Any]:
    if path in RULES:
        return dict(RULES[path])
    if path == "settings":
        props = {k: settings[k] for k in default}
        return {"type": "object", "additionalProperties": False, "properties": props}
    if isinstance(default, dict):
        if path in FREE:
            return {"type": "object"}
        return {"type": "object", "additionalProperties": False,
                "properties": {k: _node(f"{path}.{k}" if path else k, v, settings)
                               for k, v in default.items()}}
    return _type_of(default)


def schema() -> dict[str, Any]:
    """The JSON schema (draft 7) of the chart's values."""
    values = yaml.safe_load(VALUES.read_text())
    top = _node("", values, _settings_schema())
    return {"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "sine-retrieval chart values", **top}


def comments() -> dict[str, str]:
    """{dotted key: the comment lines right above it in values.yaml}."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in VALUES.read_text().splitlines():
        text = line.strip()
        if not text:
            pending = []
            continue
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):(\s|$)", line)
        if not m:                       # a list item or a continued value
            pending = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group(2)])
        stack.append((indent, m.group(2)))
        if pending:
            out[path] = " ".join(pending)
        pending = []
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    """The README's values table: one row per leaf value (each setting, one row)."""
    values = yaml.safe_load(VALUES.read_text())
    notes = comments()
    settings = _settings_schema()
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(path: str, v: Any) -> None:
        if isinstance(v, dict) and v and path not in FREE:
            for k, sub in v.items():
                walk(f"{path}.{k}" if path else k, sub)
            return
        note = notes.get(path, "")
        if path.startswith("settings."):
            key = path.split(".", 1)[1]
            note = (note + " " if note else "") + settings[key].get("description", "")
        shown = json.dumps(v, separators=(", ", ": "))
        rows.append(f"| `{path}` | `{_cell(shown)}` | {_cell(note)} |")
    walk("", values)
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.chart_values",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="regenerate the two files")
    a = ap.parse_args(argv)
    want_schema = json.dumps(schema(), indent=1) + "\n"
    readme = README.read_text()
    want_readme = readme_with_table(readme)
    if a.write:
        SCHEMA.write_text(want_schema)
        README.write_text(want_readme)
        return 0
    stale = [p.name for p, want in ((SCHEMA, want_schema), (README, want_readme))
             if not p.exists() or p.read_text() != want]
    if stale:
        print(f"out of step with values.yaml: {', '.join(stale)}; run python -m "
              f"devtools.chart_values --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
