"""Load, soak and fault scenarios against a live service, headless, with pass rules.

    python -m loadtests.run SCENARIO [SCENARIO ...] [--bundle runs/demo/bundles] [--out DIR]

Scenarios (each writes <out>/<name>_stats.csv, _stats_history.csv, _failures.csv, .html,
a .png of latency percentiles and throughput over time, and a row of <out>/summary.json):

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

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import constant, constant_throughput  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.html import get_html_report  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC, PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from devtools.local import Stack  # noqa: E402
from index_builder import bundle as bundle_mod  # noqa: E402
from loadtests.locustfile import SineUser, Traffic  # noqa: E402

# -- the system under test ------------------------------------------------------------------

class System:
    """Embedded Redis with every history, and `sine serve` over a private bundle root."""

    def __init__(self, bundle: str, data_dir: str | None, work: Path, tree: Path | None = None,
                 cluster: bool = False, **settings):
        from model_export import data
        b = bundle_mod.load(bundle, deep=False)
        self.work = work
        self.settings = settings
        self.root = work / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(b.path, self.root / b.version)
        bundle_mod.set_current(self.root, b.version)
        self.version = b.version
        self.ds = data.load(b.manifest["dataset"]["name"], data_dir)
        self.stack = Stack(data.histories(self.ds), cluster=cluster)
        self.redis, self.cluster = self.stack.redis, self.stack.cluster
        try:
            if self.redis is not None:
                self._redis_cmd("SAVE")             # a restarted Redis reloads this snapshot
            self.server = self.stack.serve(self.root, log_path=work / "server.log", tree=tree,
                                           watch_interval_s=1, redis_retry_after_ms=250,
                                           **settings)
        except BaseException:
            self.stack.close()
            raise
        Traffic.configure(self.ds.user_ids, self.ds.item_ids[1:])

    def _redis_cmd(self, *words: str) -> bytes:
        import socket
        with socket.create_connection(("127.0.0.1", self.redis.port), 5) as s:
            s.sendall((" ".join(words) + "\r\n").encode())
            return s.recv(64)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        text = urllib.request.urlopen(self.server.url + "/metrics", timeout=5).read().decode()
        return sum(smp.value for fam in text_string_to_metric_families(text)
                   for smp in fam.samples
                   if smp.name == name and labels.items() <= smp.labels.items())

    def publish_copy(self, version: str, corrupt: bool = False) -> None:
        """A new version (the live one under another name), optionally corrupt; moves current."""
        staging = bundle_mod.staging_dir(self.root, version)
        src = self.root / self.version
        for p in src.iterdir():
            shutil.copy2(p, staging / p.name)
        m = json.loads((staging / "manifest.json").read_text())
        m["version"] = version
        (staging / "manifest.json").write_text(json.dumps(m))
        if corrupt:
            with open(staging / "index.faiss", "r+b") as f:
                f.seek(64)
                f.write(b"\xff" * 16)
        bundle_mod.publish(staging, self.root, version)

    def stop(self) -> None:
        self.stack.close()


# -- one locust run ---------------------------------------------------------------------------

def run_locust(name: str, url: str, out: Path, phases: list[tuple[float, int, float | None]],
               events_at: dict[float, callable] | None = None, system: System | None = None,
               keep_log: bool = False, reports: bool = True) -> dict:
    """phases: (seconds, users, req/s per user or None for no wait). Returns the run's record."""
    Traffic.log = []
    Traffic.stages = {}
    Traffic.keep_log = keep_log
    env = Environment(user_classes=[SineUser], host=url)
    runner = env.create_local_runner()
    base = str(out / name)
    csvw = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, base, full_history=False)
    g_csv = gevent.spawn(csvw.stats_writer)
    g_hist = gevent.spawn(stats_history, runner)
    series: list[dict] = []
    t0 = time.time()

    def sample():
        while True:
            s = runner.stats.total
            row = {"t": time.time() - t0, "rps": s.current_rps, "fail_rps": s.current_fail_per_sec,
                   "p50": s.get_current_response_time_percentile(0.5) or 0,
                   "p99": s.get_current_response_time_percentile(0.99) or 0,
                   "users": runner.user_count}
            if system is not None:
                try:
                    row["rss_mb"] = system.server.rss_bytes() / 2**20
                except OSError:
                    pass
            series.append(row)
            gevent.sleep(1)

    g_sample = gevent.spawn(sample)
    pending = sorted((events_at or {}).items())
    elapsed, before = 0.0, 0
    for secs, users, rate in phases:
        SineUser.wait_time = constant(0) if rate is None else constant_throughput(rate)
        runner.start(users, spawn_rate=max(users, before, 1))    # a step, not a ramp
        before = users
        end = elapsed + secs
        while time.time() - t0 < end:
            now = time.time() - t0
            while pending and pending[0][0] <= now:
                at, fn = pending.pop(0)
                print(f"  [{name}] t={now:.1f}s: {fn.__doc__ or fn.__name__}", flush=True)
                fn()
            gevent.sleep(0.1)
        elapsed = end
    runner.quit()
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)      # one more pass of the CSV writer
    g_sample.kill()
    g_hist.kill()
    g_csv.kill()
    for flush in (csvw.requests_flush, csvw.stats_history_flush, csvw.failures_flush,
                  csvw.exceptions_flush):
        flush()
    csvw.close_files()
    if reports:
        (out / f"{name}.html").write_text(get_html_report(env))
        plot(series, out / f"{name}.png", name)
    stages = {k: {"count": len(v), "p50_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9),
                  "p99_ms": pct(v, 0.99)} for k, v in Traffic.stages.items()}
    with open(out / f"{name}_stages.csv", "w") as f:
        f.write("stage,count,p50_ms,p90_ms,p99_ms\n")
        for k, v in stages.items():
            f.write(f"{k},{v['count']},{v['p50_ms']:.3f},{v['p90_ms']:.3f},{v['p99_ms']:.3f}\n")
    total = runner.stats.total
    rows = {f"{e.method} {e.name}": {"requests": e.num_requests, "failures": e.num_failures,
                                     "p50_ms": e.get_response_time_percentile(0.5),
                                     "p99_ms": e.get_response_time_percentile(0.99),
                                     "rps": e.total_rps}
            for e in runner.stats.entries.values()}
    return {"requests": total.num_requests, "failures": total.num_failures,
            "rps": total.total_rps, "p50_ms": total.get_response_time_percentile(0.5),
            "p99_ms": total.get_response_time_percentile(0.99), "endpoints": rows,
            "errors": {f"{e.method} {e.name}: {e.error}": e.occurrences
                       for e in runner.stats.errors.values()},
            "stages": stages, "series": series,
            "log": list(Traffic.log) if keep_log else None}


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def plot(series: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series:
        return
    t = [r["t"] for r in series]
    fig, axes = plt.subplots(3 if "rss_mb" in series[0] else 2, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(t, [r["p50"] for r in series], label="p50")
    axes[0].plot(t, [r["p99"] for r in series], label="p99")
    axes[0].set_ylabel("latency ms (10 s window)")
    axes[0].legend()
    axes[1].plot(t, [r["rps"] for r in series], label="requests/s")
    axes[1].plot(t, [r["fail_rps"] for r in series], label="failures/s")
    axes[1].set_ylabel("per second")
    axes[1].legend()
    if len(axes) == 3:
        axes[2].plot(t, [r.get("rss_mb", float("nan")) for r in series])
        axes[2].set_ylabel("server RSS MiB")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- scenarios --------------------------------------------------------------------------------

def failed(rec: dict, endpoints=("POST /recommend", "POST /recommend/batch")) -> int:
    """Failed answers (a 5xx, a 4xx, a wrong item count, a broken connection) of `endpoints`."""
    return sum(n for k, n in rec["errors"].items() if any(k.startswith(e + ": ") for e in endpoints))


class ReadyProbe:
    """GET /readyz every `every_s` while the block runs, as a kubelet would: (time, status)."""

    def __init__(self, url: str, every_s: float = 0.25):
        self.url, self.every, self.seen = url + "/readyz", every_s, []

    def _poll(self):
        while True:
            try:
                status = urllib.request.urlopen(self.url, timeout=2).status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            self.seen.append((time.time(), status))
            gevent.sleep(self.every)

    def __enter__(self):
        self.g = gevent.spawn(self._poll)
        return self

    def __exit__(self, *exc):
        self.g.kill()

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        got = [st for t, st in self.seen if since <= t < until]
        return {"probes": len(got), "not_200": sum(1 for st in got if st != 200)}


def server_errors(rec: dict) -> int:
    """Answers with a 5xx status (locust's failure text is `<status>: <body>`)."""
    return sum(n for k, n in rec["errors"].items()
               if k.split(": ", 2)[1:2] and k.split(": ", 2)[1].startswith("5"))


def scenario_load(sys_: System, a, out: Path, seconds: float | None = None) -> dict:
    rec = run_locust("load", sys_.server.url, out, [(seconds or a.duration, a.users, a.rate)],
                     system=sys_)
    rules = {"no errors": rec["failures"] == 0,
             f"p99 <= {a.p99_ms} ms": (rec["p99_ms"] or 0) <= a.p99_ms}
    return {"record": rec, "rules": rules}


def scenario_max(sys_: System, a, out: Path) -> dict:
    steps = [int(x) for x in a.max_steps.split(",")]
    results = []
    for u in steps:
        rec = run_locust(f"max-{u}", sys_.server.url, out, [(a.step_seconds, u, None)],
                         reports=False)
        results.append({"users": u, "rps": rec["rps"], "p50_ms": rec["p50_ms"],
                        "p99_ms": rec["p99_ms"], "failures": rec["failures"]})
        print(f"  max: {u} users -> {rec['rps']:.0f} req/s, p50 {rec['p50_ms']} p99 "
              f"{rec['p99_ms']} ms, {rec['failures']} failures", flush=True)
    ok = [r for r in results if r["failures"] == 0]
    best = max(ok, key=lambda r: r["rps"]) if ok else None
    return {"record": {"steps": results, "max_rps": best["rps"] if best else 0},
            "rules": {"an error-free step exists": best is not None}}


def scenario_soak(sys_: System, a, out: Path, max_rps: float | None) -> dict:
    target = a.soak_rate or (max_rps or 0) / 2
    if not target:
        raise SystemExit("soak needs --soak-rate or a max run first")
    users = 16
    rec = run_locust("soak", sys_.server.url, out, [(a.soak_minutes * 60, users, target / users)],
                     system=sys_)
    rss = [r["rss_mb"] for r in rec["series"] if "rss_mb" in r]
    warm = max(1, int(len(rss) * 0.1))          # growth measured after the first tenth
    first = statistics.median(rss[warm: warm + 30]) if len(rss) > warm else float("nan")
    last = statistics.median(rss[-30:]) if rss else float("nan")
    growth = (last - first) / first if first else float("nan")
    rec["rss"] = {"first_mb": first, "last_mb": last, "growth": growth, "target_rps": target}
    return {"record": rec, "rules": {"no errors": rec["failures"] == 0,
                                     "RSS growth < 5%": growth < 0.05}}


def scenario_redis_fault(sys_: System, a, out: Path, kill_at: float = 15, down_s: float = 10,
                         total: float = 40) -> dict:
    marks = {}

    def kill():
        """kill -9 redis-server"""
        marks["down"] = time.time()
        sys_.redis.kill()

    def back():
        """restart redis-server (it reloads its snapshot)"""
        sys_.redis.start()
        marks["up"] = time.time()

    with ReadyProbe(sys_.server.url) as ready:
        rec = run_locust("redis-fault", sys_.server.url, out, [(total, a.users, a.rate)],
                         events_at={kill_at: kill, kill_at + down_s: back}, system=sys_,
                         keep_log=True)
    known = set(Traffic.users)
    log = [x for x in rec["log"] if x[1] in known]
    during = [x for x in log if marks["down"] + 0.5 <= x[0] < marks["up"]]
    flagged = sum(1 for x in during if x[2] == "history_unavailable")
    after = [x for x in log if x[0] >= marks["up"]]
    first_ok = next((x[0] for x in after if x[2] is None), None)
    late = [x for x in log if x[0] >= marks["up"] + 2.0]
    outage = ready.summary(marks["down"], marks["up"])
    rec["fault"] = {"answers_during_outage": len(during), "flagged": flagged,
                    "readyz_probes_during_outage": outage["probes"],
                    "readyz_not_200": ready.summary()["not_200"],
                    "personalized_after_s": (first_ok - marks["up"]) if first_ok else None,
                    "unpersonalized_2s_after": sum(1 for x in late if x[2] is not None),
                    "events_refused_503": sum(n for k, n in rec["errors"].items()
                                              if k.startswith("POST /events:"))}
    rec.pop("log")
    f = rec["fault"]
    return {"record": rec, "rules": {
        "no failed /recommend or /recommend/batch (no 5xx)": failed(rec) == 0,
        "outage answers flagged history_unavailable": bool(during) and flagged == len(during),
        "/readyz 200 throughout (readiness is local)": outage["probes"] > 0
        and f["readyz_not_200"] == 0,
        "personalized within 2 s of Redis returning": first_ok is not None
        and f["personalized_after_s"] <= 2.0 and f["unpersonalized_2s_after"] == 0}}


def scenario_cluster_failover(bundle: str, a, out: Path, work: Path, kill_at: float = 10,
                              total: float = 30) -> dict:
    """A Redis Cluster (3 masters, 3 replicas, 1 s node timeout) under load; the master of one
    user's slots is SIGKILLed and its replica promoted."""
    from service.history import Keys
    from service.settings import Settings

    sys_ = System(bundle, a.data_dir, Path(tempfile.mkdtemp(dir=work, prefix="cluster-")),
                  a.server_tree, cluster=True, **a.settings)
    cl = sys_.cluster
    keys = Keys(Settings(redis_cluster=True))
    probe = keys.history(Traffic.users[0])
    victim = cl.master_of(probe)
    masters = cl.masters()
    on_victim = {u for u in Traffic.users if cl.master_of(keys.history(u), masters) is victim}
    marks: dict[str, float] = {}

    def kill():
        """kill -9 the master of a third of the users; its replica takes over"""
        marks["down"] = time.time()
        victim.kill()

        def watch():
            cl.wait_failover(probe, timeout_s=60)
            marks["promoted"] = time.time()
        gevent.spawn(watch)

    try:
        with ReadyProbe(sys_.server.url) as ready:
            rec = run_locust("redis-cluster-failover", sys_.server.url, out,
                             [(total, a.users, a.rate)], events_at={kill_at: kill},
                             system=sys_, keep_log=True)
    finally:
        sys_.stop()
    known = set(Traffic.users)                   # the mix also sends unknown (cold) users
    log = [x for x in rec.pop("log") if x[3] == 200 and x[1] in known]
    down, up = marks["down"], marks.get("promoted", float("inf"))
    mine = [x for x in log if x[1] in on_victim]
    rest = [x for x in log if x[1] not in on_victim]
    # the replicas wait the node timeout (1 s) before they elect: until then the master is down
    during = [x for x in mine if down + 0.1 <= x[0] < down + 1.0]
    beside = [x for x in rest if down <= x[0] < up]
    last_flagged = max((x[0] for x in mine if x[0] >= down and x[2] is not None), default=down)
    after = [x for x in mine if x[0] > last_flagged]
    rec["failover"] = {
        "victim_users": len(on_victim), "users": len(Traffic.users),
        "promoted_after_s": up - down, "recovered_after_s": last_flagged - down,
        "victim_answers_during": len(during),
        "victim_flagged_during": sum(1 for x in during if x[2] == "history_unavailable"),
        "other_answers_during": len(beside),
        "other_personalized_during": sum(1 for x in beside if x[2] is None),
        "other_unpersonalized_at_s": [round(x[0] - down, 2) for x in beside if x[2] is not None],
        "victim_answers_after": len(after),
        "readyz_probes_during": ready.summary(down, up)["probes"],
        "readyz_not_200": ready.summary()["not_200"],
        "events_refused_503": sum(n for k, n in rec["errors"].items()
                                  if k.startswith("POST /events:"))}
    f = rec["failover"]
    return {"record": rec, "rules": {
        "no failed /recommend or /recommend/batch (no 5xx)": failed(rec) == 0,
        "replica promoted within 10 s": f["promoted_after_s"] <= 10,
        "/readyz 200 throughout (readiness is local)": f["readyz_probes_during"] > 0
        and f["readyz_not_200"] == 0,
        "victim users' answers flagged history_unavailable while it is down": bool(during)
        and f["victim_flagged_during"] == len(during),
        "other masters' users personalized throughout": bool(beside)
        and f["other_personalized_during"] == len(beside),
        "victim users personalized within 2 s of the promotion": f["recovered_after_s"]
        <= f["promoted_after_s"] + 2.0 and f["victim_answers_after"] > 0}}


def scenario_reload(sys_: System, a, out: Path, total: float = 40) -> dict:
    new, bad = sys_.version + "-r1", sys_.version + "-broken"

    def good():
        """publish a new version; the service hot-reloads it"""
        sys_.publish_copy(new)

    def broken():
        """publish a corrupt version; it must be refused"""
        sys_.publish_copy(bad, corrupt=True)

    rec = run_locust("reload", sys_.server.url, out, [(total, a.users, a.rate)],
                     events_at={total * 0.3: good, total * 0.6: broken}, system=sys_,
                     keep_log=True)
    versions = [x[4] for x in rec["log"] if x[4]]
    tail = versions[int(len(versions) * 0.8):]
    refused = sys_.metric("sine_reloads_total", outcome="refused")
    rec["reload"] = {"versions_seen": sorted(set(versions)), "refused": refused}
    rec.pop("log")
    return {"record": rec, "rules": {
        "no failed request": rec["failures"] == 0,
        "new version served": new in versions and bad not in versions,
        "after the broken one, the new one still serves": bool(tail) and set(tail) == {new},
        "broken bundle refused": refused >= 1}}


def histogram(text: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """[(le, cumulative count)] of one Prometheus histogram series, in bucket order."""
    return [(float(smp.labels["le"]), smp.value) for fam in text_string_to_metric_families(text)
            for smp in fam.samples if smp.name == name + "_bucket"
            and labels.items() <= smp.labels.items()]


def quantile(before, after, q: float) -> float:
    """Upper bucket bound holding the q-quantile of what was observed between two scrapes."""
    before = before or [(le, 0.0) for le, _ in after]     # no series yet: nothing observed
    diff = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = diff[-1][1] if diff else 0
    for le, n in diff:
        if total and n >= q * total:
            return le
    return float("nan")


def scenario_overload(bundle: str, a, out: Path, work: Path) -> dict:
    sys_ = System(bundle, a.data_dir, Path(tempfile.mkdtemp(dir=work, prefix="overload-")),
                  a.server_tree,
                  **{**a.settings, "max_in_flight": a.overload_limit})
    scrape = {}

    def calm():
        """load drops; server-side latency of the admitted requests so far"""
        scrape["over"] = urllib.request.urlopen(sys_.server.url + "/metrics").read().decode()

    try:
        scrape["start"] = urllib.request.urlopen(sys_.server.url + "/metrics").read().decode()
        rec = run_locust("overload", sys_.server.url, out,
                         [(20, a.overload_users, None), (15, 4, 5.0)], system=sys_, keep_log=True,
                         events_at={20: calm})
    finally:
        sys_.stop()
    h0 = histogram(scrape["start"], "sine_request_duration_seconds", endpoint="recommend")
    h1 = histogram(scrape["over"], "sine_request_duration_seconds", endpoint="recommend")
    server_p50, server_p99 = quantile(h0, h1, 0.5) * 1000, quantile(h0, h1, 0.99) * 1000
    log = rec.pop("log")
    t0 = log[0][0] if log else 0
    over = [x for x in log if x[0] - t0 < 20]
    calm = [x for x in log if x[0] - t0 >= 22]          # after the step down
    refused = [x[5] for x in over if x[3] == 429]
    admitted = [x[5] for x in over if x[3] == 200]
    rec["overload"] = {"answers": len(over), "refused_429": len(refused),
                       "server_admitted_p50_ms_at_most": server_p50,
                       "server_admitted_p99_ms_at_most": server_p99,
                       "refused_p50_ms": pct(refused, 0.5), "refused_p99_ms": pct(refused, 0.99),
                       "admitted": len(admitted), "admitted_p50_ms": pct(admitted, 0.5),
                       "admitted_p99_ms": pct(admitted, 0.99),
                       "calm_answers": len(calm), "calm_429": sum(1 for x in calm if x[3] == 429),
                       "calm_p99_ms": pct([x[5] for x in calm], 0.99),
                       "other_errors": sum(1 for x in over + calm if x[3] not in (200, 429))}
    o = rec["overload"]
    return {"record": rec, "rules": {
        "429s under overload": len(refused) > 0,
        "nothing but 200 or 429": o["other_errors"] == 0,
        "429s answered faster than admitted requests (p50)": o["refused_p50_ms"]
        < o["admitted_p50_ms"],
        f"admitted p99 in the server <= {a.overload_p99_ms} ms": server_p99 <= a.overload_p99_ms,
        "no 429 once the load drops": bool(calm) and o["calm_429"] == 0}}


def scenario_hostile(sys_: System, a, out: Path, work: Path, seconds: float = 30) -> dict:
    """The same ordinary traffic twice, alone and beside hostile clients."""
    import subprocess

    users = work / "hostile-users.json"
    users.write_text(json.dumps(Traffic.users))
    port = sys_.server.url.rsplit(":", 1)[1]
    url = sys_.server.url + "/metrics"
    scrape = [urllib.request.urlopen(url).read().decode()]
    alone = run_locust("hostile-alone", sys_.server.url, out, [(seconds, a.users, a.rate)],
                       system=sys_)
    scrape.append(urllib.request.urlopen(url).read().decode())
    summary_path = work / "hostile.json"
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.hostile", "--port", port,
                             "--seconds", str(seconds), "--users-file", str(users),
                             "--out", str(summary_path)], cwd=Path(__file__).resolve().parents[1])
    try:
        together = run_locust("hostile", sys_.server.url, out, [(seconds, a.users, a.rate)],
                              system=sys_)
        proc.wait(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    scrape.append(urllib.request.urlopen(url).read().decode())
    hostile = json.loads(summary_path.read_text())
    h = [histogram(t, "sine_request_duration_seconds", endpoint="recommend") for t in scrape]
    timeouts = {k: float(v) for k, v in (("header", 5.0), ("body", 10.0))}
    for k, v in sys_.settings.items():
        if k in ("header_timeout_s", "body_timeout_s"):
            timeouts[k.split("_")[0]] = float(v)
    fivexx = {name: server_errors(rec) for name, rec in (("alone", alone), ("hostile", together))}
    hostile_5xx = sum(n for kind in hostile.values() for st, n in kind.get("statuses", {}).items()
                      if st.startswith("5"))

    def p99(rec: dict) -> float:
        return rec["endpoints"].get("POST /recommend", {}).get("p99_ms") or float("nan")

    rec = {"alone": {k: v for k, v in alone.items() if k != "series"},
           "together": {k: v for k, v in together.items() if k != "series"},
           "hostile": hostile, "deadlines_s": timeouts,
           "recommend_p99_ms": {"alone": p99(alone), "together": p99(together)},
           "server_recommend_p99_ms_at_most": {
               "alone": quantile(h[0], h[1], 0.99) * 1000,
               "together": quantile(h[1], h[2], 0.99) * 1000},
           "requests": together["requests"], "failures": together["failures"],
           "rps": together["rps"], "p50_ms": together["p50_ms"], "p99_ms": together["p99_ms"]}
    rec["hostile_summary"] = {
        "recommend_p99_ratio": rec["recommend_p99_ms"]["together"] / rec["recommend_p99_ms"]["alone"],
        **{f"{k}_closed": v.get("closed", 0) for k, v in hostile.items()}}
    sh, sb = hostile.get("slow-header", {}), hostile.get("slow-body", {})
    bh, bt = hostile.get("big-header", {}), hostile.get("batch", {})
    return {"record": rec, "rules": {
        "no 5xx (ordinary and hostile)": fivexx["alone"] == 0 and fivexx["hostile"] == 0
        and hostile_5xx == 0,
        "no failed ordinary request": together["failures"] == 0 and alone["failures"] == 0,
        "ordinary /recommend p99 within 2x of the load alone":
        rec["recommend_p99_ms"]["together"] <= 2 * rec["recommend_p99_ms"]["alone"],
        "slow-header sockets closed by the header deadline (408)": sh.get("closed", 0) > 0
        and sh["lifetime_max_s"] <= timeouts["header"] + 1.5
        and set(sh["statuses"]) == {"408"},
        "slow-body sockets closed by the body deadline (408)": sb.get("closed", 0) > 0
        and sb["lifetime_max_s"] <= timeouts["header"] + timeouts["body"] + 1.5
        and set(sb["statuses"]) == {"408"},
        "oversized headers refused (431)": bh.get("closed", 0) > 0
        and set(bh["statuses"]) == {"431"},
        "256-user batches answered 200 or 429": bt.get("closed", 0) > 0
        and set(bt["statuses"]) <= {"200", "429"} and bt.get("errors", 0) == 0}}


def write_markdown(summary: dict, path: Path, cmd: str) -> None:
    import platform
    lines = ["# Load, soak and fault runs", "",
             f"`{cmd}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores); the "
             "server, redis-server and locust share the machine.", "",
             "| scenario | rule | result |", "|---|---|---|"]
    for name, r in summary.items():
        for rule, ok in r["rules"].items():
            lines.append(f"| {name} | {rule} | {'pass' if ok else '**FAIL**'} |")
    lines += ["", "| scenario | requests | failures | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, r in summary.items():
        rec = r["record"]
        if "requests" in rec:
            lines.append(f"| {name} | {rec['requests']} | {rec['failures']} | {rec['rps']:.0f} | "
                         f"{rec['p50_ms']} | {rec['p99_ms']} |")
    if "max" in summary:
        lines += ["", "Closed-loop step ramp (`max`):", "",
                  "| clients | req/s | p50 ms | p99 ms | failures |", "|---|---|---|---|---|"]
        for st in summary["max"]["record"]["steps"]:
            lines.append(f"| {st['users']} | {st['rps']:.0f} | {st['p50_ms']} | {st['p99_ms']} | "
                         f"{st['failures']} |")
    for name, key in (("soak", "rss"), ("redis-fault", "fault"),
                      ("redis-cluster-failover", "failover"), ("reload", "reload"),
                      ("overload", "overload"), ("ci-redis-fault", "fault"),
                      ("hostile", "hostile_summary")):
        if name in summary and key in summary[name]["record"]:
            lines += ["", f"`{name}`: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in summary[name]["record"][key].items())]
    for name, r in summary.items():
        reps = r["record"].get("repeats")
        if not reps:
            continue
        key = next((k for k in ("failover", "fault", "hostile_summary", "overload")
                    if k in reps[0]), None)
        cols = [k for k, v in (reps[0].get(key) or {}).items()
                if isinstance(v, (int, float))] if key else []
        lines += ["", f"`{name}`, each of {len(reps)} runs:", "",
                  "| run | rules held | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for k, rep in enumerate(reps, 1):
            held = sum(bool(v) for v in rep["rules"].values())
            vals = [f"{rep[key][c]:.3g}" if isinstance(rep[key][c], float) else str(rep[key][c])
                    for c in cols]
            lines.append(f"| {k} | {held} of {len(rep['rules'])} | " + " | ".join(vals) + " |")
    stages = {n: r["record"].get("stages") for n, r in summary.items() if r["record"].get("stages")}
    if stages:
        lines += ["", "Server-side stage timings (ms, from `Server-Timing`):", "",
                  "| scenario | stage | p50 | p90 | p99 |", "|---|---|---|---|---|"]
        for n, st in stages.items():
            for k, v in st.items():
                lines.append(f"| {n} | {k} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p99_ms']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("scenarios", nargs="+",
                   choices=["load", "max", "soak", "redis-fault", "redis-cluster-failover",
                            "reload", "overload", "hostile", "ci"])
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
            sys_ = System(a.bundle, a.data_dir, work / "main", a.server_tree, **a.settings)
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


def merge_repeats(runs: list[dict]) -> dict:
    """One result per scenario name: the last run's record, every run's rules and figures
    (`repeats`), and each rule passing only if it held in every run."""
    out = {}
    for name in runs[0]:
        reps = [r[name] for r in runs]
        last = dict(reps[-1])
        last["record"] = dict(last["record"])
        last["record"]["repeats"] = [
            {"rules": r["rules"], **{k: v for k, v in r["record"].items()
                                     if k in ("fault", "failover", "hostile_summary", "overload",
                                              "requests", "failures", "p99_ms")}}
            for r in reps]
        last["rules"] = {f"{rule} (all {len(reps)} runs)": all(r["rules"][rule] for r in reps)
                         for rule in reps[0]["rules"]}
        out[name] = last
    return out


def run_scenario(s: str, sys_, a, out: Path, work: Path, summary: dict) -> dict:
    """{result name: {record, rules}} of one run of scenario `s`."""
    if s == "load":
        return {"load": scenario_load(sys_, a, out)}
    if s == "max":
        return {"max": scenario_max(sys_, a, out)}
    if s == "soak":
        mx = summary.get("max", {}).get("record", {}).get("max_rps")
        return {"soak": scenario_soak(sys_, a, out, mx)}
    if s == "redis-fault":
        return {"redis-fault": scenario_redis_fault(sys_, a, out)}
    if s == "reload":
        return {"reload": scenario_reload(sys_, a, out)}
    if s == "hostile":
        return {"hostile": scenario_hostile(sys_, a, out, work)}
    if s == "overload":
        return {"overload": scenario_overload(a.bundle, a, out, work)}
    if s == "redis-cluster-failover":
        return {s: scenario_cluster_failover(a.bundle, a, out, work)}
    # ci: shortened load and Redis fault
    return {"ci-load": scenario_load(sys_, a, out, seconds=15),
            "ci-redis-fault": scenario_redis_fault(sys_, a, out, kill_at=5, down_s=5, total=16)}


if __name__ == "__main__":
    sys.exit(main())
