"""Load, soak and fault scenarios against a live service, headless, with pass rules.

    python -m loadtests.run SCENARIO [SCENARIO ...] [--bundle runs/demo/bundles] [--out DIR]

Scenarios (each writes a row of <out>/summary.json and summary.md, with its stage times, and a
.png of latency percentiles and throughput over time; locust's own <name>_stats.csv,
_stats_history.csv, _failures.csv and .html go to <out>/raw/, which git ignores):

  load          a fixed load (--users clients at --rate req/s each) for --duration s;
                fails on any error or a p99 above --p99-ms
  max           a step ramp of closed-loop clients; the highest error-free throughput and
                p50/p99 at each step
  soak          --soak-minutes at half the measured maximum (from max, or --soak-rate);
                0 errors and server RSS growth under 5 %
  redis-fault   Redis killed mid-run and restarted 10 s later: no 5xx from /recommend,
                answers flagged history_unavailable during the outage, personalized again
                within 2 s of Redis returning
  redis-cluster-failover
                a Redis Cluster (3 masters, 3 replicas) and a master killed mid-run: no 5xx,
                its users' answers flagged history_unavailable while it is down, its replica
                promoted within 10 s, the other masters' users personalized throughout, its
                users personalized again within 2 s of the promotion
  reload        a new bundle published mid-run (hot reload: no failed request), then a broken
                one (refused: the new one keeps serving)
  hostile       the fixed load alone, then the same with hostile clients beside it (slow-header
                and slow-body sockets, 64 KiB headers, 256-user batches in a closed loop, from
                another process): no 5xx, ordinary /recommend p99 within 2x of the load alone,
                every hostile socket closed by the deadlines (408, 431)
  idle-sockets  the fixed load alone, then the same with 2,000 idle and stuck sockets beside it
                (silent, a stray body byte after the answer, answers never read; from another
                process, `loadtests.idle`): no 5xx, ordinary /recommend p99 within 2x of the load
                alone, the server's open descriptors under its limit, every such socket closed
                within its deadline (408, or 503 past the connection cap); then the load
                beside a process that only spends the attacker's CPU (the control, recorded)
  redis-blackhole
                Redis silenced mid-run through a TCP proxy (connections open, nothing answers),
                forwarding again 10 s later: no 5xx, answers flagged history_unavailable while
                silenced, /health/redis down meanwhile, personalized within 5 s after, RSS
                bounded. The service reaches Redis through the proxy for every scenario of a
                run that names this one
  overload      a server with a small in-flight limit driven far beyond it: 429s answered
                faster than admitted requests, the server-side p99 of admitted requests bounded
                (from its own histogram: locust saturates a core here and inflates what the
                client sees), no 429 once the load drops
  ci            load and redis-fault, shortened (about 40 s), as CI runs them

The runner starts an embedded redis-server (loaded with every user's history) and `sine serve`
on 127.0.0.1, on a private copy of the bundle root. Exit status 1 when a pass rule fails.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()          # before anything opens a socket: locust runs on gevent

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from loadtests.report import write_markdown  # noqa: E402
from loadtests.scenarios import merge_repeats, run_scenario  # noqa: E402
from loadtests.system import System  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("scenarios", nargs="+",
                   choices=["load", "max", "soak", "redis-fault", "redis-cluster-failover",
                            "reload", "overload", "hostile", "idle-sockets", "redis-blackhole",
                            "ci"])
    p.add_argument("--bundle", default="runs/demo/bundles", help="bundle root or folder to serve")
    p.add_argument("--data-dir", help="data folder (default ../shared/data)")
    p.add_argument("--out", default="loadtests/results", help="where reports go")
    p.add_argument("--server-tree", type=Path,
                   help="run the server of another checkout of the project (an older commit)")
    p.add_argument("--users", type=int, default=16, help="clients of the fixed load (default 16)")
    p.add_argument("--rate", type=float, default=10.0, help="req/s per client (default 10)")
    p.add_argument("--duration", type=float, default=60, help="load seconds (default 60)")
    p.add_argument("--p99-ms", type=float, default=250, help="load p99 bound (default 250)")
    p.add_argument("--max-steps", default="2,4,8,16,32,64", help="closed-loop clients per step")
    p.add_argument("--step-seconds", type=float, default=15)
    p.add_argument("--soak-minutes", type=float, default=10)
    p.add_argument("--soak-rate", type=float, help="total req/s of the soak (default: max / 2)")
    p.add_argument("--overload-limit", type=int, default=8, help="server in-flight limit")
    p.add_argument("--overload-users", type=int, default=64)
    p.add_argument("--overload-p99-ms", type=float, default=100,
                   help="bound on the server-side p99 of admitted /recommend (default 100)")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="a service setting for the server under test (batch_max_bulk=64), to "
                        "measure a variant side by side")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each scenario this many times; its rules must hold in every run, "
                        "and each run's figures are kept under `repeats` (default 1)")
    a = p.parse_args()
    a.settings = dict(kv.split("=", 1) for kv in a.set)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sine-load-"))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    failed = []
    sys_ = None
    try:
        needs_system = [s for s in a.scenarios if s not in ("overload", "redis-cluster-failover")]
        if needs_system:
            sys_ = System(a.bundle, a.data_dir, work / "main", a.server_tree,
                          proxy="redis-blackhole" in a.scenarios, **a.settings)
        for s in a.scenarios:
            runs = []
            for k in range(a.repeat):
                print(f"== {s}" + (f" ({k + 1} of {a.repeat})" if a.repeat > 1 else ""),
                      flush=True)
                runs.append(run_scenario(s, sys_, a, out, work, summary))
            res = runs[0] if a.repeat == 1 else merge_repeats(runs)
            for name, r in res.items():
                r["record"].pop("series", None) if name not in ("soak",) else None
                r["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                summary[name] = r
                for rule, ok in r["rules"].items():
                    print(f"  [{'pass' if ok else 'FAIL'}] {name}: {rule}", flush=True)
                    if not ok:
                        failed.append(f"{name}: {rule}")
            summary_path.write_text(json.dumps(summary, indent=1, default=str))
            write_markdown(summary, out / "summary.md",
                           "python -m loadtests.run " + " ".join(sys.argv[1:]))
    finally:
        if sys_ is not None:
            sys_.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("all pass rules held" if not failed else f"FAILED: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
