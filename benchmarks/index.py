"""Index benchmark: faiss index types side by side with exact search, on real user vectors.

    python -m benchmarks.index --export runs/export-ml1m --sizes items,100000,1000000

Catalogs: the trained item table itself (`items`), and synthetic catalogs of N items drawn from a
diagonal Gaussian mixture fitted (k-means, 64 components) to the trained item vectors, so their
geometry resembles real embeddings. Queries: the export's user vectors from validation histories.
Per index: build seconds, serialized size, recall@100 against exact search, single-query latency
(p50/p99, one thread) and batch-256 throughput (all threads), beside `Flat` (exact) in the same
run. Search knobs are set as `sine build-index` sets them (index_builder.build.tune).
Writes benchmarks/results/index.json and index.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from index_builder.build import build, exact_topk, resident_mb, tune

ROOT = Path(__file__).resolve().parent.parent

K = 100


def mixture_catalog(items: np.ndarray, n: int, components: int = 64, seed: int = 0) -> np.ndarray:
    """n vectors from a diagonal Gaussian mixture fitted to `items` [M, d]."""
    d = items.shape[1]
    km = faiss.Kmeans(d, components, niter=25, seed=seed, verbose=False)
    km.train(items)
    _, assign = km.index.search(items, 1)
    assign = assign.ravel()
    rng = np.random.default_rng(seed)
    weights = np.bincount(assign, minlength=components) / len(items)
    std = np.stack([items[assign == c].std(0) if (assign == c).sum() > 1 else items.std(0)
                    for c in range(components)])
    comp = rng.choice(components, size=n, p=weights)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 1_000_000):                  # float64 noise a million rows at a time
        c = comp[i:i + 1_000_000]
        out[i:i + len(c)] = km.centroids[c] + std[c] * rng.normal(size=(len(c), d))
    return out


def latency_ms(index, xq: np.ndarray, n: int = 300) -> tuple[float, float]:
    faiss.omp_set_num_threads(1)
    times = []
    for i in range(n):
        q = xq[i % len(xq)][None]
        t = time.perf_counter()
        index.search(q, K)
        times.append((time.perf_counter() - t) * 1e3)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def batch_qps(index, xq: np.ndarray, reps: int = 3) -> float:
    q = xq[:256]
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        index.search(q, K)
        best.append(time.perf_counter() - t)
    return len(q) / float(np.median(best))


MAPPED = """
import resource, sys, numpy as np, faiss
from index_builder.bundle import set_search_params
index = faiss.read_index(sys.argv[1], faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
set_search_params(index, __import__("json").loads(sys.argv[3]))
faiss.omp_set_num_threads(1)
xq = np.load(sys.argv[2])
for q in xq:
    index.search(q[None], 100)
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
        print(int(line.split()[1]) / 1024)
"""


BASE_RSS = """
import numpy as np, faiss
from index_builder.bundle import set_search_params
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
        print(int(line.split()[1]) / 1024)
"""


def base_rss_mb() -> float:
    import subprocess
    out = subprocess.run([sys.executable, "-c", BASE_RSS], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


def mapped_rss_mb(index, xq: np.ndarray, params: dict, tmp: Path) -> float:
    """RSS of a fresh process that memory-maps the written index (as the service does) and
    answers 300 single queries: what the index keeps resident, the interpreter included."""
    import subprocess
    path, qpath = tmp / "index.faiss", tmp / "q.npy"
    faiss.write_index(index, str(path))
    np.save(qpath, xq[:300])
    out = subprocess.run([sys.executable, "-c", MAPPED, str(path), str(qpath),
                          json.dumps(params)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return float(out.stdout.split()[-1])


def bench_catalog(name: str, xb: np.ndarray, xq: np.ndarray, factories: list[str], floor: float,
                  log=print, tmp: Path | None = None) -> list[dict]:
    import tempfile
    tmp = tmp or Path(tempfile.mkdtemp(prefix="sine-index-"))
    ids = np.arange(1, len(xb) + 1, dtype=np.int64)
    gt = exact_topk(xb, ids, xq, K)
    big = len(xb) > 2_000_000                   # exact search costs ~0.5 s a query there
    rows = []
    for f in factories:
        lists = re.match(r"IVF(\d+)", f)
        if lists and int(lists.group(1)) * 39 > len(xb):
            continue                                      # too few points to train that many lists
        t = time.perf_counter()
        index = build(xb, ids, f)
        secs = time.perf_counter() - t
        params, rec, curve = tune(index, xq, gt, K, floor)
        tried = [[p, round(r, 4)] for p, r in curve]
        p50, p99 = latency_ms(index, xq, 60 if big and f == "Flat" else 300)
        faiss.write_index(index, str(tmp / "size.faiss"))
        row = {"catalog": name, "items": len(xb), "factory": f, "search_params": params,
               "recall@100": round(rec, 4), "build_s": round(secs, 2),
               "size_mib": round((tmp / "size.faiss").stat().st_size / 2 ** 20, 1),
               "resident_mib_est": round(resident_mb(f, len(xb), xb.shape[1]), 1),
               "mapped_rss_mib": round(mapped_rss_mb(index, xq, params, tmp), 1),
               "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
               "batch256_qps": round(batch_qps(index, xq, 1 if big else 3), 1),
               "knob_tried": tried}
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "knob_tried"}))
        del index
    exact = next(r for r in rows if r["factory"] == "Flat")
    for r in rows:
        r["speedup_p50_vs_exact"] = round(exact["p50_ms"] / r["p50_ms"], 1)
        r["speedup_p99_vs_exact"] = round(exact["p99_ms"] / r["p99_ms"], 1)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="folder written by `sine export`")
    p.add_argument("--sizes", default="items,100000,1000000")
    p.add_argument("--factories",
                   default="Flat;HNSW32,Flat;IVF1024,Flat;IVF4096,Flat;IVF1024,SQ8;IVF4096,SQ8;IVF4096,PQ32",
                   help="faiss factory strings separated by ';'")
    p.add_argument("--floor", type=float, default=0.95)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--stem", default="index", help="result file name (default index)")
    a = p.parse_args(argv)
    factories = a.factories.split(";")
    items = np.load(Path(a.export) / "items.npy")
    xq = np.load(Path(a.export) / "queries.npy")[: a.queries]
    results = []
    for s in a.sizes.split(","):
        xb = items if s == "items" else mixture_catalog(items, int(s))
        name = "trained item table" if s == "items" else f"mixture fitted to items, {int(s):,}"
        print(f"== {name}: {len(xb):,} items, {len(xq)} queries", flush=True)
        results += bench_catalog(name, xb, xq, factories, a.floor)
    meta = {"command": "python -m benchmarks.index " + " ".join(argv or sys.argv[1:]),
            "machine": machine(), "git_commit": git_commit(), "faiss": faiss.__version__, "k": K,
            "recall_floor": a.floor,
            "queries": f"{len(xq)} user vectors from validation histories (ML-1M model)",
            "finished": now(), "base_rss_mib": base_rss_mb()}
    md = ["# Index benchmark", "", f"`{meta['command']}` on {meta['machine']['cpu']} "
          f"({meta['machine']['cpus']} cores), faiss {meta['faiss']}, {meta['finished']}. "
          f"Queries: {meta['queries']}. Latency: one query, one thread, p50/p99 over 300 queries; "
          "throughput: one batch of 256 queries, all threads, median of 3. Knobs as `sine "
          f"build-index` sets them: one knob raised until recall@100 >= {a.floor}; several "
          "tuned by faiss's autotuning, the fastest point at that floor.", "",
          "Memory: the file's size; what `auto` counts as resident (codes and ids, not a "
          "refine stage's vectors); and the RSS of a fresh process that memory-maps the index "
          "as the service does and answers 300 single queries (the interpreter with numpy and "
          f"faiss imported: {meta['base_rss_mib']:.0f} MiB).", "",
          "| catalog | index | knob | recall@100 | build s | file MiB | resident MiB (est.) | "
          "RSS mapped MiB | p50 ms | p99 ms | x exact (p99) | batch-256 q/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        md.append(f"| {r['catalog']} | {r['factory']} | {r['search_params'] or '-'} | {r['recall@100']} "
                  f"| {r['build_s']} | {r['size_mib']} | {r['resident_mib_est']} | "
                  f"{r['mapped_rss_mib']} | {r['p50_ms']} | {r['p99_ms']} "
                  f"| {r['speedup_p99_vs_exact']} | {r['batch256_qps']} |")
    write_results(a.out, a.stem, {"meta": meta, "rows": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
