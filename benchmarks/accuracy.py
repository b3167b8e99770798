"""Accuracy benchmark: SINE and its ablations under the paper's protocol.

    python -m benchmarks.accuracy --dataset ml-1m --variants sine --max-minutes 30

Each variant trains with early stopping on validation NDCG@10, is evaluated on test (full
ranking, history excluded) and leaves `<runs-dir>/<dataset>/<variant>/result.json`. The merge step
(run after every variant, or alone with `--merge-only`) collects every variant's result into
`benchmarks/results/accuracy-<dataset>.json` and `.md`: metrics in percent as the paper's Table 1,
seconds, epochs, the exact command, the git commit and the machine of each row.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks.common import git_commit, machine, now
from model_export import data

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "popularity": {},
    "sine": {},
    "k1": {"K": 1},
    "lam0": {"lam": 0.0},
    "mean": {"aggregation": "mean"},
    "literal": {"literal": True},
    "sampled": {"loss": "sampled"},
}
LABELS = {
    "popularity": "Popularity (training counts)",
    "sine": "SINE (this project, default)",
    "k1": "SINE, K = 1 (single interest)",
    "lam0": "SINE, lambda = 0 (no Eq. 10)",
    "mean": "SINE, mean of interests (no Eq. 6-8)",
    "literal": "SINE, Eq. 3/7 literal LN dot products",
    "sampled": "SINE, sampled softmax (1280 log-uniform negatives)",
}
PAPER = {"ml-1m": {"HR@10": 16.34, "NDCG@10": 7.06, "HR@50": 45.79, "NDCG@50": 13.50}}
AIM = {"ml-1m": {"HR@10": 21.5, "NDCG@10": 11.0, "HR@50": 49.0, "NDCG@50": 17.0}}


def run_variant(name: str, ds, args, command: str) -> dict:
    from model_export.data import split
    from model_export.evaluate import evaluate_popularity
    from model_export.train import TrainConfig, train
    from model_export.workflow import evaluate_checkpoint, model_config

    out = Path(args.runs_dir) / ds.name / (f"{name}-{args.tag}" if args.tag else name)
    t0 = time.perf_counter()
    if name == "popularity":
        sp = split(ds)
        res = {"test": evaluate_popularity(ds, sp, "test"), "valid": evaluate_popularity(ds, sp, "valid"),
               "epochs": 0, "best_epoch": 0, "seconds": time.perf_counter() - t0}
    else:
        over = dict(VARIANTS[name])
        lam = over.pop("lam", args.lam)
        loss = over.pop("loss", args.loss)
        mcfg = model_config(ds, **over)
        tcfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, lam=lam, loss=loss,
                           max_epochs=args.epochs, patience=args.patience,
                           max_minutes=args.max_minutes, seed=args.seed, threads=args.threads,
                           device=args.device)
        tr = train(ds, mcfg, tcfg, out, progress=not args.no_progress)
        ev = evaluate_checkpoint(out / "best.pt", ds, out, with_popularity=False)
        res = {"test": ev["metrics"]["test"]["SINE"], "valid": ev["metrics"]["valid"]["SINE"],
               "test_keep_history": keep_history_metrics(out / "best.pt", ds),
               "epochs": tr.epochs_run, "best_epoch": tr.best_epoch, "seconds": tr.seconds,
               "stopped_because": tr.stopped_because, "model_args": ev["model_args"],
               "train_args": ev["train_args"], "loss_kind": ev["loss_kind"],
               "history": tr.history, "concepts": {k: v for k, v in ev["concepts"].items()
                                                   if k != "case_study"}}
    res.update({"variant": name, "label": LABELS[name], "command": command,
                "git_commit": git_commit(), "machine": machine(args.device),
                "finished": now()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def keep_history_metrics(ck_path: Path, ds) -> dict:
    """Test metrics without excluding the user's past items (RecBole's and the authors' protocol)."""
    from model_export.data import split
    from model_export.evaluate import evaluate_model
    from model_export.train import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ck_path, ds))
    return evaluate_model(model, ds, split(ds, model.config.n), "test", exclude_history=False)


def reevaluate(dataset: str, ds, runs_dir: Path) -> None:
    """Add the keep-history metrics to finished runs whose checkpoint is still there."""
    for p in sorted((runs_dir / dataset).glob("*/result.json")):
        r = json.loads(p.read_text())
        if "test_keep_history" not in r and (p.parent / "best.pt").exists():
            r["test_keep_history"] = keep_history_metrics(p.parent / "best.pt", ds)
            p.write_text(json.dumps(r, indent=1))


def pct(m: dict) -> dict:
    return {k: round(100 * v, 2) for k, v in m.items()}


