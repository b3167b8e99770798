"""POST /events and the click log, over real HTTP and a real redis-server: history and log
written together or not at all, retries with an event_id stored once, the stream's cap, and the
freshness gauges in /metrics."""
import concurrent.futures as cf
import json

import pytest

from service.settings import Settings
from tests.helpers import metric


@pytest.fixture
def events(small_world, own_redis, serve):
    def make(**kw):
        s = Settings(bundle=str(small_world["root"]), redis_url=own_redis.url,
                     watch_interval_s=0, history_keep=5, **kw)
        return serve(s)
    return make


def log(redis, key="sine:clicks"):
    return [(sid, f) for sid, f in redis.client().xrange(key)]


def test_an_event_goes_to_the_history_and_the_log(events, own_redis):
    with events() as c:
        r = c.post("/events", json={"user_id": "u1", "item_id": "42"})
        body = r.json()
        assert r.status_code == 200 and body["duplicate"] is False
        entries = log(own_redis)
        assert len(entries) == 1
        f = entries[0][1]
        assert (f["user"], f["item"], f["event"]) == ("u1", "42", body["event_id"])
        assert abs(int(f["ts"]) - int(entries[0][0].split("-")[0])) < 1000   # ms, server time
        assert own_redis.client().lrange("sine:history:u1", 0, -1) == ["42"]
        assert metric(c, "sine_events_total", outcome="recorded") == 1


def test_a_retried_event_id_is_stored_once(events, own_redis):
    with events() as c:
        first = c.post("/events", json={"user_id": "u", "item_id": "7", "event_id": "e-1"}).json()
        with cf.ThreadPoolExecutor(8) as ex:            # retries, some at the same time
            again = list(ex.map(lambda _: c.post("/events", json={
                "user_id": "u", "item_id": "7", "event_id": "e-1"}).json(), range(8)))
        assert first["duplicate"] is False and first["event_id"] == "e-1"
        assert all(a["duplicate"] and a["event_id"] == "e-1" for a in again)
        assert own_redis.client().lrange("sine:history:u", 0, -1) == ["7"]
        assert [f["event"] for _, f in log(own_redis)] == ["e-1"]
        other = c.post("/events", json={"user_id": "u", "item_id": "7", "event_id": "e-2"})
        assert other.json()["duplicate"] is False and len(log(own_redis)) == 2
        assert metric(c, "sine_events_total", outcome="duplicate") == 8
        r = c.post("/events", json={"user_id": "u", "item_id": "7", "event_id": "x" * 200})
        assert r.status_code == 422 and "event_id" in r.json()["detail"]


@pytest.mark.parametrize("broken", ["history", "stream"])
def test_history_and_log_are_written_together_or_not_at_all(events, own_redis, broken):
    r = own_redis.client()
    r.rpush("sine:history:u", "old")
    r.xadd("sine:clicks", {"user": "x", "item": "y", "ts": "0", "event": "e0"})
    key = {"history": "sine:history:u", "stream": "sine:clicks"}[broken]
    r.delete(key)
    r.set(key, "not the right type")
    with events() as c:
        res = c.post("/events", json={"user_id": "u", "item_id": "9"})
        assert res.status_code == 503 and "another type" in res.json()["detail"]
    if broken == "history":
        assert len(r.xrange("sine:clicks")) == 1                # the log is untouched
    else:
        assert r.lrange("sine:history:u", 0, -1) == ["old"]      # the history is untouched


def test_the_log_is_capped_and_can_be_off(events, own_redis):
    with events(click_stream_max_len=50) as c:
        for i in range(400):
            c.post("/events", json={"user_id": f"u{i % 7}", "item_id": str(i)})
        n = own_redis.client().xlen("sine:clicks")
        assert 50 <= n < 400                                     # trimmed, approximately
    own_redis.client().delete("sine:clicks")
    with events(click_log=False) as c:
        assert c.post("/events", json={"user_id": "u", "item_id": "1"}).status_code == 200
        assert own_redis.client().xlen("sine:clicks") == 0
        assert own_redis.client().lindex("sine:history:u", 0) == "1"


def test_freshness_gauges(events, own_redis, small_world, tmp_path):
    with events() as c:
        for i in range(5):
            c.post("/events", json={"user_id": "u", "item_id": str(i)})
        own_redis.client().xgroup_create("sine:clicks", "sine-export", id="0")
        own_redis.client().xreadgroup("sine-export", "t", {"sine:clicks": ">"}, count=2)
        assert metric(c, "sine_click_log_entries") == 5
        assert metric(c, "sine_click_log_lag") == 3
        assert metric(c, "sine_bundle_age_seconds") > 0
        assert metric(c, "sine_refresh_last", outcome="published", version="v9") == 0
        report = {"outcome": "refused", "version": "v9", "finished_unix": 1.5e9,
                  "gate": {"metrics": {"candidate": {"HR@50": 0.1}, "live": {"HR@50": 0.4}}}}
        (small_world["root"] / "refresh.json").write_text(json.dumps(report))
        try:
            assert metric(c, "sine_refresh_last", outcome="refused", version="v9") == 1
            assert metric(c, "sine_refresh_last_metric", bundle="live", metric="HR@50") == 0.4
            assert metric(c, "sine_refresh_last_timestamp_seconds") == 1.5e9
        finally:
            (small_world["root"] / "refresh.json").unlink()


def test_a_cluster_shards_the_keys_unless_told_not_to():
    assert Settings(redis_url="redis://x:1/0", redis_cluster=True).shards == 16
    assert Settings(redis_url="redis://x:1/0").shards == 0
    with pytest.raises(ValueError, match="redis_shards"):
        Settings(redis_url="redis://x:1/0", redis_cluster=True, redis_shards=0)
    assert Settings(redis_url="redis://x:1/0", redis_cluster=True, redis_shards=0,
                    click_log=False).shards == 0


def test_a_users_keys_share_one_hash_tag():
    from service.history import Keys

    plain = Keys(Settings())
    assert plain.history("u1") == "sine:history:u1" and plain.streams() == ["sine:clicks"]
    k = Keys(Settings(redis_shards=8))
    streams = k.streams()
    assert len(streams) == 8 and len(set(streams)) == 8
    for u in ("alice", "bob", "{x}", "user-7"):
        tag = k.history(u).split(":", 1)[0]                 # "{sK}"
        assert tag.startswith("{s") and tag.endswith("}")
        assert k.event(u, "e1").startswith(tag + ":") and k.stream(u) in streams
        assert k.stream(u).startswith(tag + ":")
    assert {k.stream(f"user-{i}") for i in range(200)} == set(streams)   # all shards in use
