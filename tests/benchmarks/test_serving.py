"""The serving benchmark's stage means: read from the service's own metrics, per interval."""
import pytest
from prometheus_client import generate_latest

from benchmarks.serving import counters_of, since, stage_means
from service.metrics import Metrics


def test_stage_means_of_an_interval_leave_out_what_came_before():
    m = Metrics()
    for dt in (0.010, 0.030):                        # a warm-up: two slow requests
        m.stage_child("encode").observe(dt)
    m.batch_size.observe(32)
    before = counters_of(generate_latest(m.registry).decode())
    for dt in (0.001, 0.002, 0.003):                 # the measured interval
        m.stage_child("encode").observe(dt)
        m.stage_child("window").observe(dt / 2)
    m.batch_size.observe(1)
    m.batch_size.observe(2)
    after = counters_of(generate_latest(m.registry).decode())

    whole = stage_means(after)
    assert whole["encode"] == pytest.approx((0.010 + 0.030 + 0.006) / 5 * 1000)
    assert whole["mean_batch"] == pytest.approx(35 / 3)
    interval = stage_means(since(after, before))
    assert interval["encode"] == pytest.approx(2.0)
    assert interval["window"] == pytest.approx(1.0)
    assert interval["mean_batch"] == pytest.approx(1.5)


def test_a_stage_not_timed_in_an_interval_has_no_mean():
    m = Metrics()
    m.stage_child("popularity").observe(0.004)
    c = counters_of(generate_latest(m.registry).decode())
    assert "popularity" not in stage_means(since(c, c))
    assert "mean_batch" not in stage_means(since(c, c))
