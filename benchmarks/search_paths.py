"""Stage 4's search paths over a bundle's exact index, side by side, in one process:

    python -m benchmarks.search_paths --bundle runs/demo/bundles

- `idmap` (served): the bundle's `IndexIDMap2` over `IndexFlatIP`, as loaded;
- `bare`: the inner `IndexFlatIP` and the id map applied in numpy (the id map's own cost);
- `blas` / `scan`: the served index with faiss's BLAS threshold at 1 (every batch one sgemm
  and a heap per query) or past any batch (one scan per query). faiss (1.15) switches to BLAS
  when the queries' floats (n x D) reach `distance_compute_blas_threshold`, a process-wide
  knob; the service sets it from `faiss_blas_vectors` x D.

Batch sizes are query vectors a search (a micro-batch of B aggregate users is B vectors; per
interest, B K), k = 200 (n = 100, twice wide), one thread (the service's setting), interleaved
rounds so that machine noise hits all alike. Medians of the rounds' medians, [min, max] across
rounds. Writes benchmarks/results/search-paths.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from index_builder import bundle as bundle_mod

BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128)
NEVER = 1 << 30        # a BLAS threshold no batch reaches


def per_call_us(fn, reps: int) -> float:
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-ms", type=float, default=150.0, help="time per (variant, batch, round)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    b = bundle_mod.load(a.bundle, deep=False)
    served = b.read_index()
    if not isinstance(served, faiss.IndexIDMap):
        raise SystemExit(f"{b.version}: the index is {type(served).__name__}, not an IndexIDMap "
                         "over an exact index")
    inner = faiss.downcast_index(served.index)
    id_map = faiss.vector_to_array(served.id_map)
    M, D = inner.ntotal, inner.d
    faiss.omp_set_num_threads(1)
    default = faiss.cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)
    xb = inner.reconstruct_n(0, M)                                     # [M, D]

    def bare(q):
        s, lab = inner.search(q, a.k)
        return s, np.where(lab >= 0, id_map[lab], -1)

    def with_threshold(t):
        def run(q):
            faiss.cvar.distance_compute_blas_threshold = t
            try:
                return served.search(q, a.k)
            finally:
                faiss.cvar.distance_compute_blas_threshold = default
        return run

    variants = {"idmap": lambda q: served.search(q, a.k), "bare": bare, "blas": with_threshold(1),
                "scan": with_threshold(NEVER)}
    times: dict[str, dict[int, list[float]]] = {v: {B: [] for B in BATCHES} for v in variants}
    for B in BATCHES:     # queries like the encoder's: item vectors mixed, so scores are realistic
        q = (xb[rng.integers(0, M, (B, 4))].mean(1)).astype(np.float32)
        want_s, want = served.search(q, a.k)
        for name, f in variants.items():   # every path the same answer, up to float rounding
            s, ids = f(q)
            np.testing.assert_allclose(s, want_s, atol=1e-4, err_msg=name)
            same = np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids, want)])
            assert same > 0.99, (name, B, same)
    for r in range(a.rounds):
        for B in BATCHES:
            q = (xb[rng.integers(0, M, (B, 4))].mean(1)).astype(np.float32)
            once = per_call_us(lambda: served.search(q, a.k), 3)
            reps = max(5, int(a.budget_ms * 1e3 / max(once, 1.0)))
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for v in order:
                times[v][B].append(per_call_us(lambda: variants[v](q), reps))
    rows = {v: {B: {"median_us": float(np.median(t)), "min_us": float(np.min(t)),
                    "max_us": float(np.max(t))} for B, t in by.items()} for v, by in times.items()}
    wins = [B for B in BATCHES if np.median(times["blas"][B]) < np.median(times["scan"][B])]
    crossover = next((B for B in BATCHES if all(c in wins for c in BATCHES if c >= B)), None)
    payload = {"when": now(), "commit": git_commit(), "machine": machine(), "bundle": b.version,
               "items": M, "D": D, "k": a.k, "rounds": a.rounds, "default_blas_threshold": default,
               "times": rows, "blas_wins_from": crossover}
    cmd = f"python -m benchmarks.search_paths --bundle {a.bundle}"
    md = ["# Stage 4's search paths over the exact index", "",
          f"{payload['when']}; commit `{payload['commit'][:10]}`; {payload['machine']['cpu']}, "
          f"one thread; bundle `{b.version}` ({M:,} items, D = {D}), k = {a.k}; `{cmd}`", "",
          f"Microseconds a search call, medians of {a.rounds} interleaved rounds [min, max]. "
          "`idmap`: the served IndexIDMap2 over IndexFlatIP; `bare`: IndexFlatIP and the id map "
          "in numpy; `blas` / `scan`: the served index with faiss's BLAS threshold at 1 / past "
          f"every batch (this faiss's default threshold: {default:,} floats of queries, "
          f"{default // D:,} vectors of {D}).", "",
          "| query vectors | " + " | ".join(variants) + " | blas / scan |",
          "|---|" + "---|" * (len(variants) + 1)]
    for B in BATCHES:
        cells = [f"{rows[v][B]['median_us']:,.0f} [{rows[v][B]['min_us']:,.0f}, "
                 f"{rows[v][B]['max_us']:,.0f}]" for v in variants]
        ratio = rows["blas"][B]["median_us"] / rows["scan"][B]["median_us"]
        md.append(f"| {B} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    md += ["", f"BLAS is faster from {crossover} query vectors on (every larger batch too)."
           if crossover else "BLAS is not faster at any batch measured."]
    write_results(a.out, "search-paths", payload, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
