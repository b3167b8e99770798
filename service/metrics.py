"""Prometheus metrics, one registry per app so that several apps can live in one process.

Under `sine serve` with several workers, prometheus_client runs in multiprocess mode (the
`PROMETHEUS_MULTIPROC_DIR` its workers inherit): each value lives in a file of that folder and
`exposition()` sums every worker's. A labelled gauge that is replaced (the bundle, the last
refresh) has its old children set to 0 before they are cleared, since a file keeps them."""
from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values

from index_builder.bundle import RefreshReport


def observe_n(h: Any, amount: float, n: int) -> None:
    """What `n` calls of `h.observe(amount)` record, on a histogram child (prometheus_client's
    own fields: its sum, and the first bucket whose upper bound is >= amount)."""
    if n == 1:
        h.observe(amount)
        return
    h._sum.inc(amount * n)
    h._buckets[bisect_left(h._upper_bounds, amount)].inc(n)


# sub-millisecond resolution where the stages live, up to a second for the tail
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                 5e-2, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OVERLAP_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    """The app's Prometheus metrics, in one registry of its own."""
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request = Histogram("sine_request_duration_seconds", "Request duration by endpoint.",
                                 ["endpoint"], buckets=STAGE_BUCKETS, registry=r)
        self.stage = Histogram("sine_stage_duration_seconds",
                               "Duration of each request-path stage, per request.", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("sine_batch_size", "Requests per micro-batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.fallbacks = Counter("sine_fallbacks_total", "Answers served from popularity.",
                                 ["reason"], registry=r)
        self.failures = Counter("sine_failures_total", "Requests answered with an error.",
                                ["reason"], registry=r)
        self.unknown_items = Counter("sine_history_unknown_items_total",
                                     "History items not in the bundle's vocabulary (dropped).",
                                     registry=r)
        self.redis_errors = Counter("sine_redis_errors_total", "Failed Redis calls.", ["op"],
                                    registry=r)
        self.reloads = Counter("sine_reloads_total", "Bundle reload attempts.", ["outcome"],
                               registry=r)
        self.bundle = Gauge("sine_bundle_info", "The bundle being served (value 1; with workers, "
                            "one sample per worker pid).", ["version", "factory", "items"],
                            registry=r, multiprocess_mode="liveall")
        self.in_flight = Gauge("sine_in_flight_requests", "Users being answered (a single request "
                               "counts one, a batch one per user).", registry=r,
                               multiprocess_mode="livesum")
        self.redis_up = Gauge("sine_redis_up", "1 when Redis answered the last ping (readiness, "
                              "scrape, /health/redis), else 0.", registry=r,
                              multiprocess_mode="min")
        self.watcher_up = Gauge("sine_bundle_watcher_up", "1 while the task following the bundle "
                                "root's `current` pointer runs.", registry=r,
                                multiprocess_mode="min")
        self.watch_time = Gauge("sine_bundle_watch_timestamp_seconds", "When the watcher last "
                                "read `current` (stale: the watcher is stuck).", registry=r,
                                multiprocess_mode="min")
        self.behind_current = Gauge("sine_bundle_behind_current", "1 when `current` names "
                                    "another version than the one served (refused, or loading).",
                                    registry=r, multiprocess_mode="max")
        self.redis_memory = Gauge("sine_redis_memory_used_ratio", "Redis's used memory over its "
                                  "maxmemory (absent without a maxmemory; on a cluster, the "
                                  "fullest master); at 1 every write is refused.", registry=r,
                                  multiprocess_mode="max")
        self.events = Counter("sine_events_total", "Clicks received by POST /events.",
                              ["outcome"], registry=r)
        self.bundle_age = Gauge("sine_bundle_age_seconds",
                                "Seconds since the served bundle was built.", registry=r,
                                multiprocess_mode="max")
        self.stream_length = Gauge("sine_click_log_entries", "Entries in the click log stream.",
                                   registry=r, multiprocess_mode="mostrecent")
        self.stream_lag = Gauge("sine_click_log_lag", "Click log entries the exporter's consumer "
                                "group has not read yet (every entry until the group exists).",
                                registry=r, multiprocess_mode="mostrecent")
        self.stream_lost = Gauge("sine_click_log_lost_entries", "Unexported click log entries "
                                 "the length or age cap removed, ever (click_stream_trim=cap).",
                                 registry=r, multiprocess_mode="mostrecent")
        self.refresh = Gauge("sine_refresh_last", "The last `sine refresh` (value 1), by outcome.",
                             ["outcome", "version"], registry=r, multiprocess_mode="max")
        self.refresh_time = Gauge("sine_refresh_last_timestamp_seconds",
                                  "When the last `sine refresh` finished.", registry=r,
                                  multiprocess_mode="max")
        self.refresh_metric = Gauge("sine_refresh_last_metric",
                                    "The last refresh's gate metrics on its holdout.",
                                    ["bundle", "metric"], registry=r,
                                    multiprocess_mode="mostrecent")
        # rollouts (service.arms): by arm, recorded while arms or a shadow are set
        self.arm_requests = Counter("sine_arm_requests_total", "Single /recommend answers by "
                                    "arm and outcome (personalized, a fallback, or error).",
                                    ["arm", "outcome"], registry=r)
        self.arm_stage = Histogram("sine_arm_stage_duration_seconds", "Duration of each "
                                   "request-path stage by arm.", ["arm", "stage"],
                                   buckets=STAGE_BUCKETS, registry=r)
        self.shadow = Counter("sine_shadow_total", "Requests sampled for the shadow, by outcome "
                              "(answered, dropped under load, error).", ["arm", "outcome"],
                              registry=r)
        self.shadow_seconds = Histogram("sine_shadow_duration_seconds", "The shadow's time to "
                                        "answer, its micro-batch included.", ["arm"],
                                        buckets=STAGE_BUCKETS, registry=r)
        self.shadow_overlap = Histogram("sine_shadow_overlap", "Overlap@n of the shadow's "
                                        "answer with the served one.", ["arm"],
                                        buckets=OVERLAP_BUCKETS, registry=r)
        self._children: dict[tuple[int, str], Any] = {}
        self._pairs: dict[tuple[str, str], Any] = {}

    def child(self, metric: Any, label: str) -> Any:
        """`metric.labels(label)`, looked up once: the hot path observes per request."""
        key = (id(metric), label)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(label)
        return c

    def observe_stages(self, timings: dict[str, float], count: int, arm: str | None) -> None:
        """`timings` (stage -> seconds) observed `count` times each: the requests of a
        micro-batch share their stages' times, so each histogram is touched once a batch, not
        once a request (140 observations a batch of 20 cost about 0.3 ms). `arm`: counted by
        arm too."""
        for name, dt in timings.items():
            observe_n(self.stage_child(name), dt, count)
            if arm is not None:
                observe_n(self.arm_stage_child(arm, name), dt, count)

    def stage_child(self, stage: str) -> Any:
        return self.child(self.stage, stage)

    def arm_stage_child(self, arm: str, stage: str) -> Any:
        c = self._pairs.get((arm, stage))
        if c is None:
            c = self._pairs[(arm, stage)] = self.arm_stage.labels(arm, stage)
        return c

    def set_refresh(self, report: RefreshReport) -> None:
        """Gauges from a `sine refresh` report (`refresh.json`)."""
        _reset(self.refresh)
        self.refresh.labels(str(report.outcome), str(report.version)).set(1)
        if isinstance(report.finished_unix, (int, float)):
            self.refresh_time.set(report.finished_unix)
        _reset(self.refresh_metric)
        for which, ms in (report.gate or {}).get("metrics", {}).items():
            for name, v in ms.items():
                if isinstance(v, (int, float)):
                    self.refresh_metric.labels(which, name).set(v)

    def set_bundle(self, version: str, factory: str, items: int) -> None:
        _reset(self.bundle)
        self.bundle.labels(version, factory, str(items)).set(1)

    def exposition(self) -> bytes:
        """The text of /metrics: this app's registry, or every worker's in multiprocess mode."""
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def multiprocess() -> bool:
    """Whether prometheus_client keeps its values in per-process files (workers > 1)."""
    return _values.ValueClass is not _values.MutexValue


def _reset(gauge: Any) -> None:
    for child in list(gauge._metrics.values()):
        child.set(0)
    gauge.clear()