def merge(dataset: str, runs_dir: Path, results_dir: Path) -> Path:
    # every run folder of the data set: `<variant>` or `<variant>-<tag>` (e.g. a GPU run)
    found = []
    for p in sorted((runs_dir / dataset).glob("*/result.json")):
        r = json.loads(p.read_text())
        r["test_percent"] = pct(r.pop("test"))
        r["valid_percent"] = pct(r.pop("valid"))
        if "test_keep_history" in r:
            r["test_keep_history_percent"] = pct(r.pop("test_keep_history"))
        found.append((list(VARIANTS).index(r["variant"]), "gpu" in r["machine"], p.parent.name, r))
    rows = {key: r for _, _, key, r in sorted(found, key=lambda t: t[:3])}
    out = {"dataset": dataset, "protocol": "leave-one-out; full ranking over all items; items the "
           "user interacted with before the target excluded; metrics in percent",
           "paper_sine_row": PAPER.get(dataset), "aim": AIM.get(dataset), "rows": rows}
    results_dir.mkdir(parents=True, exist_ok=True)
    jpath = results_dir / f"accuracy-{dataset}.json"
    jpath.write_text(json.dumps(out, indent=1))
    cols = ["HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@100", "NDCG@100"]
    md = [f"# Accuracy on {dataset}", "",
          "Test split, " + out["protocol"] + ". Written by `benchmarks/accuracy.py`. Each row "
          "trained with early stopping on validation NDCG@10 inside the wall-clock budget in "
          "`seconds`, on the machine named; compare ablations only between rows of one machine "
          "and budget (the GPU rows trained side by side, one process each, on one GPU).", "",
          "| model | " + " | ".join(cols) + " | epochs (best) | seconds | machine |",
          "|---" * (len(cols) + 4) + "|"]
    if dataset in PAPER:
        md.append("| paper, Table 1 SINE row | " + " | ".join(
            f"{PAPER[dataset].get(c, '-')}" for c in cols) + " | | | |")
        md.append("| aim (above single-vector SASRec) | " + " | ".join(
            f"{AIM[dataset].get(c, '-')}" for c in cols) + " | | | |")
    for r in rows.values():
        m = r["test_percent"]
        mach = r["machine"].get("gpu") or f"{r['machine'].get('cpus')} CPU cores"
        md.append(f"| {r['label']} | " + " | ".join(f"{m[c]:.2f}" for c in cols)
                  + f" | {r['epochs']} ({r['best_epoch']}) | {r['seconds']:.0f} | {mach} |")
    kept = {k: r for k, r in rows.items() if "test_keep_history_percent" in r}
    if kept:
        md += ["", "The same checkpoints **without** excluding the user's past items (the protocol "
               "of the authors' code and of RecBole's full-sort evaluation):", "",
               "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in kept.values():
            m = r["test_keep_history_percent"]
            md.append(f"| {r['label']} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + " |")
    md += ["", "Commands, commits and machines of each row:", ""]
    for name, r in rows.items():
        md.append(f"- {name}: `{r['command']}` at `{r['git_commit'][:10]}` on "
                  f"{r['machine'].get('gpu') or r['machine'].get('cpu', '?')}, {r['finished']}"
                  + (f", stopped by {r['stopped_because']}" if r.get("stopped_because") else ""))
        if "concepts" in r and "nmi" in r["concepts"]:
            md[-1] += f"; NMI vs {r['concepts']['label_kind']} {r['concepts']['nmi']:.3f}"
    (results_dir / f"accuracy-{dataset}.md").write_text("\n".join(md) + "\n")
    return jpath


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir", default=os.environ.get("SINE_DATA_DIR"))
    p.add_argument("--variants", default="popularity,sine,k1,lam0,mean",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--loss", default="auto")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="wall-clock budget per variant (default 30)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", help="run folder <variant>-<tag>, so runs on another machine sit beside")
    p.add_argument("--merge-only", action="store_true")
    p.add_argument("--reevaluate", action="store_true",
                   help="add keep-history test metrics to finished runs that still have best.pt")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    command = "python -m benchmarks.accuracy " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    ds = None
    if not args.merge_only:
        ds = data.load(args.dataset, args.data_dir, seed=args.seed)
        for name in args.variants.split(","):
            if name not in VARIANTS:
                p.error(f"unknown variant {name!r}")
            r = run_variant(name, ds, args, command)
            print(f"{name}: test {pct(r['test'])} in {r['seconds']:.0f} s", flush=True)
            merge(ds.name, Path(args.runs_dir), Path(args.results_dir))
    if args.reevaluate:
        ds = ds or data.load(args.dataset, args.data_dir, seed=args.seed)
        reevaluate(ds.name, ds, Path(args.runs_dir))
    name = ds.name if ds else args.dataset
    path = merge(name, Path(args.runs_dir), Path(args.results_dir))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
