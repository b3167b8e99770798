"""Click logs bigger than memory: a 50M-interaction synthetic log as Parquet and as CSV, loaded
as record batches, then `sine train` on it for a short budget; peak RSS against file size and
the loading throughput.

    python -m benchmarks.big_log --interactions 50000000 --train-minutes 3

Each measurement runs in a fresh process, whose peak RSS (`ru_maxrss`) is what is reported:
nothing of the generator or of another run is counted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import git_commit, machine, now, write_results

LOAD = """
import json, resource, sys, time
from model_export import data
t = time.perf_counter()
ds = data.load_click_log(sys.argv[1])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "users": ds.n_users, "items": ds.n_items,
                  "interactions": ds.n_interactions,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# the same process with the loader's modules imported and nothing read
BASELINE = """
import resource
import pyarrow.csv, pyarrow.dataset, pyarrow.parquet
from model_export import data
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# `sine train` in this process, then its own peak RSS (not the largest of all children so far)
TRAIN = """
import resource, runpy, sys
sys.argv = ["sine", *sys.argv[1:]]
try:
    runpy.run_module("sine_cli", run_name="__main__")
finally:
    print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
"""


def child_peak(cmd: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `cmd`; its output and wall seconds."""
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out, dt, 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interactions", type=int, default=50_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--length", default="100,900", help="clicks per user, min,max")
    p.add_argument("--train-minutes", type=float, default=3.0)
    p.add_argument("--work", help="where the logs go (default a temporary folder)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    from model_export import data

    work = Path(a.work or tempfile.mkdtemp(prefix="sine-big-"))
    work.mkdir(parents=True, exist_ok=True)
    lo, hi = map(int, a.length.split(","))
    files, gen = {}, {}
    for suffix in ("parquet", "csv"):
        path = work / f"clicks-{a.interactions}.{suffix}"
        t = time.perf_counter()
        rows = data.write_synthetic_log(path, a.interactions, n_items=a.items, length=(lo, hi))
        gen[suffix] = {"rows": rows, "seconds": time.perf_counter() - t}
        files[suffix] = path
        print(f"wrote {rows:,} rows to {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{gen[suffix]['seconds']:.0f} s", flush=True)
    out, _, _ = child_peak([sys.executable, "-c", BASELINE], 600)
    baseline_mb = float(out.stdout.split()[-1])
    loads = {}
    for suffix, path in files.items():
        out, wall, _ = child_peak([sys.executable, "-c", LOAD, str(path)], 3600)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(file_mb=path.stat().st_size / 2**20, wall_s=wall,
                 rows_per_s=r["interactions"] / r["seconds"])
        loads[suffix] = r
        print(f"load {suffix}: {r}", flush=True)
    run = work / "train"
    args = ["train", "--dataset", str(files["parquet"]), "--out", str(run), "--max-minutes",
            str(a.train_minutes), "--no-progress", "--threads", "2"]
    out, wall, _ = child_peak([sys.executable, "-c", TRAIN, *args], 3 * 3600)
    peak = float(out.stderr.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    report = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() \
        else {}
    training = {"command": " ".join(["sine", *args]), "wall_s": wall, "peak_rss_mb": peak,
                "log_tail": out.stdout[-1500:] + out.stderr[-1500:],
                "report": {k: report.get(k) for k in ("metrics", "epochs_run", "seconds")
                           if k in report}}
    print(f"train: {wall:.0f} s, peak RSS {peak:.0f} MiB", flush=True)
    cmd_line = "python -m benchmarks.big_log " + " ".join(sys.argv[1:])
    md = ["# Click logs bigger than memory", "",
          f"{now()}; commit {git_commit()}; {machine()['cpu']}, {machine()['cpus']} cores, "
          f"24 GiB; `{cmd_line}`", "",
          f"`data.write_synthetic_log`: {gen['parquet']['rows']:,} interactions, {a.items:,} "
          f"items, {lo}-{hi} clicks per user, ids as strings. Each load runs in a fresh "
          "process (`data.load_click_log`: record batches -> dense codes -> sequences); "
          f"the same process with the modules imported and nothing read peaks at "
          f"{baseline_mb:.0f} MiB.", "",
          "| file | size MiB | users | items | load s | rows/s | peak RSS MiB | above the "
          "imports, bytes per interaction |", "|---|---|---|---|---|---|---|---|"]
    for suffix, r in loads.items():
        md.append(f"| {suffix} | {r['file_mb']:.0f} | {r['users']:,} | {r['items']:,} | "
                  f"{r['seconds']:.1f} | {r['rows_per_s'] / 1e6:.2f} M | {r['peak_rss_mb']:.0f} | "
                  f"{(r['peak_rss_mb'] - baseline_mb) * 2**20 / r['interactions']:.0f} |")
    md += ["", f"`{training['command']}`: {wall:.0f} s wall, peak RSS {peak:.0f} MiB "
           "(the whole process: the log, the split's windows, the model, evaluation).", "",
           "```", training["log_tail"].strip(), "```"]
    write_results(a.out, "big-log", {"when": now(), "commit": git_commit(),
                                     "machine": machine(), "command": cmd_line,
                                     "generate": gen, "baseline_rss_mb": baseline_mb,
                                     "load": loads, "train": training}, md)


if __name__ == "__main__":
    main()
