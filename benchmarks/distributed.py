"""`sine train` under torchrun against one process: the same data and seed give the same
metrics (beside the run-to-run spread of another seed), and the time per epoch on this machine.

    python -m benchmarks.distributed --dataset ml-100k --epochs 3

Runs, one after another: one process (all cores) with seeds 0 and 1, and 2 gloo ranks (one
thread each) with seed 0. Every run trains exactly `--epochs` epochs (no early stop) and is
evaluated on the test split, history excluded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import git_commit, machine, now, write_results


def run(out: Path, dataset: str, epochs: int, seed: int, ranks: int, threads: int,
        data_dir: str | None) -> dict:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable])
    args = ["train", "--dataset", dataset, "--epochs", str(epochs), "--patience", str(epochs + 1),
            "--seed", str(seed), "--threads", str(threads), "--no-progress", "--out", str(out)]
    if data_dir:
        args += ["--data-dir", data_dir]
    t = time.perf_counter()
    p = subprocess.run([*launcher, "-m", "sine_cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{args} failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"]
    return {"command": (f"torchrun --nproc_per_node {ranks} " if ranks > 1 else "") +
            "sine " + " ".join(args[:-2]), "wall_s": wall, "ranks": ranks, "seed": seed,
            "threads": threads, "test": m["metrics"]["test"]["SINE"],
            "epoch_train_s": [h["train_seconds"] for h in hist],
            "samples_per_s": [h["samples_per_s"] for h in hist],
            "loss": [h["loss"] for h in hist]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sine-ddp-"))
    cores = os.cpu_count() or 1
    rows = {
        "1 process, seed 0": run(work / "p1s0", a.dataset, a.epochs, 0, 1, cores, a.data_dir),
        "1 process, seed 1": run(work / "p1s1", a.dataset, a.epochs, 1, 1, cores, a.data_dir),
        "2 ranks, seed 0": run(work / "p2s0", a.dataset, a.epochs, 0, 2, max(1, cores // 2),
                               a.data_dir),
    }
    for k, r in rows.items():
        print(k, r["test"], r["samples_per_s"], flush=True)
    keys = ("HR@10", "NDCG@10", "HR@50", "HR@100")
    cmd = "python -m benchmarks.distributed " + " ".join(sys.argv[1:])
    md = ["# Distributed training (torchrun, gloo) against one process", "",
          f"{now()}; commit {git_commit()}; {machine()['cpu']}, {cores} cores; `{cmd}`", "",
          f"{a.dataset}, {a.epochs} epochs each, no early stop; test split, history excluded "
          "(percent). Each rank takes its slice of the same global batch of 128.", "",
          "| run | " + " | ".join(keys) + " | s per epoch (train) | samples/s | final loss |",
          "|---|" + "---|" * (len(keys) + 3)]
    for k, r in rows.items():
        md.append(f"| {k} | " + " | ".join(f"{100 * r['test'][m]:.2f}" for m in keys) +
                  f" | {sum(r['epoch_train_s']) / len(r['epoch_train_s']):.1f} | "
                  f"{sum(r['samples_per_s']) / len(r['samples_per_s']):,.0f} | "
                  f"{r['loss'][-1]:.4f} |")
    base, other, ddp = rows["1 process, seed 0"], rows["1 process, seed 1"], rows["2 ranks, seed 0"]
    md += ["", "| difference (points) | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
           "| 2 ranks - 1 process, same seed | " + " | ".join(
               f"{100 * (ddp['test'][m] - base['test'][m]):+.2f}" for m in keys) + " |",
           "| seed 1 - seed 0, one process | " + " | ".join(
               f"{100 * (other['test'][m] - base['test'][m]):+.2f}" for m in keys) + " |"]
    write_results(a.out, "distributed", {"when": now(), "commit": git_commit(),
                                         "machine": machine(), "command": cmd, "runs": rows}, md)


if __name__ == "__main__":
    main()
