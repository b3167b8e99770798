"""Encoder benchmark: onnxruntime vs torch eager on the same SINE encoder, in one process.

    python -m benchmarks.encoder --checkpoint runs/bench/ml-1m/sine/best.pt

Batch sizes 1, 32 and 256 of full 20-click histories; both runtimes on one thread (the service's
per-request setting) and on all threads; runs interleaved in rounds so that machine noise hits
both alike. Reports medians, p10-p90 spread and the torch/ORT ratio per batch size. Writes
benchmarks/results/encoder.json and encoder.md.
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained best.pt (default: ML-1M-sized random weights)")
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from model_export.export import export_onnx
    from model_export.sine import SINE, SINEConfig
    from model_export.train import load_checkpoint, model_from_checkpoint

    if a.checkpoint:
        model = model_from_checkpoint(load_checkpoint(a.checkpoint))
    else:
        torch.manual_seed(0)
        model = SINE(SINEConfig(n_items=3416)).eval()
    cfg = model.config
    tmp = Path(tempfile.mkdtemp())
    export_onnx(model, tmp / "enc.onnx")
    rng = np.random.default_rng(0)
    rows = []
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp / "enc.onnx"), so, providers=["CPUExecutionProvider"])
        for B in map(int, a.batch_sizes.split(",")):
            x = rng.integers(1, cfg.n_items + 1, size=(B, cfg.n)).astype(np.int64)
            xt = torch.from_numpy(x)
            reps = max(5, 2000 // B)

            def run_ort():
                sess.run(None, {"item_ids": x})

            def run_torch():
                with torch.inference_mode():
                    model(xt)
            for f in (run_ort, run_torch):
                timed(f, 5)                                   # warm-up
            o, t = [], []
            for _ in range(a.rounds):                         # interleaved rounds
                o += timed(run_ort, reps)
                t += timed(run_torch, reps)
            row = {"threads": threads, "batch": B,
                   "ort_ms_p50": float(np.median(o)),
                   "ort_ms_p10_p90": [float(np.percentile(o, 10)), float(np.percentile(o, 90))],
                   "torch_ms_p50": float(np.median(t)),
                   "torch_ms_p10_p90": [float(np.percentile(t, 10)), float(np.percentile(t, 90))]}
            row["torch_over_ort"] = row["torch_ms_p50"] / row["ort_ms_p50"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"command": "python -m benchmarks.encoder " + " ".join(argv or sys.argv[1:]),
            "model": {k: getattr(cfg, k) for k in ("n_items", "D", "n", "K", "L")},
            "torch": torch.__version__, "onnxruntime": ort.__version__, "machine": machine(),
            "git_commit": git_commit(), "finished": now()}
    md = ["# Encoder benchmark: onnxruntime vs torch eager", "",
          f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['cpus']} cores), torch "
          f"{meta['torch']}, onnxruntime {meta['onnxruntime']}, model {meta['model']}, "
          f"{meta['finished']}. Milliseconds per call, median (p10-p90), {a.rounds} interleaved rounds.", "",
          "| threads | B | onnxruntime ms | torch eager ms | torch / ORT |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['threads']} | {r['batch']} | {r['ort_ms_p50']:.3f} ({r['ort_ms_p10_p90'][0]:.3f}-"
                  f"{r['ort_ms_p10_p90'][1]:.3f}) | {r['torch_ms_p50']:.3f} ({r['torch_ms_p10_p90'][0]:.3f}-"
                  f"{r['torch_ms_p10_p90'][1]:.3f}) | {r['torch_over_ort']:.2f}x |")
    write_results(a.out, "encoder", {"meta": meta, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
