"""The live service on loopback, against a floor endpoint of the same app, with wrk.

One server process (uvicorn, one worker, ORT and faiss on one thread each), an embedded
redis-server holding every ML-1M user's 20 newest clicks, and wrk on one thread sending
`{"user_id": <random ML-1M user>, "n": 100}`. In each round, at each connection count, wrk
first hits `POST /floor` (same request parsing and middleware, a prebuilt answer of
/recommend's size: no Redis, no model), then `POST /recommend`. Rounds interleave; the tables
report medians and the range, the latency distribution and the stage means from the server's
own histograms. Runs once with micro-batching and once without, each its own server;
`--baseline-tree` adds a third server from another checkout (an older commit), measured in the
same rounds.

Needs `wrk` (apt-get install wrk).

    python -m benchmarks.serving --bundle runs/demo/bundles --rounds 2 --seconds 8
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Server, Stack
from index_builder import bundle as bundle_mod
from model_export import data

PCTS = (50, 75, 90, 99, 99.9)
# --pin: the servers on one core, wrk and redis-server on the other, as where the clients are
# other machines (here they share the server's two cores and preempt it mid-stage)
SERVER_CPUS, CLIENT_CPUS = {0}, {1}
SHADOW_MODE, SHADOW_RATE = "shadow-10", 0.1     # batching, with a shadow answering 10 %
# batching, with the server's default search fixed (the requests name none)
SEARCHES = {"aggregate": {"default_mode": "aggregate"},
            **{f"per-interest-{m}": {"default_mode": "per_interest", "interest_merge": m}
               for m in ("max", "weighted", "quota")},
            "keep-20": {"history_keep": 20},      # reads and excludes the 20 newest only
            "no-direct": {"direct_routes": False},        # /recommend through FastAPI's routing
            "no-blas": {"faiss_blas_vectors": 1 << 20},    # a scan per query vector, always
            "no-dense": {"dense_search_max_items": 0}}     # faiss, narrow first then wide
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
  local p = {%s}
  local out = {}
  for i, q in ipairs(p) do out[i] = string.format("%%d", latency:percentile(q)) end
  io.write(string.format("RESULT %%d %%d %%d %%d %%s\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency.max, table.concat(out, " ")))
end
"""


