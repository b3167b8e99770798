import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from service.metrics import STAGE_BUCKETS, observe_n


def _pair():
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    return (r1, Histogram("h", "h", ["s"], buckets=STAGE_BUCKETS, registry=r1).labels("x"),
            r2, Histogram("h", "h", ["s"], buckets=STAGE_BUCKETS, registry=r2).labels("x"))


@pytest.mark.parametrize("n", [1, 2, 20])
def test_observe_n_records_what_n_observations_do(n):
    """Against n calls of `observe`: amounts on and between the bucket bounds, and past them."""
    r1, once, r2, each = _pair()
    amounts = [*STAGE_BUCKETS, 0.0, 2.0, *np.random.default_rng(n).uniform(0, 0.06, 40)]
    for a in amounts:
        observe_n(once, float(a), n)
        for _ in range(n):
            each.observe(float(a))
    a, b = _samples(r1), _samples(r2)
    assert a.pop("h_sum") == pytest.approx(b.pop("h_sum"), rel=1e-12)
    assert a == b and len(a) == len(STAGE_BUCKETS) + 2       # the buckets, +Inf, the count


def _samples(r):
    return {s.name + s.labels.get("le", ""): s.value for m in r.collect() for s in m.samples
            if not s.name.endswith("_created")}
