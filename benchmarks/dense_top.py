"""The dense search's top k and the quota merge, old and new ways side by side in one process:

    python -m benchmarks.dense_top --bundle runs/demo/bundles

- top k of each score row ([R, M + 1], k = n = 100): one argpartition over the whole row
  (`one-pass`), against the blocked selection of `stages._dense_top` at several block widths
  (`blocks-b`: the k best block maxima first, then the top k of those blocks' columns);
- the quota merge of K = 4 per-interest lists of k: what a row has seen kept in an id table
  (`seen-table`), against each list compared with the picks so far (`compare`).

R from 1 row (a lone aggregate request) to 32 (a micro-batch of 32 aggregate users) and 128
(32 users, K = 4 interests), by default (`--rows`). Scores
are the bundle's items under queries like the encoder's (item vectors mixed), with id 0 and 20
history items per row masked, as the service masks them. One thread; interleaved rounds;
medians of the rounds' medians, [min, max] across rounds. Writes
benchmarks/results/dense-top.{json,md}.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.search_paths import per_call_us
from index_builder import bundle as bundle_mod
from service import merge as merge_mod
from service import stages

WIDTHS = (2, 4, 8, 16)
K, H = 4, 20


def blocked(b: int):
    """`_dense_top` with blocks of b, at every row count (the service's TOP_BLOCK_ROWS aside)."""
    def run(flat: np.ndarray, k: int):
        saved = stages.TOP_BLOCK, stages.TOP_BLOCK_ROWS
        stages.TOP_BLOCK, stages.TOP_BLOCK_ROWS = b, 0
        try:
            return stages._dense_top(flat, k)
        finally:
            stages.TOP_BLOCK, stages.TOP_BLOCK_ROWS = saved
    return run


def quota_with(cells: int):
    def run(scores, ids, weights, exclude, n):
        saved, merge_mod.SEEN_CELLS = merge_mod.SEEN_CELLS, cells
        try:
            return merge_mod.quota(scores, ids, weights, exclude, n)
        finally:
            merge_mod.SEEN_CELLS = saved
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-ms", type=float, default=150.0, help="time per (variant, size, round)")
    p.add_argument("--rows", default="1,2,4,8,32,128", help="score rows a call, comma-separated")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    rows_at = tuple(int(x) for x in a.rows.split(","))
    b = bundle_mod.load(a.bundle, deep=False)
    index = b.read_index()
    import faiss
    faiss.omp_set_num_threads(1)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    xb = inner.reconstruct_n(0, inner.ntotal)                          # [M, D]
    table = np.vstack([np.zeros((1, xb.shape[1]), np.float32), xb])    # [M + 1, D], row 0 unused
    rng = np.random.default_rng(0)

    def scores(R: int) -> np.ndarray:
        q = xb[rng.integers(0, len(xb), (R, 4))].mean(1).astype(np.float32)   # [R, D]
        s = q @ table.T                                                 # [R, M + 1]
        s[:, 0] = -np.inf
        s[np.arange(R)[:, None], rng.integers(1, len(table), (R, H))] = -np.inf
        return s

    tops = {"one-pass": stages._top_of, **{f"blocks-{w}": blocked(w) for w in WIDTHS}}
    merges = {"seen-table": quota_with(merge_mod.SEEN_CELLS), "compare": quota_with(0)}
    times: dict[str, dict[int, list[float]]] = {v: {R: [] for R in rows_at} for v in [*tops, *merges]}
    for R in rows_at:                               # every way the same answer first
        s = scores(R)
        want = stages._top_of(s, a.n)
        for name, f in tops.items():
            got = f(s, a.n)
            np.testing.assert_array_equal(got[0], want[0], err_msg=name)
    for r in range(a.rounds):
        for R in rows_at:
            s = scores(R)
            order = list(tops) if r % 2 == 0 else list(tops)[::-1]
            reps = max(5, int(a.budget_ms * 1e3 / max(per_call_us(lambda: stages._top_of(s, a.n), 3), 1.0)))
            for v in order:
                times[v][R].append(per_call_us(lambda: tops[v](s, a.n), reps))
            users = R // K if R >= K else 1
            per = scores(users * K).reshape(users, K, -1)                # [users, K, M + 1]
            ts, ids = stages._top_of(per.reshape(users * K, -1), a.n)
            ts, ids = ts.reshape(users, K, a.n), ids.reshape(users, K, a.n)
            w = rng.dirichlet(np.ones(K), users).astype(np.float32)
            ex = rng.integers(1, len(table), (users, H))
            ref = merges["compare"](ts, ids, w, ex, a.n)
            got = merges["seen-table"](ts, ids, w, ex, a.n)
            np.testing.assert_array_equal(got.ids, ref.ids)
            for v in (merges if r % 2 == 0 else list(merges)[::-1]):
                times[v][R].append(per_call_us(lambda: merges[v](ts, ids, w, ex, a.n), reps))
    rows = {v: {R: {"median_us": float(np.median(t)), "min_us": float(np.min(t)),
                    "max_us": float(np.max(t))} for R, t in by.items()} for v, by in times.items()}
    payload = {"when": now(), "commit": git_commit(), "machine": machine(), "bundle": b.version,
               "items": int(len(xb)), "n": a.n, "K": K, "rounds": a.rounds, "times": rows,
               "served": {"TOP_BLOCK": stages.TOP_BLOCK, "TOP_BLOCK_ROWS": stages.TOP_BLOCK_ROWS,
                          "SEEN_CELLS": merge_mod.SEEN_CELLS}}
    cmd = f"python -m benchmarks.dense_top --bundle {a.bundle}"

    def cell(v: str, R: int) -> str:
        x = rows[v][R]
        return f"{x['median_us']:,.0f} [{x['min_us']:,.0f}, {x['max_us']:,.0f}]"

    md = ["# The dense search's top k, and the quota merge", "",
          f"{payload['when']}; commit `{payload['commit'][:10]}`; {payload['machine']['cpu']}, "
          f"one thread; bundle `{b.version}` ({len(xb):,} items), n = k = {a.n}; `{cmd}`", "",
          f"Microseconds a call, medians of {a.rounds} interleaved rounds [min, max]. The service "
          f"runs blocks of {stages.TOP_BLOCK} from {stages.TOP_BLOCK_ROWS} rows on (one pass "
          "below), and the seen table.", "",
          "Top k of R score rows of M + 1 columns:", "",
          "| rows | " + " | ".join(tops) + f" | one-pass / blocks-{stages.TOP_BLOCK} |",
          "|---|" + "---|" * (len(tops) + 1)]
    for R in rows_at:
        ratio = rows["one-pass"][R]["median_us"] / rows[f"blocks-{stages.TOP_BLOCK}"][R]["median_us"]
        md.append(f"| {R} | " + " | ".join(cell(v, R) for v in tops) + f" | {ratio:.2f}x |")
    md += ["", f"Quota merge of K = {K} lists of {a.n} (rows / K users):", "",
           "| rows | " + " | ".join(merges) + " | compare / seen-table |", "|---|---|---|---|"]
    for R in rows_at:
        ratio = rows["compare"][R]["median_us"] / rows["seen-table"][R]["median_us"]
        md.append(f"| {R} | " + " | ".join(cell(v, R) for v in merges) + f" | {ratio:.2f}x |")
    write_results(a.out, "dense-top", payload, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
