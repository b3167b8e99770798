"""What a history read costs in redis-py, per call and per pipelined batch.

An embedded redis-server holds 5,000 users' 20-click histories. In one asyncio process (uvloop,
as the service runs) each way of reading B users' lists is timed over many rounds, interleaved:

- `call`: one `await client.lrange()` per user, one after another (B round trips);
- `gather`: B `lrange` calls at once through the pool (B connections, B round trips in parallel);
- `pipeline`: one pipelined round trip for the B users (what the service does);
- `pipeline+wait_for`, `pipeline+timeout`: the same inside the deadline each read gets,
  `asyncio.wait_for` (a task per call) against `asyncio.timeout` (none);
- `raw`: the B LRANGE commands packed by hand and sent on one pooled connection, the replies
  read back with redis-py's parser: the floor under redis-py's pipeline machinery;
- `service`: `service.history.ListReader`, the service's own read path (one connection, the
  commands in one send, hiredis parsing in the protocol callback), inside the read deadline.

Wall time per batch and per user (median, p10-p90), and the process CPU time per user: the part
redis-py itself costs the server's one core. `redis-benchmark` beside it gives the server's own
rate for LRANGE on the same machine.

    python -m benchmarks.redis_reads
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import time

import uvloop

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack
from service.history import HistoryStore
from service.settings import Settings


async def measure(store: HistoryStore, users: list[str], batch: int, rounds: int) -> dict:
    client = store.client
    keys = [store.key(u) for u in users]

    async def call(ks: list[str]) -> None:
        for k in ks:
            await client.lrange(k, 0, 19)

    async def gather(ks: list[str]) -> None:
        await asyncio.gather(*(client.lrange(k, 0, 19) for k in ks))

    async def pipeline(ks: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for k in ks:
            pipe.lrange(k, 0, 19)
        await pipe.execute()

    async def with_wait_for(ks: list[str]) -> None:
        await asyncio.wait_for(pipeline(ks), 1.0)

    async def with_timeout(ks: list[str]) -> None:
        async with asyncio.timeout(1.0):
            await pipeline(ks)

    pool = client.connection_pool

    async def raw(ks: list[str]) -> None:
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands([("LRANGE", k, 0, 19) for k in ks]))
            for _ in ks:
                await conn.read_response()
        finally:
            await pool.release(conn)

    async def service(ks: list[str]) -> None:
        async with asyncio.timeout(1.0):
            await store.reader.lranges(ks, 19)   # type: ignore[union-attr]

    ways = {"call": call, "gather": gather, "pipeline": pipeline,
            "pipeline+wait_for": with_wait_for, "pipeline+timeout": with_timeout, "raw": raw,
            "service": service}
    wall: dict[str, list[float]] = {w: [] for w in ways}
    cpu: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(rounds):
        for name, fn in ways.items():
            ks = keys[(r * batch) % (len(keys) - batch):][:batch]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(20):
                await fn(ks)
            wall[name].append((time.perf_counter() - t0) / 20)
            cpu[name].append((time.process_time() - c0) / 20)
    out = {}
    for name in ways:
        w = sorted(wall[name])
        out[name] = {"batch_us": statistics.median(w) * 1e6,
                     "p10_us": w[len(w) // 10] * 1e6, "p90_us": w[9 * len(w) // 10] * 1e6,
                     "per_user_us": statistics.median(w) * 1e6 / batch,
                     "cpu_per_user_us": statistics.median(cpu[name]) * 1e6 / batch}
    return out


def redis_benchmark(port: int) -> float | None:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    out = subprocess.run([exe, "-p", str(port), "-n", "50000", "-c", "32", "-q", "-t",
                          "lrange_100"], capture_output=True, text=True).stdout
    m = re.search(r"LRANGE_100.*?: ([\d.]+) requests per second", out)
    return float(m.group(1)) if m else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    users = [f"u{i}" for i in range(5000)]
    hist = ((u, [f"item{(i * 7 + j) % 3000}" for j in range(20)]) for i, u in enumerate(users))
    results = {}
    with Stack(hist) as stack:
        s = Settings(redis_url=stack.redis_url, redis_pool_size=64)

        async def run() -> dict:
            store = HistoryStore(s)
            try:
                await store.get_many(users[:64])              # fill the pool, warm up
                return {b: await measure(store, users, b, a.rounds)
                        for b in map(int, a.batches.split(","))}
            finally:
                await store.close()
        results = uvloop.run(run())
        server_rps = redis_benchmark(stack.redis.port) if stack.redis else None
    cmd = "python -m benchmarks.redis_reads" + (f" --rounds {a.rounds}" if a.rounds != 60 else "")
    md = ["# Reading histories from Redis with redis-py (asyncio, hiredis, uvloop)", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"`{cmd}`. redis-server on the same machine"
          + (f"; `redis-benchmark -t lrange_100 -c 32` gives {server_rps:,.0f} LRANGE/s there"
             if server_rps else "") + ".", "",
          f"Medians over {a.rounds} interleaved rounds of 20 batches; microseconds.", "",
          "| B | way | per batch | p10-p90 | per user | CPU per user |", "|---|---|---|---|---|---|"]
    for b, rows in results.items():
        for name, r in rows.items():
            md.append(f"| {b} | {name} | {r['batch_us']:.0f} | {r['p10_us']:.0f}-{r['p90_us']:.0f} "
                      f"| {r['per_user_us']:.1f} | {r['cpu_per_user_us']:.1f} |")
    write_results(a.out, "redis-reads", {"results": results, "redis_benchmark_lrange_rps": server_rps,
                                         "command": cmd, "machine": machine(),
                                         "commit": git_commit(), "when": now()}, md)


if __name__ == "__main__":
    main()
