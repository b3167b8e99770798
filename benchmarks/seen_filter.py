"""How many clicks to keep per user, and so to exclude: Redis memory, latency and online HR@50.

The service excludes the clicks it keeps (`history_keep`); the offline protocol excludes the
whole history. For each kept length, every ML-1M user's clicks before the test target are
loaded into an embedded redis-server (`sine load-histories --holdout 1`), `sine serve` answers
every user over HTTP (n = 50, 16 clients) and the answers are scored against the test targets.
Memory is Redis's own `MEMORY USAGE` of every history key, per user, projected to 10M users at
ML-1M's history lengths. Latency is one client's requests, one at a time, over the same users in
every configuration (client time, and the service's `history`, `window` and `filter` stages from
`Server-Timing`): medians of `--rounds` rounds, with their spread.

    python -m benchmarks.seen_filter --bundle runs/lt/bundles
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import httpx
import redis

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.online_eval import ask_all, ml1m_targets, score
from devtools.local import Stack
from model_export import data

PROJECTED_USERS = 10_000_000
STAGES = ("history", "window", "filter")


def memory_per_user(url: str) -> tuple[float, int]:
    """(mean MEMORY USAGE bytes of a history key, keys)."""
    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter("sine:history:*", count=1000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    sizes = [s or 0 for s in pipe.execute()]
    return sum(sizes) / max(len(keys), 1), len(keys)


def timings(url: str, users: list[str], rounds: int) -> dict[str, list[float]]:
    """Per round: the median client ms and the median of each stage's ms, one request at a time."""
    out: dict[str, list[float]] = {"client": [], **{s: [] for s in STAGES}}
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(rounds):
            client, stages = [], {s: [] for s in STAGES}
            for u in users:
                t0 = time.perf_counter()
                r = c.post("/recommend", json={"user_id": u, "n": 50})
                client.append((time.perf_counter() - t0) * 1000)
                for part in r.headers["server-timing"].split(","):
                    name, _, dur = part.strip().partition(";dur=")
                    if name in stages:
                        stages[name].append(float(dur))
            out["client"].append(statistics.median(client))
            for s in STAGES:
                out[s].append(statistics.median(stages[s]))
    return out


def run(bundle: str, keep: int, ds, targets: dict[str, str], sample: list[str], rounds: int,
        log_path: Path) -> dict:
    with Stack(data.histories(ds, holdout=1), keep=keep) as stack:
        per_user, keys = memory_per_user(stack.redis_url)
        srv = stack.serve(bundle, log_path=log_path, max_n=50, history_keep=keep,
                          redis_timeout_ms=2000, watch_interval_s=0)
        t0 = time.perf_counter()
        answers = asyncio.run(ask_all(srv.url, list(targets), 50, 16))
        secs = time.perf_counter() - t0
        lat = timings(srv.url, sample, rounds)
    return {"keep": keep, "metrics": score(answers, targets), "seconds": secs,
            "bytes_per_user": per_user, "keys": keys, "latency_ms": lat}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles", help="bundle root or folder (ML-1M)")
    p.add_argument("--data-dir", help="data folder (default ../shared/data)")
    p.add_argument("--keeps", default="20,50,100,200,500,all",
                   help="kept lengths to measure; `all`: the longest history")
    p.add_argument("--sample", type=int, default=500, help="users a latency round asks")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()

    b, ds, targets = ml1m_targets(a.bundle, a.data_dir)
    longest = max(len(s) for s in ds.sequences)
    keeps = [longest if k == "all" else int(k) for k in a.keeps.split(",")]
    sample = random.Random(0).sample(list(targets), min(a.sample, len(targets)))
    offline = b.manifest["offline_metrics"]["test"]
    rows = []
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for keep in keeps:
        rows.append(run(str(b.path), keep, ds, targets, sample, a.rounds,
                        Path(a.out) / ".server.log"))
        r = rows[-1]
        print(f"keep {keep}: HR@50 {100 * r['metrics']['HR@50']:.2f}, "
              f"{r['bytes_per_user']:.0f} B/user, client {med(r['latency_ms']['client'])} ms",
              flush=True)
    (Path(a.out) / ".server.log").unlink(missing_ok=True)
    base = rows[0]
    within = [r["keep"] for r in rows
              if abs(100 * (r["metrics"]["HR@50"] - offline["HR@50"])) <= 0.5]
    lengths = sorted(len(s) - 1 for s in ds.sequences)
    cmd = f"python -m benchmarks.seen_filter --bundle {a.bundle}"
    md = [f"# How many clicks to keep and exclude (ML-1M, {len(targets):,} users over HTTP)", "",
          f"Bundle `{b.version}` ({b.manifest['model'].get('arch', 'sine')}, "
          f"{b.manifest['index']['factory']}); {now()}; commit {git_commit()[:10]}; "
          f"`{cmd}`; {machine()['cpus']} CPUs.", "",
          f"Offline (all past items excluded): HR@50 {100 * offline['HR@50']:.2f}, HR@10 "
          f"{100 * offline['HR@10']:.2f}. History lengths before the test target: median "
          f"{lengths[len(lengths) // 2]}, 90th percentile {lengths[int(0.9 * len(lengths))]}, "
          f"longest {lengths[-1]}.", "",
          "| history_keep | online HR@50 | minus offline | HR@10 | Redis bytes/user | "
          f"projected to {PROJECTED_USERS / 1e6:.0f}M users | client ms | history ms | "
          "window ms | filter ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, lat = r["metrics"], r["latency_ms"]
        md.append(f"| {r['keep']} | {100 * m['HR@50']:.2f} | "
                  f"{100 * (m['HR@50'] - offline['HR@50']):+.2f} | {100 * m['HR@10']:.2f} | "
                  f"{r['bytes_per_user']:,.0f} | "
                  f"{r['bytes_per_user'] * PROJECTED_USERS / 2**30:,.1f} GiB | "
                  + " | ".join(med(lat[s]) for s in ("client", *STAGES)) + " |")
    md += ["", "Latency: medians of the rounds' medians (min-max across rounds), one client, "
           f"{len(sample)} users a round, n = 50. Within 0.5 points of offline HR@50: "
           + (", ".join(str(k) for k in within) or "none") + "."]
    write_results(a.out, "seen-filter", {
        "bundle": b.version, "offline": offline, "rows": rows, "within_0.5": within,
        "baseline_keep": base["keep"], "projected_users": PROJECTED_USERS, "command": cmd,
        "machine": machine(), "commit": git_commit(), "when": now()}, md)


if __name__ == "__main__":
    main()