def write_lua(user_ids: list[str], folder: Path, seed: int = 7) -> Path:
    """The wrk script posting `{"user_id": <one of user_ids>, "n": 100}`, in `folder`."""
    lua = folder / "post.lua"
    lua.write_text(LUA % (",".join(f'"{u}"' for u in user_ids), seed,
                          ",".join(f"{q:g}" for q in PCTS)))
    return lua


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus` (affinity is per thread on Linux)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def wrk(url: str, lua: Path, conns: int, seconds: int, cpus: set[int] | None = None) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", str(lua), url],
                         capture_output=True, text=True, check=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None
                         ).stdout
    m = re.search(r"^RESULT (.*)$", out, re.M)
    if m is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    req, dur, err, mx, *pcts = map(int, m.group(1).split())
    r = {"rps": req / (dur / 1e6), "errors": err, "requests": req, "max_ms": mx / 1000}
    r.update({f"p{q:g}_ms": v / 1000 for q, v in zip(PCTS, pcts)})
    return r


def counters(url: str) -> dict[str, float]:
    """The server's stage-time sums and counts, micro-batch sums and shadow outcomes, as they
    stand (cumulative: subtract two readings for what happened between them)."""
    return counters_of(urllib.request.urlopen(url + "/metrics").read().decode())


def counters_of(text: str) -> dict[str, float]:
    """`counters` from a Prometheus text exposition."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if fam.name == "sine_stage_duration_seconds" and smp.name.endswith(("_sum", "_count")):
                out[f"{smp.name.rsplit('_', 1)[1]}/{smp.labels['stage']}"] = smp.value
            elif fam.name == "sine_batch_size" and smp.name.endswith(("_sum", "_count")):
                out["batch_" + smp.name.rsplit("_", 1)[1]] = smp.value
            elif fam.name == "sine_shadow" and smp.name == "sine_shadow_total":
                key = "shadow_" + smp.labels["outcome"]
                out[key] = out.get(key, 0) + smp.value
    return out


def stage_means(c: dict[str, float]) -> dict[str, float]:
    """Counters (or the difference of two readings) -> mean ms per request of each stage, the
    mean micro-batch size and the shadow outcomes."""
    stats = {k[4:]: v / c[f"count/{k[4:]}"] * 1000
             for k, v in c.items() if k.startswith("sum/") and c.get(f"count/{k[4:]}")}
    if c.get("batch_count"):
        stats["mean_batch"] = c["batch_sum"] / c["batch_count"]
    return stats | {k: v for k, v in c.items() if k.startswith("shadow_")}


def since(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def med(rows: list[dict], key: str) -> tuple[float, float, float]:
    v = [r[key] for r in rows]
    return statistics.median(v), min(v), max(v)


def measure(a: argparse.Namespace, b: bundle_mod.Bundle, modes: list[str], conns: list[int],
            tmp: Path) -> dict:
    """Every server of `modes` up together, then interleaved rounds of wrk against each."""
    ds = data.load("ml-1m", a.data_dir)
    lua = write_lua(ds.user_ids, tmp)
    results: dict = {}
    with Stack(data.histories(ds, holdout=1)) as stack:
        servers: dict[str, Server] = {}
        for mode in modes:
            base = mode == "baseline" and a.baseline_bundle
            shadowed = mode == SHADOW_MODE
            extra: dict[str, object] = {"gc_freeze": False} if mode == "no-gc-freeze" else {}
            if shadowed:        # the root (current: the bundle), the shadow a version beside it
                extra |= {"shadow": a.shadow, "shadow_rate": SHADOW_RATE}
            if mode in SEARCHES:        # batching, every request searched this way
                extra |= SEARCHES[mode]
            servers[mode] = stack.serve(
                bundle_mod.load(a.baseline_bundle, deep=False).path if base
                else b.path.parent if shadowed else b.path,
                log_path=tmp / f"{mode}.log",
                tree=a.baseline_tree if mode == "baseline" else None,
                floor_endpoint=True, batching=mode != "no-batching", watch_interval_s=0,
                max_in_flight=1024, redis_timeout_ms=1000, **extra)
            if a.pin:
                pin(servers[mode].proc.pid, SERVER_CPUS)             # type: ignore[union-attr]
            wrk(servers[mode].url + "/recommend", lua, 32, 3)          # warm-up
        if a.pin and stack.redis is not None and stack.redis.proc is not None:
            pin(stack.redis.proc.pid, CLIENT_CPUS)
        runs: dict = {(m, c, ep): [] for m in modes for c in conns for ep in endpoints(m)}
        spent: dict = {(m, c): {} for m in modes for c in conns}   # counters of /recommend rounds
        for _ in range(a.rounds):
            for mode, srv in servers.items():
                for c in conns:
                    for ep in endpoints(mode):
                        before = counters(srv.url) if ep == "recommend" else None
                        r = wrk(f"{srv.url}/{ep}", lua, c, a.seconds,
                                CLIENT_CPUS if a.pin else None)
                        if before is not None:
                            for k, v in since(counters(srv.url), before).items():
                                spent[(mode, c)][k] = spent[(mode, c)].get(k, 0.0) + v
                        runs[(mode, c, ep)].append(r)
                        print(f"{mode} c={c} {ep}: {r['rps']:.0f} rps p50 {r['p50_ms']:.2f} "
                              f"p99 {r['p99_ms']:.2f} ms err {r['errors']}", flush=True)
        for mode, srv in servers.items():
            results[mode] = {"runs": {f"{c}/{ep}": runs[(mode, c, ep)] for c in conns
                                      for ep in endpoints(mode)},
                             "stages_ms": stage_means(counters(srv.url)),
                             "stages_ms_by_conns": {str(c): stage_means(spent[(mode, c)])
                                                    for c in conns},
                             "rss_mib": srv.rss_bytes() / 2**20}
    return results


def endpoints(mode: str) -> tuple[str, ...]:
    """What a server is measured on: FastAPI's floor and /recommend, and for `batching` the
    floor answered as /recommend is, past FastAPI (`direct_routes`)."""
    return ("floor", "recommend", "floor/asgi") if mode == "batching" else ("floor", "recommend")


def side_by_side(results: dict, conns: list[int], summary: dict) -> list[str]:
    """The sections that compare two servers of the same rounds: the shadow's cost, and each
    per-interest merge against the aggregate (their ratios also go to `summary`)."""
    md: list[str] = []
    if SHADOW_MODE in results and "batching" in results:
        md += ["", f"The shadow's cost: {SHADOW_MODE} (a shadow answering {SHADOW_RATE:.0%} of "
               "`/recommend` off the response path) over batching, `/recommend` req/s, per round "
               "(the two servers measured in the same rounds), then the median [min, max]:", "",
               "| conns | shadowed / plain req/s | shadow answered (whole run) | dropped (whole run) |",
               "|---|---|---|---|"]
        st = results[SHADOW_MODE]["stages_ms"]
        for c in conns:
            rel = [x["rps"] / y["rps"] for x, y in zip(results[SHADOW_MODE]["runs"][f"{c}/recommend"],
                                                     results["batching"]["runs"][f"{c}/recommend"])]
            summary[f"shadow_cost/{c}"] = {"ratio": statistics.median(rel),
                                           "range": [min(rel), max(rel)]}
            md.append(f"| {c} | {statistics.median(rel):.2f} [{min(rel):.2f}, {max(rel):.2f}] | "
                      f"{st.get('shadow_answered', 0):,.0f} | {st.get('shadow_dropped', 0):,.0f} |")
    per = [m for m in results if m.startswith("per-interest-")]
    if per and "aggregate" in results:
        md += ["", "Per-interest search against the aggregate, `/recommend` req/s of aggregate over "
               "each per-interest merge, per round, then the median [min, max] (goal: at most "
               "1.3 at 32 connections):", "", "| merge | conns | aggregate / per-interest req/s |",
               "|---|---|---|"]
        for m in per:
            for c in conns:
                rel = [x["rps"] / y["rps"] for x, y in zip(results["aggregate"]["runs"][f"{c}/recommend"],
                                                         results[m]["runs"][f"{c}/recommend"])]
                summary[f"aggregate_over_{m}/{c}"] = {"ratio": statistics.median(rel),
                                                       "range": [min(rel), max(rel)]}
                md.append(f"| {m.removeprefix('per-interest-')} | {c} | "
                          f"{statistics.median(rel):.2f} [{min(rel):.2f}, {max(rel):.2f}] |")
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--data-dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", default="1,32")
    p.add_argument("--modes", default="batching,no-batching",
                   help="batching, no-batching, no-gc-freeze (batching, gc.freeze off), "
                        f"{SHADOW_MODE} (batching, --shadow answering {SHADOW_RATE * 100:.0f}%% of "
                        "/recommend), aggregate / per-interest-max / -weighted / -quota (batching, "
                        "every request searched so), keep-20 (batching, history_keep 20), no-direct "
                        "(batching, direct_routes off), no-blas (batching, faiss never BLAS), no-dense "
                        "(batching, faiss in place of dense scores) "
                        "and/or baseline "
                        "(needs --baseline-tree)")
    p.add_argument("--shadow", help=f"for {SHADOW_MODE}: a version beside the bundle, under its "
                                    "root")
    p.add_argument("--baseline-tree", type=Path,
                   help="another checkout of the project whose server is measured beside this one")
    p.add_argument("--baseline-bundle", help="the bundle the baseline serves (default --bundle)")
    p.add_argument("--pin", action="store_true",
                   help="each server on CPU 0, wrk and redis-server on CPU 1 (needs 2 CPUs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="service", help="result file name (default service)")
    a = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    conns = [int(c) for c in a.connections.split(",")]
    modes = a.modes.split(",")
    if "baseline" in modes and a.baseline_tree is None:
        raise SystemExit("--modes baseline needs --baseline-tree")
    if SHADOW_MODE in modes and a.shadow is None:
        raise SystemExit(f"--modes {SHADOW_MODE} needs --shadow VERSION")
    b = bundle_mod.load(a.bundle, deep=False)
    tmp = Path(tempfile.mkdtemp())
    results = measure(a, b, modes, conns, tmp)
    shutil.rmtree(tmp, ignore_errors=True)

    cmd = (f"python -m benchmarks.serving --bundle {a.bundle} --rounds {a.rounds} "
           f"--seconds {a.seconds}" + (f" --modes {a.modes}" if a.modes != p.get_default("modes")
                                      else "")
           + (f" --baseline-tree {a.baseline_tree}" if a.baseline_tree else "")
           + (f" --shadow {a.shadow}" if a.shadow else "")
           + (f" --baseline-bundle {a.baseline_bundle}" if a.baseline_bundle else "")
           + (" --pin" if a.pin else ""))
    md = ["# Service on loopback: /recommend vs the floor endpoint (wrk, ML-1M bundle, n = 100)", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"bundle `{b.version}` ({b.manifest['onnx'].get('graph', 'plain')} encoder graph, "
          f"{b.manifest['index']['factory']}); `{cmd}`", "",
          f"Medians of {a.rounds} interleaved rounds of {a.seconds} s, [min, max] in brackets. "
          "One uvicorn worker, ORT and faiss on one thread; wrk on one thread and redis-server "
          + ("on the other core (`--pin`: each server on CPU 0, wrk and redis-server on CPU 1)."
             if a.pin else "on the same 2 cores."), "",
          "| server | conns | endpoint | req/s | p50 ms | p99 ms | p99 / p50 | errors |",
          "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for mode, res in results.items():
        for c in conns:
            for ep in endpoints(mode):
                rows = res["runs"][f"{c}/{ep}"]
                rps, p50, p99 = med(rows, "rps"), med(rows, "p50_ms"), med(rows, "p99_ms")
                tail = statistics.median(r["p99_ms"] / r["p50_ms"] for r in rows)
                md.append(f"| {mode} | {c} | {ep} | {rps[0]:.0f} [{rps[1]:.0f}, {rps[2]:.0f}] | "
                          f"{p50[0]:.2f} [{p50[1]:.2f}, {p50[2]:.2f}] | "
                          f"{p99[0]:.2f} [{p99[1]:.2f}, {p99[2]:.2f}] | {tail:.1f} | "
                          f"{sum(r['errors'] for r in rows)} |")
            fl, rc = res["runs"][f"{c}/floor"], res["runs"][f"{c}/recommend"]
            ratio = [r["rps"] / f["rps"] for f, r in zip(fl, rc)]
            p99r = [r["p99_ms"] / f["p99_ms"] for f, r in zip(fl, rc)]
            tail = [r["p99_ms"] / r["p50_ms"] for r in rc]
            summary[f"{mode}/{c}"] = {"throughput_ratio": statistics.median(ratio),
                                      "p99_ratio": statistics.median(p99r),
                                      "ratio_range": [min(ratio), max(ratio)],
                                      "p99_ratio_range": [min(p99r), max(p99r)],
                                      "recommend_p50_ms": statistics.median(r["p50_ms"] for r in rc),
                                      "recommend_p99_over_p50": statistics.median(tail)}
    md += ["", "Ratios per round, then the median of the rounds [min, max]:", "",
           "| server | conns | recommend / floor req/s | recommend / floor p99 | recommend p50 ms "
           "| recommend p99 / p50 |", "|---|---|---|---|---|---|"]
    for k, v in summary.items():
        mode, c = k.split("/")
        md.append(f"| {mode} | {c} | {v['throughput_ratio']:.2f} [{v['ratio_range'][0]:.2f}, "
                  f"{v['ratio_range'][1]:.2f}] | {v['p99_ratio']:.2f} [{v['p99_ratio_range'][0]:.2f}, "
                  f"{v['p99_ratio_range'][1]:.2f}] | {v['recommend_p50_ms']:.2f} | "
                  f"{v['recommend_p99_over_p50']:.2f} |")
    md += ["", "Latency distribution of `/recommend` (ms, medians over the rounds):", "",
           "| server | conns | " + " | ".join(f"p{q:g}" for q in PCTS) + " | max |",
           "|---|---|" + "---|" * (len(PCTS) + 1)]
    for mode, res in results.items():
        for c in conns:
            rows = res["runs"][f"{c}/recommend"]
            md.append(f"| {mode} | {c} | " + " | ".join(
                f"{statistics.median(r[f'p{q:g}_ms'] for r in rows):.2f}" for q in PCTS)
                + f" | {statistics.median(r['max_ms'] for r in rows):.2f} |")
    keys = sorted({k for res in results.values() for st in res["stages_ms_by_conns"].values()
                   for k in st if not k.startswith("shadow_")})
    md += ["", "Mean time per request in each stage (ms), from the server's histograms over the "
           "`/recommend` rounds of each connection count alone (warm-up and floor rounds left "
           "out; `queue`: the wait for a micro-batch; `mean_batch`: requests per micro-batch), "
           "and the server's RSS at the end:", "",
           "| server | conns | " + " | ".join(keys) + " | RSS MiB |",
           "|---|---|" + "---|" * (len(keys) + 1)]
    for mode, res in results.items():
        for c in conns:
            st = res["stages_ms_by_conns"][str(c)]
            md.append(f"| {mode} | {c} | " + " | ".join(f"{st.get(k, float('nan')):.3f}"
                                                     for k in keys) + f" | {res['rss_mib']:.0f} |")
    if "batching" in results:
        md += ["", "`/recommend` past FastAPI against the floor past FastAPI too (`/floor/asgi`: "
               "the same prebuilt answer through the guard and the direct route), batching, per "
               "round, then the median [min, max]:", "",
               "| conns | recommend / ASGI floor req/s | recommend / ASGI floor p99 |", "|---|---|---|"]
        runs = results["batching"]["runs"]
        for c in conns:
            rel = [r["rps"] / f["rps"] for f, r in zip(runs[f"{c}/floor/asgi"], runs[f"{c}/recommend"])]
            p99 = [r["p99_ms"] / f["p99_ms"] for f, r in zip(runs[f"{c}/floor/asgi"],
                                                           runs[f"{c}/recommend"])]
            summary[f"asgi_floor/{c}"] = {"throughput_ratio": statistics.median(rel),
                                          "p99_ratio": statistics.median(p99),
                                          "ratio_range": [min(rel), max(rel)]}
            md.append(f"| {c} | {statistics.median(rel):.2f} [{min(rel):.2f}, {max(rel):.2f}] | "
                      f"{statistics.median(p99):.2f} [{min(p99):.2f}, {max(p99):.2f}] |")
    md += side_by_side(results, conns, summary)
    write_results(a.out, a.stem, {"results": results, "summary": summary, "command": cmd,
                                  "bundle": b.version, "machine": machine(),
                                  "commit": git_commit(), "when": now()}, md)


if __name__ == "__main__":
    main()
