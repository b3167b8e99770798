"""What a request's dependencies cost bare, against the time the floor goals leave them.

Issue 40 asks `/recommend` for >= 0.5x the floor endpoint's req/s at 1 connection and >= 0.75x
at 32. The floor and `/recommend` share the HTTP server and the guard; what `/recommend` adds
is its stages. So the goals give the stages a budget per request:

- 1 connection: 1 / (0.5 floor req/s) - 1 / (direct-route floor req/s): a request's latency is
  its whole cost, and `/recommend` is answered on the direct route;
- 32 connections: 1 / (0.75 floor req/s) - 1 / (direct-route floor req/s): the event loop's one
  core is saturated, so req/s is one over the CPU time a request takes there.

The floor figures are read from a `benchmarks.serving` results file (`--floor`). Here, in one
uvloop process on the same bundle and Redis (every ML-1M user's newest `history_keep` clicks),
each part is timed bare, interleaved over rounds, at B = 1 and at the micro-batch the service
formed at 32 connections:

- `read`: the service's history read (`HistoryStore.get_many`: one send, hiredis parsing);
- `encode`: one ONNX Runtime run of the bundle's encoder on B windows;
- `faiss`: one faiss search of B user vectors, k = 2 n (the service's first width);
- `path`: the whole in-process request path (`Recommender.run`: stages 1-6, timers, metrics).

`read + encode + faiss` is what the named dependencies cost before any code of ours runs; where
it fills the budget, the goal cannot be met with them on this machine, whatever our own stages
do.

    python -m benchmarks.request_parts --bundle runs/demo/bundles
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import uvloop

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.serving import med
from devtools.local import Stack
from model_export import data
from service import lifecycle
from service.settings import Settings
from service.stages import Query, window
from service.state import State

PARTS = ("read", "encode", "faiss", "path")
GOALS = {1: 0.5, 32: 0.75}         # connections -> the req/s ratio to the floor asked


def budgets(floor: dict) -> dict[int, dict[str, float]]:
    """Per connection count: the floor's req/s, the direct route's, and the stages' budget per
    request (ms) that the goal leaves, from a `benchmarks.serving` results file."""
    out = {}
    for conns, ratio in GOALS.items():
        runs = next(iter(floor["results"].values()))["runs"]
        rps, direct = (med(runs[f"{conns}/{ep}"], "rps")[0] for ep in ("floor", "floor/asgi"))
        out[conns] = {"floor_rps": rps, "direct_floor_rps": direct,
                      "budget_ms": 1000 / (ratio * rps) - 1000 / direct}
    return out


async def measure(st: State, users: list[str], batches: list[int], rounds: int, reps: int
                  ) -> dict[int, dict[str, list[float]]]:
    """Seconds per call of each part, per batch size: the median of `reps` calls, per round."""
    eng = st.serving()
    assert st.store is not None
    n = 100
    out: dict[int, dict[str, list[float]]] = {b: {p: [] for p in PARTS} for b in batches}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for B in batches:
            # a different batch of users for every call, as traffic is: one user's window
            # called again finds the encoder's table rows in cache (half the time at B = 1)
            sets = [[users[i] for i in rng.choice(len(users), B, replace=False)]
                    for _ in range(reps)]
            wins = [window(eng, [h or [] for h in await st.store.get_many(b)]).window
                    for b in sets]                                              # [B, n] each
            vecs = [eng.session.run(["user_vector"], {"item_ids": w})[0] for w in wins]  # [B, D]

            async def read(i: int) -> None:
                await st.store.get_many(sets[i])         # type: ignore[union-attr]

            async def encode(i: int) -> None:
                eng.session.run(["interests", "user_vector", "weights"], {"item_ids": wins[i]})

            async def faiss(i: int) -> None:
                eng.index.search(vecs[i], 2 * n)

            async def path(i: int) -> None:
                jobs = [(eng, Query(u, n)) for u in sets[i]]
                for a in await st.recommender.run(jobs, [0.0] * len(jobs)):
                    assert not isinstance(a, BaseException), a

            for name, fn in (("read", read), ("encode", encode), ("faiss", faiss), ("path", path)):
                times = []
                for i in range(reps):
                    t0 = time.perf_counter()
                    await fn(i)
                    times.append(time.perf_counter() - t0)
                out[B][name].append(statistics.median(times))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--floor", type=Path, default=Path("benchmarks/results/service-stages.json"),
                   help="a benchmarks.serving results file with 1- and 32-connection floor rows")
    p.add_argument("--batch", type=int, default=20,
                   help="the 32-connection micro-batch (service-stages: 20 requests a batch)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--data-dir")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="request-parts")
    a = p.parse_args(argv)
    floor = json.loads(a.floor.read_text())
    budget = budgets(floor)
    ds = data.load("ml-1m", a.data_dir)
    batches = [1, a.batch]
    with Stack(data.histories(ds, holdout=1)) as stack:
        s = Settings(redis_url=stack.redis_url, bundle=str(a.bundle), batching=False)
        st = State.of(s)
        lifecycle.serve(st, lifecycle.load(st, a.bundle))

        async def run() -> dict[int, dict[str, list[float]]]:
            try:
                return await measure(st, [str(u) for u in ds.user_ids], batches, a.rounds,
                                     a.reps)
            finally:
                await st.store.close()           # type: ignore[union-attr]
        times = uvloop.run(run())
    eng = st.serving()
    rows: dict[str, dict] = {}
    for B in batches:
        med = {k: statistics.median(v) * 1e3 for k, v in times[B].items()}          # ms a call
        spread = {k: [min(v) * 1e3, max(v) * 1e3] for k, v in times[B].items()}
        rows[str(B)] = {"ms_per_call": med, "range_ms": spread,
                        "bare_ms_per_request": (med["read"] + med["encode"] + med["faiss"]) / B,
                        "path_ms_per_request": med["path"] / B}
    cmd = f"python -m benchmarks.request_parts --bundle {a.bundle}" + (
        f" --floor {a.floor}" if str(a.floor) != p.get_default("floor").as_posix() else "")
    md = ["# A request's dependencies bare, against the budget the floor goals leave", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"bundle `{eng.version}` ({eng.n_items:,} items, n = {eng.n}, history_keep "
          f"{s.history_keep}); `{cmd}`", "",
          f"Medians of {a.rounds} interleaved rounds, each the median of {a.reps} calls "
          "[min, max of the rounds], in one uvloop process with ORT and faiss on one thread; "
          "redis-server on the same 2 cores. The floor figures are "
          f"`{a.floor}`'s ({floor.get('when', '?')}).", "",
          "| B | read ms | encode ms | faiss ms | bare sum / request | whole path ms | "
          "path / request |", "|---|---|---|---|---|---|---|"]
    for B in batches:
        r = rows[str(B)]
        c, g = r["ms_per_call"], r["range_ms"]
        md.append(f"| {B} | " + " | ".join(f"{c[k]:.3f} [{g[k][0]:.3f}, {g[k][1]:.3f}]"
                                             for k in ("read", "encode", "faiss"))
                  + f" | {r['bare_ms_per_request']:.3f} | {c['path']:.3f} | "
                  f"{r['path_ms_per_request']:.3f} |")
    md += ["", "The goals' budget for the stages, per request (ms), against what the "
           "dependencies take bare and what the whole path takes:", "",
           "| conns | goal | floor req/s | direct-route floor req/s | budget | bare | "
           "bare / budget | path / budget |", "|---|---|---|---|---|---|---|---|"]
    for conns, B in ((1, 1), (32, a.batch)):
        bu, r = budget[conns], rows[str(B)]
        md.append(f"| {conns} | >= {GOALS[conns]}x | {bu['floor_rps']:.0f} | "
                  f"{bu['direct_floor_rps']:.0f} | {bu['budget_ms']:.3f} | "
                  f"{r['bare_ms_per_request']:.3f} | "
                  f"{r['bare_ms_per_request'] / bu['budget_ms']:.2f} | "
                  f"{r['path_ms_per_request'] / bu['budget_ms']:.2f} |")
    write_results(a.out, a.stem, {"rows": rows, "budgets": {str(k): v for k, v in budget.items()},
                                  "floor_file": str(a.floor), "floor_when": floor.get("when"),
                                  "bundle": eng.version, "history_keep": s.history_keep,
                                  "command": cmd, "machine": machine(), "commit": git_commit(),
                                  "when": now()}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
