"""Rollouts against a real uvicorn and redis-server: two arms with sticky assignment, weights
changed live, a refused candidate that gets no traffic, and a shadow that is never served."""
import shutil

import pytest

from service.arms import CONTROL, Arms, Layout, unit
from service.settings import Settings
from tests.helpers import metric, wait_until

TOKEN = "r0llout"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def root(small_world, tmp_path_factory):
    """A bundle root: v1 current, v2 (the same model, another version), v3 corrupt."""
    from index_builder.make import make_bundle
    r = tmp_path_factory.mktemp("arms") / "bundles"
    shutil.copytree(small_world["root"], r)
    make_bundle(small_world["export"], r, version="v2", make_current=False, log=lambda *a: None)
    shutil.copytree(r / "v2", r / "v3")
    with open(r / "v3" / "index.faiss", "r+b") as f:       # its hash no longer matches
        f.seek(64)
        f.write(b"\x00" * 16)
    return r


def settings(root, redis=None, **kw):
    base = dict(bundle=str(root), watch_interval_s=0, admin_token=TOKEN,
                redis_url=redis.url if redis else None)
    return Settings(**{**base, **kw})


def arm_of(c, user):
    r = c.post("/recommend", json={"user_id": user, "n": 3})
    assert r.status_code == 200, r.text
    return r.json()["arm"]


def test_assignment_is_a_stable_share_of_users():
    users = [f"user-{i}" for i in range(20_000)]
    assert [unit("s", u) for u in users[:50]] == [unit("s", u) for u in users[:50]]
    assert unit("s", "a") != unit("t", "a")                   # the salt deals them afresh
    share = sum(unit("s", u) < 0.3 for u in users) / len(users)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(users)) ** 0.5

    class Eng:
        def __init__(self, arm):
            self.arm = arm
    from service.arms import Arm
    arms = Arms("s")
    control = Eng(CONTROL)
    arms.set(Layout((Arm("b", 0.2, Eng("b")), Arm("a", 0.1, Eng("a")))))
    got = {u: arms.pick(u, control).arm for u in users[:2000]}
    for u, arm in got.items():                               # name order: a then b
        x = unit("s", u)
        assert arm == ("a" if x < 0.1 else "b" if x < 0.3 else CONTROL)
    arms.set(Layout((Arm("b", 0.2, Eng("b")), Arm("a", 0.1, None, "refused"))))
    assert all(arms.pick(u, control).arm in ("b", CONTROL) for u in users[:2000])


def test_two_arms_sticky_across_requests_and_processes(root, serve):
    users = [f"u{i}" for i in range(120)]
    with serve(settings(root, arms={"v2": 0.5})) as c:
        first = {u: arm_of(c, u) for u in users}
        assert {u: arm_of(c, u) for u in users[:30]} == {u: first[u] for u in users[:30]}
        assert metric(c, "sine_arm_requests_total", arm="v2", outcome="cold_start") == \
            sum(a == "v2" for a in first.values()) + sum(first[u] == "v2" for u in users[:30])
    for u, arm in first.items():
        assert arm == ("v2" if unit("sine", u) < 0.5 else CONTROL)
    assert 30 < sum(a == "v2" for a in first.values()) < 90
    with serve(settings(root, arms={"v2": 0.5})) as again:     # another process, same users
        assert {u: arm_of(again, u) for u in users} == first
    with serve(settings(root, arms={"v2": 0.5})) as c:
        r = c.post("/recommend/batch", json={"requests": [{"user_id": u, "n": 2} for u in users]})
        arm_answer = [x["arm"] for x in r.json()["results"]]
    assert arm_answer == [first[u] for u in users]            # a batch splits by arm too


def test_weights_change_live_and_a_refused_candidate_gets_no_traffic(root, serve):
    users = [f"w{i}" for i in range(150)]
    with serve(settings(root)) as c:
        assert {arm_of(c, u) for u in users} == {CONTROL}     # no arms: everyone on control
        r = c.put("/admin/arms", json={"arms": {"v2": 0.2, "v3": 0.3}}, headers=ADMIN)
        assert r.status_code == 200, r.text
        by_name = {a["name"]: a for a in r.json()["arms"]}
        assert by_name["v2"]["status"] == "serving"
        assert by_name["v3"]["status"] == "refused" and "sha256" in by_name["v3"]["reason"]
        got = {u: arm_of(c, u) for u in users}
        assert "v3" not in got.values()
        for u, arm in got.items():
            assert arm == ("v2" if unit("sine", u) < 0.2 else CONTROL)
        assert c.get("/admin/arms", headers=ADMIN).json() == r.json()
        assert metric(c, "sine_reloads_total", outcome="refused") == 1
        wider = c.put("/admin/arms", json={"arms": {"v2": 0.6}}, headers=ADMIN)
        assert wider.status_code == 200
        moved = {u: arm_of(c, u) for u in users}
        assert all(moved[u] == "v2" for u in users if got[u] == "v2")   # nobody leaves v2
        assert sum(a == "v2" for a in moved.values()) > sum(a == "v2" for a in got.values())


def test_the_shadow_answers_off_the_response_path(root, own_redis, serve, small_world):
    ds = small_world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[0][::-1]]
    own_redis.client().rpush("sine:history:s", *hist)
    with serve(settings(root, own_redis, shadow="v2", shadow_rate=1.0)) as c:
        answers = [c.post("/recommend", json={"user_id": "s", "n": 5}).json() for _ in range(8)]
        assert {a["arm"] for a in answers} == {CONTROL} and answers[0]["fallback"] is None
        wait_until(lambda: metric(c, "sine_shadow_total", arm="v2", outcome="answered") == 8,
                   10, "the shadow answering every sampled request")
        # v2 is v1's model: its answers overlap the served ones entirely
        assert metric(c, "sine_shadow_overlap_count", arm="v2") == 8
        assert metric(c, "sine_shadow_overlap_sum", arm="v2") == pytest.approx(8.0)
        assert metric(c, "sine_shadow_duration_seconds_count", arm="v2") == 8
        layout = c.get("/admin/arms", headers=ADMIN).json()
        assert layout["shadow"] == {"name": "v2", "rate": 1.0, "status": "serving", "reason": None}


@pytest.mark.parametrize("body, said", [
    ({"arms": {"v2": 0.7, "v3": 0.6}}, "sum to 1.3"),
    ({"arms": {"v2": 1.5}}, "each must be in [0, 1]"),
    ({"arms": {"../etc": 0.1}}, "is not a version name"),
    ({"arms": {}, "shadow_rate": 2}, "shadow_rate"),
    ({"arms": {}, "extra": 1}, "extra")])
def test_a_bad_layout_is_refused_and_the_live_one_stays(root, serve, body, said):
    with serve(settings(root, arms={"v2": 0.1})) as c:
        before = c.get("/admin/arms", headers=ADMIN).json()
        r = c.put("/admin/arms", json=body, headers=ADMIN)
        assert r.status_code == 422 and said in r.text
        assert c.get("/admin/arms", headers=ADMIN).json() == before
        assert c.put("/admin/arms", json={"arms": {}}).status_code == 401      # no token
