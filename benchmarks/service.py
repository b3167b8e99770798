"""The live service on loopback, against a floor endpoint of the same app, with wrk.

One server process (uvicorn, one worker, ORT and faiss on one thread each), an embedded
redis-server holding every ML-1M user's 20 newest clicks, and wrk on one thread sending
`{"user_id": <random ML-1M user>, "n": 100}`. In each round, at each connection count, wrk
first hits `POST /floor` (same request parsing, a prebuilt response of /recommend's size, no
Redis, no model), then `POST /recommend`. Rounds interleave; the table reports medians and the
range. Runs once with micro-batching and once without, each its own server.

Needs `wrk` (apt-get install wrk).

    python benchmarks/service.py --bundle runs/bundles --rounds 3 --seconds 10
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit, machine, now, write_results  # noqa: E402
from index_builder import bundle as bundle_mod  # noqa: E402
from model_export import data  # noqa: E402
from service.local import EmbeddedRedis, Server  # noqa: E402
from sine_cli import main as sine  # noqa: E402

LUA = """
local users = {%s}
local n = #users
local headers = {["Content-Type"] = "application/json"}
math.randomseed(%d)
request = function()
  local u = users[math.random(1, n)]
  return wrk.format("POST", nil, headers, '{"user_id":"' .. u .. '","n":100}')
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max,
    latency.mean))
