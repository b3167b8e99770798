"""Encoder benchmark: the encoder graphs in onnxruntime beside torch eager, in one process.

    python -m benchmarks.encoder --checkpoint runs/demo/train/best.pt \
        --baseline-onnx runs/demo/bundles/<version>/encoder.onnx

From the checkpoint it exports the plain graph (SINE) and the folded one (FoldedSINE, per-item
tables of the item-side products), and times each beside torch eager on the same windows of
full 20-click histories: batch sizes 1, 8, 32 and 256, one thread (the service's setting) and
all threads, in interleaved rounds so that machine noise hits all alike. `--baseline-onnx` adds
an encoder exported by an older commit (the "before" of a change). Reports medians, the p10-p90
spread and the ratios, plus ONNX Runtime's own per-operator profile of each graph at B = 32:
where its time goes. Writes benchmarks/results/encoder.json and encoder.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit, machine, now, write_results

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = profile
    if profile:     # in a temporary folder: an interrupted run leaves nothing in the checkout
        import tempfile
        so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="sine-ort-")) / "profile")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_profile(path: Path, x: np.ndarray, runs: int = 100, top: int = 8) -> dict:
    """ONNX Runtime's per-node kernel times (microseconds per run), summed by operator type."""
    sess = session(path, 1, profile=True)
    for _ in range(runs):
        sess.run(None, {"item_ids": x})
    f = sess.end_profiling()
    by_op: collections.Counter[str] = collections.Counter()
    for e in json.loads(Path(f).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    Path(f).unlink()
    return {"total_us": sum(by_op.values()) / runs,
            "nodes": len(_graph_ops(path)),
            "top": [(op, us / runs) for op, us in by_op.most_common(top)]}


def _graph_ops(path: Path) -> list[str]:
    import onnx
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained best.pt (default: ML-1M-sized random weights)")
    p.add_argument("--baseline-onnx", type=Path, help="an encoder exported by an older commit")
    p.add_argument("--batch-sizes", default="1,8,32,256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from model_export.export import check_parity, export_onnx
    from model_export.models.sine import SINE, FoldedSINE, SINEConfig
    from model_export.training import load_checkpoint, model_from_checkpoint

    if a.checkpoint:
        model = model_from_checkpoint(load_checkpoint(a.checkpoint))
    else:
        torch.manual_seed(0)
        model = SINE(SINEConfig(n_items=3416)).eval()
    cfg = model.config
    tmp = Path(tempfile.mkdtemp())
    graphs = {"plain": export_onnx(model, tmp / "plain.onnx"),
              "folded": export_onnx(FoldedSINE(model), tmp / "folded.onnx")}
    if a.baseline_onnx:
        graphs = {"baseline": a.baseline_onnx, **graphs}
    parity = {g: check_parity(model, path) for g, path in graphs.items()}
    rng = np.random.default_rng(0)
    rows = []
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        sessions = {g: session(path, threads) for g, path in graphs.items()}
        for B in map(int, a.batch_sizes.split(",")):
            x = rng.integers(1, cfg.n_items + 1, size=(B, cfg.n)).astype(np.int64)
            xt = torch.from_numpy(x)
            reps = max(5, 2000 // B)
            runs = {f"ORT {g}": (lambda s=s: s.run(None, {"item_ids": x}))
                    for g, s in sessions.items()}

            def run_torch():
                with torch.inference_mode():
                    model(xt)
            runs["torch eager"] = run_torch
            times: dict[str, list[float]] = {k: [] for k in runs}
            for f in runs.values():
                timed(f, 5)                                   # warm-up
            for _ in range(a.rounds):                         # interleaved rounds
                for k, f in runs.items():
                    times[k] += timed(f, reps)
            row = {"threads": threads, "batch": B,
                   "ms_p50": {k: float(np.median(v)) for k, v in times.items()},
                   "ms_p10_p90": {k: [float(np.percentile(v, 10)), float(np.percentile(v, 90))]
                                  for k, v in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    x32 = rng.integers(1, cfg.n_items + 1, size=(32, cfg.n)).astype(np.int64)
    profiles = {g: op_profile(path, x32) for g, path in graphs.items()}
    table_mb = (cfg.n_items + 1) * FoldedSINE.table_bytes_per_item(cfg) / 2**20
    cmd = "python -m benchmarks.encoder " + " ".join(argv or sys.argv[1:])
    meta = {"command": cmd, "model": {k: getattr(cfg, k) for k in ("n_items", "D", "n", "K", "L")},
            "torch": torch.__version__, "onnxruntime": ort.__version__, "machine": machine(),
            "git_commit": git_commit(), "finished": now(), "parity": parity,
            "folded_table_bytes_per_item": FoldedSINE.table_bytes_per_item(cfg),
            "folded_table_mib": table_mb,
            "file_mib": {g: path.stat().st_size / 2**20 for g, path in graphs.items()}}
    names = list(rows[0]["ms_p50"])
    ref = "ORT baseline" if a.baseline_onnx else "ORT plain"
    md = ["# Encoder benchmark: the ONNX graphs in onnxruntime, and torch eager", "",
          f"`{cmd}` on {meta['machine']['cpu']} ({meta['machine']['cpus']} cores), torch "
          f"{meta['torch']}, onnxruntime {meta['onnxruntime']}, model {meta['model']}, commit "
          f"{meta['git_commit'][:10]}, {meta['finished']}. Milliseconds per call, median (p10-p90), "
          f"{a.rounds} interleaved rounds; the last columns are each runtime's speed-up over "
          f"{ref}.", "",
          "Graphs: " + ("`baseline` is the encoder of an older commit's bundle "
                        f"(`{a.baseline_onnx}`); " if a.baseline_onnx else "")
          + "`plain` computes Eq. 1-8 per request; `folded` gathers the item-side products from "
          f"per-item tables ({meta['folded_table_bytes_per_item']} bytes per item, "
          f"{table_mb:.1f} MiB here). Max |ORT - torch| per output: "
          + "; ".join(f"{g} {max(v.values()):.1e}" for g, v in parity.items()) + ".", "",
          "| threads | B | " + " | ".join(f"{k} ms" for k in names) + " | "
          + " | ".join(f"{k} speed-up" for k in names if k != ref) + " |",
          "|---|---|" + "---|" * (2 * len(names) - 1)]
    for r in rows:
        cells = [f"{r['ms_p50'][k]:.3f} ({r['ms_p10_p90'][k][0]:.3f}-{r['ms_p10_p90'][k][1]:.3f})"
                 for k in names]
        gains = [f"{r['ms_p50'][ref] / r['ms_p50'][k]:.2f}x" for k in names if k != ref]
        md.append(f"| {r['threads']} | {r['batch']} | " + " | ".join(cells + gains) + " |")
    md += ["", "ONNX Runtime's per-operator profile at B = 32, one thread (microseconds per run, "
           "kernels only):", "", "| graph | nodes | kernel total | top operators |",
           "|---|---|---|---|"]
    for g, pr in profiles.items():
        md.append(f"| {g} | {pr['nodes']} | {pr['total_us']:.0f} | "
                  + ", ".join(f"{op} {us:.0f}" for op, us in pr["top"]) + " |")
    write_results(a.out, "encoder", {"meta": meta, "rows": rows, "profiles": profiles}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
