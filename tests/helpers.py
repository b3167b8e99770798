"""Helpers the tests share: a redis-server with a client, waiting on a condition with a
deadline, reading /metrics."""
import time

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
