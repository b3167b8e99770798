"""Several uvicorn workers per pod: throughput at 1 and 2 workers, memory per worker and in
total, and what a memory-mapped faiss index saves when processes share it.

    python -m benchmarks.workers --bundle runs/demo/bundles --rounds 3 --seconds 10

1. The service: `sine serve` with SINE_WORKERS=1 and =2 on the same Redis (every ML-1M user's
   20 newest clicks), both up at once and measured in turns (wrk, one thread, 32 connections,
   `n` = 100), so that machine noise hits both alike. Memory is each process's RSS and PSS
   (its share of pages that processes share) from /proc/<pid>/smaps_rollup, the supervisor
   included.
2. The index alone: `--index-items` random vectors (D = 128) in an SQ8 index written to a file,
   opened by `--procs` processes with and without `IO_FLAG_MMAP_IFC`, each then scanning it
   (a search touches every code); their summed PSS is what the pod would hold.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.serving import med, write_lua, wrk
from devtools.local import Stack
from index_builder import bundle as bundle_mod
from model_export import data


def smaps(pid: int) -> dict[str, float]:
    """RSS, PSS and private memory of one process, MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean"):
                out[k] = int(rest.split()[0]) / 1024
    return {"rss_mb": out["Rss"], "pss_mb": out["Pss"],
            "private_mb": out["Private_Clean"] + out["Private_Dirty"],
            "shared_clean_mb": out["Shared_Clean"]}


def family(pid: int) -> list[int]:
    """The process and its children (a supervisor and its workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, kids)]


def role(pid: int, workers: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "worker" if workers == 1 or "multiprocessing" in cmd else "supervisor"


INDEX_PROC = """
import sys, time, numpy as np, faiss
path, mmap = sys.argv[1], sys.argv[2] == "1"
flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
index = faiss.read_index(path, flags)
q = np.random.default_rng(0).standard_normal((16, index.d)).astype("float32")
index.search(q, 100)
print("ready", flush=True)
sys.stdin.readline()
"""


def index_sharing(items: int, procs: int, tmp: Path) -> dict:
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((items, 128)).astype("float32")
    index = faiss.index_factory(128, "SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(x[:100_000])
    index.add(x)
    path = tmp / "sq8.faiss"
    faiss.write_index(index, str(path))
    del index, x
    out = {"items": items, "file_mb": path.stat().st_size / 2**20, "procs": procs}
    for mmap in (False, True):
        ps = [subprocess.Popen([sys.executable, "-c", INDEX_PROC, str(path), str(int(mmap))],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(procs)]
        try:
            for p in ps:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            mem = [smaps(p.pid) for p in ps]
        finally:
            for p in ps:
                p.communicate("\n", timeout=30)
        out["mmap" if mmap else "read"] = {
            "per_proc": mem, "pss_total_mb": sum(m["pss_mb"] for m in mem),
            "rss_total_mb": sum(m["rss_mb"] for m in mem)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--data-dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--index-items", type=int, default=2_000_000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    b = bundle_mod.load(a.bundle, deep=False)
    ds = data.load("ml-1m", a.data_dir)
    tmp = Path(tempfile.mkdtemp())
    lua = write_lua(ds.user_ids, tmp)
    counts = (1, 2)
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    memory: dict[int, list[dict]] = {}
    with Stack(data.histories(ds, holdout=1)) as stack:
        servers = {w: stack.serve(b.path, log_path=tmp / f"w{w}.log", workers=w,
                                  watch_interval_s=0, max_in_flight=1024, redis_timeout_ms=1000,
                                  metrics_dir=str(tmp / f"metrics-{w}"))
                   for w in counts}
        for w in counts:
            wrk(servers[w].url + "/recommend", lua, a.connections, 3)      # warm-up
        for r in range(a.rounds):
            for w in (counts if r % 2 == 0 else counts[::-1]):
                runs[w].append(wrk(servers[w].url + "/recommend", lua, a.connections, a.seconds))
                print(f"round {r + 1} workers={w}: {runs[w][-1]['rps']:.0f} req/s", flush=True)
        for w in counts:
            pids = family(servers[w].proc.pid)  # type: ignore[union-attr]
            memory[w] = [{"pid": pid, "role": role(pid, w), **smaps(pid)} for pid in pids]
    time.sleep(0.5)
    sharing = index_sharing(a.index_items, a.procs, tmp)
    ratios = [r2["rps"] / r1["rps"] for r1, r2 in zip(runs[1], runs[2])]
    cmd = "python -m benchmarks.workers " + " ".join(sys.argv[1:])
    md = ["# Workers per pod: throughput, memory, a shared index", "",
          f"{now()}; commit {git_commit()}; {machine()['cpu']}, {machine()['cpus']} cores; `{cmd}`",
          "", f"wrk (one thread) and redis-server share the machine with the server; "
          f"{a.connections} connections, n = 100, ML-1M bundle `{b.version}` "
          f"({b.manifest['index']['factory']}, {b.manifest['items']['count']:,} items); "
          f"{a.rounds} rounds of {a.seconds} s, the two servers in turns.", "",
          "| workers | req/s median [min, max] | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for w in counts:
        rps = med(runs[w], "rps")
        md.append(f"| {w} | {rps[0]:.0f} [{rps[1]:.0f}, {rps[2]:.0f}] | "
                  f"{med(runs[w], 'p50_ms')[0]:.2f} | {med(runs[w], 'p99_ms')[0]:.2f} | "
                  f"{sum(x['errors'] for x in runs[w])} |")
    md += ["", f"2 workers / 1 worker, per round: {', '.join(f'{x:.2f}' for x in ratios)} "
           f"(median {statistics.median(ratios):.2f}).", "",
           "| workers | process | RSS MiB | PSS MiB | private MiB |", "|---|---|---|---|---|"]
    for w in counts:
        for m in memory[w]:
            md.append(f"| {w} | {m['role']} {m['pid']} | {m['rss_mb']:.1f} | {m['pss_mb']:.1f} | "
                      f"{m['private_mb']:.1f} |")
        md.append(f"| {w} | **total** | {sum(m['rss_mb'] for m in memory[w]):.1f} | "
                  f"**{sum(m['pss_mb'] for m in memory[w]):.1f}** | "
                  f"{sum(m['private_mb'] for m in memory[w]):.1f} |")
    s = sharing
    md += ["", f"The index alone: {s['items']:,} items, SQ8, D = 128, a {s['file_mb']:.0f} MiB "
           f"file, opened by {s['procs']} processes that each scan it once:", "",
           "| open | RSS MiB per process | PSS MiB, all processes |", "|---|---|---|"]
    for k in ("read", "mmap"):
        per = ", ".join(f"{m['rss_mb']:.0f}" for m in s[k]["per_proc"])
        how = "faiss.read_index" if k == "read" else "IO_FLAG_MMAP_IFC, read-only"
        md.append(f"| {how} | {per} | {s[k]['pss_total_mb']:.0f} |")
    write_results(a.out, "workers", {"when": now(), "commit": git_commit(), "machine": machine(),
                                     "command": cmd, "runs": runs, "ratios": ratios,
                                     "memory": memory, "index_sharing": sharing}, md)


if __name__ == "__main__":
    main()
