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

# peak RSS from VmHWM: the high-water mark of this process's own memory (ru_maxrss would carry
# the parent's, which a child inherits across fork and exec)
HWM = """
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
"""

LOAD = HWM + """
import json, sys, time
from model_export import data
t = time.perf_counter()
ds = data.load_click_log(sys.argv[1], stream=sys.argv[2] == "stream")
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "users": ds.n_users, "items": ds.n_items,
                  "interactions": ds.n_interactions,
                  "peak_rss_mb": hwm_mb()}))
"""

# the same process with the loader's modules imported and nothing read
BASELINE = HWM + """
import pyarrow.csv, pyarrow.dataset, pyarrow.parquet
from model_export import data
print(hwm_mb())
"""

# `sine train` in this process, then its own peak RSS (not the largest of all children so far)
TRAIN = HWM + """
import runpy, sys
sys.argv = ["sine", *sys.argv[1:]]
try:
    runpy.run_module("sine_cli", run_name="__main__")
finally:
    print("PEAK_RSS_MB", hwm_mb(), file=sys.stderr)
"""


def run_child(cmd: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` (it reports its own peak memory); its output and wall seconds."""
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out, dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interactions", type=int, default=50_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--length", default="100,900", help="clicks per user, min,max")
    p.add_argument("--train-minutes", type=float, default=3.0)
    p.add_argument("--work", help="where the logs go (default a temporary folder)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--reuse", action="store_true", help="keep logs already in --work")
    p.add_argument("--row-compare", type=int, default=5_000_000,
                   help="interactions of the CSV read both ways, streamed and row by row")
    p.add_argument("--train-from", help="a big-log.json whose training run to keep instead of "
                   "training again")
    a = p.parse_args()
    from model_export import data

    work = Path(a.work or tempfile.mkdtemp(prefix="sine-big-"))
    work.mkdir(parents=True, exist_ok=True)
    lo, hi = map(int, a.length.split(","))
    files, gen = {}, {}
    for suffix in ("parquet", "csv"):
        path = work / f"clicks-{a.interactions}.{suffix}"
        if path.exists() and a.reuse:
            files[suffix] = path
            gen[suffix] = {"reused": str(path)}
            continue
        t = time.perf_counter()
        rows = data.write_synthetic_log(path, a.interactions, n_items=a.items, length=(lo, hi))
        gen[suffix] = {"rows": rows, "seconds": time.perf_counter() - t}
        files[suffix] = path
        print(f"wrote {rows:,} rows to {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{gen[suffix]['seconds']:.0f} s", flush=True)
    out, _ = run_child([sys.executable, "-c", BASELINE], 600)
    baseline_mb = float(out.stdout.split()[-1])
    loads = {}
    for suffix, path in files.items():
        out, wall = run_child([sys.executable, "-c", LOAD, str(path), "stream"], 3600)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(file_mb=path.stat().st_size / 2**20, wall_s=wall,
                 rows_per_s=r["interactions"] / r["seconds"])
        loads[suffix] = r
        print(f"load {suffix}: {r}", flush=True)
    # the same loader row by row (Python objects per row) beside the streamed one, on a log
    # small enough for it
    small = work / f"clicks-{a.row_compare}.csv"
    if not (small.exists() and a.reuse):
        data.write_synthetic_log(small, a.row_compare, n_items=a.items, length=(lo, hi))
    compare = {}
    for how in ("stream", "rows"):
        out, _ = run_child([sys.executable, "-c", LOAD, str(small), how], 3600)
        compare[how] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{how}: {compare[how]}", flush=True)
    if a.train_from:
        training = json.loads(Path(a.train_from).read_text())["train"]
        training.setdefault("peak_from", "ru_maxrss")
        wall, peak = training["wall_s"], training["peak_rss_mb"]
    else:
        training, wall, peak = run_training(work, files["parquet"], a.train_minutes)
    cmd_line = "python -m benchmarks.big_log " + " ".join(sys.argv[1:])
    md = ["# Click logs bigger than memory", "",
          f"{now()}; commit {git_commit()}; {machine()['cpu']}, {machine()['cpus']} cores, "
          f"24 GiB; `{cmd_line}`", "",
          f"`data.write_synthetic_log`: {loads['parquet']['interactions']:,} interactions, "
          f"{a.items:,} items, {lo}-{hi} clicks per user, ids as strings. Each load runs in a "
          "fresh process (`data.load_click_log`: record batches -> dense codes -> sequences), "
          "peak RSS from its VmHWM; the same process with the modules imported and nothing read "
          f"peaks at {baseline_mb:.0f} MiB.", "",
          "| file | size MiB | users | items | load s | rows/s | peak RSS MiB | above the "
          "imports, bytes per interaction |", "|---|---|---|---|---|---|---|---|"]
    for suffix, r in loads.items():
        md.append(f"| {suffix} | {r['file_mb']:.0f} | {r['users']:,} | {r['items']:,} | "
                  f"{r['seconds']:.1f} | {r['rows_per_s'] / 1e6:.2f} M | {r['peak_rss_mb']:.0f} | "
                  f"{(r['peak_rss_mb'] - baseline_mb) * 2**20 / r['interactions']:.0f} |")
    per = {h: (c["peak_rss_mb"] - baseline_mb) * 2**20 / c["interactions"]
           for h, c in compare.items()}
    md += ["", f"The same loader on a {a.row_compare:,}-interaction CSV, streamed and row by row "
           "(`load_click_log(stream=False)`, Python objects per row), each in a fresh process:", "",
           "| read | load s | peak RSS MiB | bytes per interaction above the imports |",
           "|---|---|---|---|"]
    for h, c in compare.items():
        md.append(f"| {h} | {c['seconds']:.1f} | {c['peak_rss_mb']:.0f} | {per[h]:.0f} |")
    md += ["", f"Streamed / row by row: {compare['stream']['seconds'] / compare['rows']['seconds']:.2f}x "
           f"the time, {per['stream'] / per['rows']:.2f}x the memory per interaction."]
    md += ["", f"`{training['command']}`: {wall:.0f} s wall, peak RSS {peak:.0f} MiB "
           "(the whole process: the log, the split's windows, the model, evaluation)"
           + (f"; kept from an earlier run of this script on the same log, whose peak is "
              f"{training['peak_from']}" if a.train_from else "") + ".",
           "", "```", training["log_tail"].strip(), "```"]
    write_results(a.out, "big-log", {"when": now(), "commit": git_commit(),
                                     "machine": machine(), "command": cmd_line,
                                     "generate": gen, "baseline_rss_mb": baseline_mb,
                                     "load": loads, "streamed_vs_rows": compare,
                                     "train": training}, md)


def run_training(work: Path, log: Path, minutes: float) -> tuple[dict, float, float]:
    run = work / "train"
    args = ["train", "--dataset", str(log), "--out", str(run), "--max-minutes",
            str(minutes), "--no-progress", "--threads", "2"]
    out, wall = run_child([sys.executable, "-c", TRAIN, *args], 3 * 3600)
    peak = float(out.stderr.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    report = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() \
        else {}
    training = {"command": " ".join(["sine", *args]), "wall_s": wall, "peak_rss_mb": peak,
                "when": now(), "peak_from": "VmHWM",
                "log_tail": out.stdout[-1500:] + out.stderr[-1500:],
                "report": {k: report.get(k) for k in ("metrics", "epochs_run", "seconds")
                           if k in report}}
    print(f"train: {wall:.0f} s, peak RSS {peak:.0f} MiB", flush=True)
    return training, wall, peak


if __name__ == "__main__":
    main()
