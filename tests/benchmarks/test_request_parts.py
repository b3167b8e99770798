import pytest

from benchmarks import request_parts


def _runs(floor, direct):
    return [{"rps": r} for r in floor], [{"rps": r} for r in direct]


def test_the_budget_is_what_the_goal_leaves_past_the_direct_routes_floor():
    f1, d1 = _runs([3000, 4000, 3500], [5000, 4000, 6000])
    f32, d32 = _runs([4000, 4400, 5000], [10000, 9000, 11000])
    got = request_parts.budgets({"results": {"batching": {"runs": {
        "1/floor": f1, "1/floor/asgi": d1, "32/floor": f32, "32/floor/asgi": d32}}}})
    # 1 connection: half the floor's rate leaves 1 / (0.5 x 3500) s a request, of which the
    # direct route takes 1 / 5000 s (medians of the rounds)
    assert got[1]["budget_ms"] == pytest.approx(1000 / 1750 - 1000 / 5000)
    assert got[32]["budget_ms"] == pytest.approx(1000 / (0.75 * 4400) - 1000 / 10000)
    assert got[32]["floor_rps"] == 4400 and got[32]["direct_floor_rps"] == 10000
