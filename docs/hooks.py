"""MkDocs hooks: the pages and plots made from the code and the results when the site is built.

- `reference/*.md`: `devtools.reference` (settings, CLI help, metrics, OpenAPI, manifest, chart);
- `benchmarks/results/**`: the committed results pages and images, at their repository paths,
  so a page links to them as a reader of the repository would;
- `results/index.md`: every results page with the commit and date that last wrote it;
- `results/plots/*.png`: training curves, accuracy against training time, latency against
  connections, drawn from the results JSON;
- `index.md` (the README) and `ARCHITECTURE.md`, at the root, their `docs/...` links made
  site-relative.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# pages of the repository's own, at the site's root: {site path: repository path}
REPO_PAGES = {"index.md": "README.md", "ARCHITECTURE.md": "ARCHITECTURE.md"}
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devtools import reference  # noqa: E402


def _last_commit(path: Path) -> tuple[str, str]:
    """(short commit, ISO date) of the last commit that touched `path`; ('', '') outside git."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "", ""
    return (out[0], out[1]) if len(out) == 2 else ("", "")


def _title(md: Path) -> str:
    for line in md.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return md.stem


def results_index(pages: list[Path]) -> str:
    rows = ["| page | written | commit |", "|---|---|---|"]
    dated = []
    for p in pages:
        commit, day = _last_commit(p)
        dated.append((day, p, commit))
    for day, p, commit in sorted(dated, key=lambda t: (t[0], str(t[1])), reverse=True):
        rel = p.relative_to(ROOT).as_posix()
        rows.append(f"| [{_title(p).replace('|', '/')}](../{rel}) | {day or 'not committed'} "
                    f"| `{commit or '-'}` |")
    return ("# All results\n\nEvery committed results page, newest first. Each states the command "
            "that wrote it and the machine it ran on; the date and commit are git's record of "
            "the last change to the page.\n\n![Training curves](plots/training-curves.png)\n\n"
            "![Accuracy against training time](plots/accuracy-vs-time.png)\n\n"
            "![Latency against connections](plots/latency.png)\n\n" + "\n".join(rows) + "\n")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots() -> dict[str, bytes]:
    """The three plots, as PNG bytes; an empty plot that says why when its JSON is absent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    quality = json.loads((RESULTS / "quality.json").read_text())
    sets = [k for k, v in quality.items() if isinstance(v, dict) and "rows" in v]

    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        for r in quality[name]["rows"]:
            curve = r.get("valid_curve") or []
            ax.plot(range(1, len(curve) + 1), curve, marker=".", label=r["model"])
        ax.set(title=f"{name}: validation HR@50 by epoch", xlabel="epoch", ylabel="HR@50 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["training-curves.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        for r in quality[name]["rows"]:
            ax.scatter(r["seconds"] / 60, r["HR@50"], label=r["model"])
        ax.set(title=f"{name}: test HR@50 against training time", xlabel="minutes, 1 CPU thread",
               ylabel="HR@50 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["accuracy-vs-time.png"] = _png(fig)
    plt.close(fig)

    service = json.loads((RESULTS / "service.json").read_text())
    runs = service["results"]["batching"]["runs"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for endpoint in ("floor", "recommend"):
        conns = sorted({int(k.split("/")[0]) for k in runs if k.endswith("/" + endpoint)})
        for q, style in (("p50_ms", "-"), ("p99_ms", "--")):
            med = [sorted(x[q] for x in runs[f"{c}/{endpoint}"])[len(runs[f"{c}/{endpoint}"]) // 2]
                   for c in conns]
            ax.plot(conns, med, style, marker="o", label=f"/{endpoint} {q[:3]}")
    ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="ms (median of rounds)",
           title=f"Latency against connections ({service['machine']['cpus']} cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out["latency.png"] = _png(fig)
    plt.close(fig)
    return out


def on_files(files: Files, config: Any) -> Files:
    for name, page in reference.PAGES.items():
        files.append(File.generated(config, f"reference/{name}.md", content=page()))
    pages = sorted(RESULTS.rglob("*.md"))
    for p in [*pages, *sorted(RESULTS.rglob("*.png"))]:
        files.append(File.generated(config, p.relative_to(ROOT).as_posix(), abs_src_path=str(p)))
    files.append(File.generated(config, "results/index.md", content=results_index(pages)))
    for name, png in plots().items():
        files.append(File.generated(config, f"results/plots/{name}", content=png))
    for uri, path in REPO_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri in REPO_PAGES:
        return markdown.replace("](docs/", "](")
    return markdown
