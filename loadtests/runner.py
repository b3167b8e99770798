"""One locust run in this process (headless, a fixed shape of phases), its CSVs, HTML report and
plot; the readiness probe beside it; reading the server's Prometheus histograms. The caller
(`loadtests.run`) has monkey-patched the process for gevent first."""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import gevent
from locust import constant, constant_throughput
from locust.env import Environment
from locust.html import get_html_report
from locust.stats import CSV_STATS_INTERVAL_SEC, PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history
from prometheus_client.parser import text_string_to_metric_families

from loadtests.locustfile import SineUser, Traffic
from loadtests.system import System

RAW = "raw"


def run_locust(name: str, url: str, out: Path, phases: list[tuple[float, int, float | None]],
               events_at: dict[float, Callable] | None = None, system: System | None = None,
               keep_log: bool = False, reports: bool = True, traffic: Traffic | None = None) -> dict:
    """phases: (seconds, users, req/s per user or None for no wait). Returns the run's record.
    `traffic`: what the users draw from (default: the system's)."""
    base_traffic = traffic or (system.traffic if system is not None else None)
    if base_traffic is None:
        raise ValueError("run_locust needs a system or a traffic")
    t = SineUser.traffic = base_traffic.fresh(keep_log)
    env = Environment(user_classes=[SineUser], host=url)
    runner = env.create_local_runner()
    raw = out / RAW                       # locust's own files: git ignores them, the summary holds
    raw.mkdir(parents=True, exist_ok=True)  # what a run is judged and compared by
    base = str(raw / name)
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
        (raw / f"{name}.html").write_text(get_html_report(env))
        plot(series, out / f"{name}.png", name)
    stages = {k: {"count": len(v), "p50_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9),
                  "p99_ms": pct(v, 0.99)} for k, v in t.stages.items()}
    with open(raw / f"{name}_stages.csv", "w") as f:
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
            "log": list(t.log) if keep_log else None}


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


def failed(rec: dict, endpoints=("POST /recommend", "POST /recommend/batch")) -> int:
    """Failed answers (a 5xx, a 4xx, a wrong item count, a broken connection) of `endpoints`."""
    return sum(n for k, n in rec["errors"].items() if any(k.startswith(e + ": ") for e in endpoints))


def events_refused(rec: dict) -> int:
    """`POST /events` answered with an error (a click Redis could not take: 503)."""
    return sum(n for k, n in rec["errors"].items() if k.startswith("POST /events:"))


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