end
"""


def wrk(url: str, lua: Path, conns: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", str(lua), url],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^RESULT (.*)$", out, re.M)
    req, dur, err, p50, p90, p99, p999, mx, mean = map(int, m.group(1).split())
    return {"rps": req / (dur / 1e6), "errors": err, "requests": req, "p50_ms": p50 / 1000,
            "p90_ms": p90 / 1000, "p99_ms": p99 / 1000, "p999_ms": p999 / 1000,
            "max_ms": mx / 1000}


def stage_means(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    sums = dict(re.findall(r'^sine_stage_duration_seconds_sum\{stage="(\w+)"\} (\S+)', text, re.M))
    counts = dict(re.findall(r'^sine_stage_duration_seconds_count\{stage="(\w+)"\} (\S+)', text, re.M))
    bsum = re.search(r"^sine_batch_size_sum (\S+)", text, re.M)
    bcnt = re.search(r"^sine_batch_size_count (\S+)", text, re.M)
    out = {k: float(sums[k]) / float(counts[k]) * 1000 for k in sums if float(counts[k])}
    if bsum and float(bcnt.group(1)):
        out["mean_batch"] = float(bsum.group(1)) / float(bcnt.group(1))
    return out


def med(rows: list[dict], key: str) -> tuple[float, float, float]:
    v = [r[key] for r in rows]
    return statistics.median(v), min(v), max(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/bundles")
    p.add_argument("--data-dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", default="1,32")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    conns = [int(c) for c in a.connections.split(",")]
    b = bundle_mod.load(a.bundle, deep=False)
    ds = data.load("ml-1m", a.data_dir)
    tmp = Path(tempfile.mkdtemp())
    lua = tmp / "post.lua"
    lua.write_text(LUA % (",".join(f'"{u}"' for u in ds.user_ids), 7))

    redis = EmbeddedRedis().start()
    results: dict = {}
    try:
        sine(["load-histories", "--dataset", "ml-1m", "--redis-url", redis.url, "--holdout", "1"]
             + (["--data-dir", a.data_dir] if a.data_dir else []))
        for batching in (True, False):
            srv = Server({"SINE_BUNDLE": str(b.path), "SINE_REDIS_URL": redis.url,
                          "SINE_FLOOR_ENDPOINT": "true", "SINE_BATCHING": str(batching).lower(),
                          "SINE_WATCH_INTERVAL_S": "0", "SINE_MAX_IN_FLIGHT": "1024",
                          "SINE_REDIS_TIMEOUT_MS": "1000"}, log_path=tmp / "server.log").start()
            try:
                wrk(srv.url + "/recommend", lua, 32, 3)          # warm-up
                runs = {(c, ep): [] for c in conns for ep in ("floor", "recommend")}
                for _ in range(a.rounds):
                    for c in conns:
                        for ep in ("floor", "recommend"):
                            r = wrk(f"{srv.url}/{ep}", lua, c, a.seconds)
                            runs[(c, ep)].append(r)
                            print(f"batching={batching} c={c} {ep}: {r['rps']:.0f} rps "
                                  f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms err {r['errors']}",
                                  flush=True)
                stages = stage_means(srv.url)
            finally:
                srv.stop()
            results["batching" if batching else "no-batching"] = {
                "runs": {f"{c}/{ep}": v for (c, ep), v in runs.items()}, "stages_ms": stages}
    finally:
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    cmd = (f"python benchmarks/service.py --bundle {a.bundle} --rounds {a.rounds} "
           f"--seconds {a.seconds}")
    md = ["# Service on loopback: /recommend vs the floor endpoint (wrk, ML-1M bundle, n = 100)", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"`{cmd}`", "",
          f"Medians of {a.rounds} interleaved rounds of {a.seconds} s, [min, max] in brackets. "
          "One uvicorn worker, ORT and faiss on one thread; wrk on one thread on the same machine.",
          "", "| batching | conns | endpoint | req/s | p50 ms | p99 ms | errors |",
          "|---|---|---|---|---|---|---|"]
    summary = {}
    for mode, res in results.items():
        for c in conns:
            for ep in ("floor", "recommend"):
                rows = res["runs"][f"{c}/{ep}"]
                rps, p50, p99 = med(rows, "rps"), med(rows, "p50_ms"), med(rows, "p99_ms")
                md.append(f"| {mode} | {c} | {ep} | {rps[0]:.0f} [{rps[1]:.0f}, {rps[2]:.0f}] | "
                          f"{p50[0]:.2f} [{p50[1]:.2f}, {p50[2]:.2f}] | "
                          f"{p99[0]:.2f} [{p99[1]:.2f}, {p99[2]:.2f}] | "
                          f"{sum(r['errors'] for r in rows)} |")
            fl, rc = res["runs"][f"{c}/floor"], res["runs"][f"{c}/recommend"]
            ratio = [r["rps"] / f["rps"] for f, r in zip(fl, rc)]
            p99r = [r["p99_ms"] / f["p99_ms"] for f, r in zip(fl, rc)]
            summary[f"{mode}/{c}"] = {"throughput_ratio": statistics.median(ratio),
                                      "p99_ratio": statistics.median(p99r),
                                      "ratio_range": [min(ratio), max(ratio)],
                                      "p99_ratio_range": [min(p99r), max(p99r)],
                                      "recommend_p50_ms": statistics.median(r["p50_ms"] for r in rc)}
    md += ["", "| batching | conns | recommend / floor req/s | recommend / floor p99 | recommend p50 ms |",
           "|---|---|---|---|---|"]
    for k, v in summary.items():
        mode, c = k.split("/")
        md.append(f"| {mode} | {c} | {v['throughput_ratio']:.2f} [{v['ratio_range'][0]:.2f}, "
                  f"{v['ratio_range'][1]:.2f}] | {v['p99_ratio']:.2f} [{v['p99_ratio_range'][0]:.2f}, "
                  f"{v['p99_ratio_range'][1]:.2f}] | {v['recommend_p50_ms']:.2f} |")
    md += ["", "Mean time per request in each stage (ms), from the server's histograms over the "
           "whole run; `queue` is the wait for a micro-batch, `mean_batch` requests per batch:", "",
           "| batching | " + " | ".join(k for k in results["batching"]["stages_ms"]) + " |",
           "|---|" + "---|" * len(results["batching"]["stages_ms"])]
    for mode, res in results.items():
        md.append(f"| {mode} | " + " | ".join(f"{res['stages_ms'].get(k, float('nan')):.3f}"
                                            for k in results["batching"]["stages_ms"]) + " |")
    write_results(a.out, "service", {"results": results, "summary": summary, "command": cmd,
                                     "machine": machine(), "commit": git_commit(), "when": now()},
                  md)


if __name__ == "__main__":
    main()
