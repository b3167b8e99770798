"""Helpers the tests share: a redis-server with a client, waiting on a condition with a
deadline, reading /metrics, a bundle root of aged versions."""
import os
import shutil
import time
from pathlib import Path

import redis

from devtools.local import EmbeddedRedis


class RedisServer(EmbeddedRedis):
    """The service's embedded redis-server, plus a client for the tests' own reads and writes."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


def wait_until(condition, timeout_s: float = 5.0, what: str = "the condition",
               every_s: float = 0.02):
    """Poll `condition()` until it is truthy (returned) or the deadline passes (fails)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s} s")
        time.sleep(every_s)


def metric(client, name: str, **labels: str) -> float:
    """The value of one Prometheus sample of `/metrics` (0 when absent), parsed by
    prometheus_client's own parser; `name` is the sample name (`..._total`, `..._bucket`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def gauge_reaches(client, name: str, value: float, timeout_s: float = 5.0, **labels: str) -> None:
    """Wait for a scrape-time Redis gauge to read `value`: the service reads Redis for them at
    most once a second (`lifecycle.freshness`), so a scrape right after a change may show the
    last reading."""
    wait_until(lambda: metric(client, name, **labels) == value, timeout_s,
               f"{name} = {value} (last {metric(client, name, **labels)})")


def aged_versions(src: Path, root: Path, n: int) -> None:
    """root/v0 .. v{n-1}, copies of the bundle version `src`, v0 the oldest by manifest mtime
    (the order retention goes by)."""
    for k in range(n):
        shutil.copytree(src, root / f"v{k}")
        os.utime(root / f"v{k}" / "manifest.json", (1e9 + k, 1e9 + k))
