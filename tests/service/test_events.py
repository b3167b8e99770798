"""POST /events and the click log, over real HTTP and a real redis-server: history and log
written together or not at all, retries with an event_id stored once, the stream's cap, and the
freshness gauges in /metrics."""
import concurrent.futures as cf
import json
import time

import pytest

from service.settings import Settings
from tests.helpers import metric


@pytest.fixture
def events(small_world, own_redis, serve):
    def make(**kw):
        s = Settings(bundle=str(small_world["root"]), redis_url=own_redis.url,
                     watch_interval_s=0, history_keep=5, **{"metrics_redis_every_s": 0, **kw})
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


def test_the_log_can_be_off(events, own_redis):
    with events(click_log=False) as c:
        assert c.post("/events", json={"user_id": "u", "item_id": "1"}).status_code == 200
        assert own_redis.client().xlen("sine:clicks") == 0
        assert own_redis.client().lindex("sine:history:u", 0) == "1"


@pytest.fixture
def small_nodes(small_world, serve):
    """A Redis whose stream nodes hold 10 entries (Redis's default is 100), so that the
    approximate trimming the event script does shows at a few hundred clicks."""
    from tests.helpers import RedisServer

    r = RedisServer(args=["--stream-node-max-entries", "10"]).start()

    def make(**kw):
        return serve(Settings(bundle=str(small_world["root"]), redis_url=r.url,
                              watch_interval_s=0, history_keep=5, metrics_redis_every_s=0, **kw))
    yield r, make
    r.cleanup()


def post(c, n, start=0):
    for i in range(start, start + n):
        assert c.post("/events", json={"user_id": f"u{i % 7}", "item_id": str(i)}).status_code \
            == 200


def test_the_cap_never_trims_what_was_not_exported(small_nodes, tmp_path):
    """The finding: with a cap of 100, 2,050 accepted clicks gave 200 exported rows, and the
    export reported success."""
    from model_export.data import read_clicks
    from model_export.freshness.clicklog import export_clicks

    redis, make = small_nodes
    r = redis.client()
    with make(click_stream_max_len=50) as c:
        post(c, 300)                                    # no export group yet: nothing trimmed
        assert r.xlen("sine:clicks") == 300
        assert metric(c, "sine_click_log_lag") == 300   # the whole log, until the group exists
        first = export_clicks(redis.url, tmp_path / "clicks")
        assert first.written == 300 and first.lost == 0
        post(c, 300, start=300)                          # acknowledged entries may go now
        assert 50 <= r.xlen("sine:clicks") <= 300 + 10
        r.xreadgroup("sine-export", "slow", {"sine:clicks": ">"}, count=100)  # read, not acked
        post(c, 200, start=600)
        pending = r.xpending("sine:clicks", "sine-export")
        assert pending["pending"] == 100
        assert r.xrange("sine:clicks", pending["min"], pending["min"])   # still there
        res = export_clicks(redis.url, tmp_path / "clicks", claim_idle_s=0)
        assert res.lost == 0 and res.written == 500
        assert metric(c, "sine_click_log_lag") == 0 and metric(c, "sine_click_log_lost_entries") == 0
    assert len(list(read_clicks(tmp_path / "clicks"))) == 800       # every click accepted


def test_the_cap_wins_when_told_and_every_lost_entry_is_counted(small_nodes, tmp_path, capsys):
    from sine_cli.main import main

    redis, make = small_nodes
    r = redis.client()
    with make(click_stream_max_len=50, click_stream_trim="cap") as c:
        post(c, 300)
        assert r.xlen("sine:clicks") == 50                          # exactly the cap
        assert metric(c, "sine_click_log_lost_entries") == 250
        out = tmp_path / "clicks"
        assert main(["export-clicks", "--redis-url", redis.url, "--out", str(out)]) == 5
        err = capsys.readouterr().err
        assert "250 clicks were lost" in err and "250 removed unexported by the cap" in err
        post(c, 20, start=300)                # acknowledged ones go first, and are not lost
        assert main(["export-clicks", "--redis-url", redis.url, "--out", str(out)]) == 0
        assert metric(c, "sine_click_log_lost_entries") == 250      # nothing more lost


def test_the_cap_counts_no_entry_an_export_has_in_hand_as_lost(small_nodes, tmp_path,
                                                                monkeypatch):
    """The finding: cap mode counted the entries an export had read but not yet acknowledged as
    lost when it trimmed them, and the next export exited 5 though every click was written."""
    from model_export.data import read_clicks
    from model_export.freshness import clicklog

    redis, make = small_nodes
    r = redis.client()
    out = tmp_path / "clicks"
    with make(click_stream_max_len=50, click_stream_trim="cap") as c:
        post(c, 30)
        assert clicklog.export_clicks(redis.url, out).written == 30      # the group, acked
        post(c, 40, start=30)                  # the 30 acknowledged go: 40 unread remain
        assert r.xlen("sine:clicks") == 40
        handle, hooked = clicklog.Exporter.handle, []

        def mid_export(self, entries, res):    # 10 read and in hand: 20 clicks arrive, and
            if not hooked:                     # the cap trims the 10 oldest, those 10
                hooked.append(len(entries))
                post(c, 20, start=70)
                assert r.xlen("sine:clicks") == 50
            return handle(self, entries, res)
        monkeypatch.setattr(clicklog.Exporter, "handle", mid_export)
        res = clicklog.export_clicks(redis.url, out, batch=10)
        monkeypatch.undo()
        assert hooked == [10] and res.written == 60 and res.lost == 0
        assert metric(c, "sine_click_log_lost_entries") == 0
        assert clicklog.export_clicks(redis.url, out).lost == 0              # no exit 5 after
        assert len(list(read_clicks(out))) == 90                             # every click
        # an entry trimmed before any export read it is still lost, and counted
        post(c, 60, start=90)
        assert metric(c, "sine_click_log_lost_entries") == 10
        assert clicklog.export_clicks(redis.url, out).lost == 10


def test_age_limits_trim_only_acknowledged_entries(small_nodes, tmp_path):
    from model_export.freshness.clicklog import export_clicks

    redis, make = small_nodes
    r = redis.client()
    for k in range(30):                     # entries two hours old by Redis's own clock
        t = int(r.time()[0]) - 7200
        r.xadd("sine:clicks", {"user": "old", "item": str(k), "ts": str(t * 1000),
                               "event": f"o{k}"}, id=f"{t * 1000}-{k}")
    with make(click_stream_max_age_s=3600) as c:
        post(c, 5)
        assert r.xlen("sine:clicks") == 35                          # not exported: kept
        assert export_clicks(redis.url, tmp_path / "c").written == 35
        post(c, 5, start=5)
        assert r.xlen("sine:clicks") < 20                           # acknowledged and old: gone
        assert all(int(sid.split("-")[0]) > (int(r.time()[0]) - 3600) * 1000
                   for sid, _ in r.xrange("sine:clicks", count=5)[-5:])


def test_event_ids_are_scoped_by_user(events, own_redis, tmp_path):
    """The finding: a second user sending a first user's event_id got `duplicate: true`, and
    the click was dropped; with shards the export then skipped one of the two."""
    from model_export.data import read_clicks
    from model_export.freshness.clicklog import export_clicks

    with events() as c:
        a = c.post("/events", json={"user_id": "alice", "item_id": "1", "event_id": "e-1"})
        b = c.post("/events", json={"user_id": "bob", "item_id": "2", "event_id": "e-1"})
        assert a.json()["duplicate"] is False and b.json()["duplicate"] is False
        again = c.post("/events", json={"user_id": "bob", "item_id": "2", "event_id": "e-1"})
        assert again.json()["duplicate"] is True
    assert export_clicks(own_redis.url, tmp_path / "clicks").written == 2
    assert sorted((u, i) for u, i, _, _ in read_clicks(tmp_path / "clicks")) == \
        [("alice", "1"), ("bob", "2")]


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


def test_an_events_token_guards_the_write_path(events, own_redis):
    with events(events_token="w-tok") as c:
        r = c.post("/events", json={"user_id": "u", "item_id": "1"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/events", content="{broken", headers={"content-type": "application/json"})
        assert r.status_code == 401                          # before the body is even read
        assert own_redis.client().llen("sine:history:u") == 0
        ok = c.post("/events", json={"user_id": "u", "item_id": "1"},
                    headers={"Authorization": "Bearer w-tok"})
        assert ok.status_code == 200 and own_redis.client().lindex("sine:history:u", 0) == "1"
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).status_code == 200  # reads open


def test_without_an_export_group_the_hard_cap_refuses_and_writes_nothing(small_nodes, tmp_path):
    """The finding: with `trim=exported` and no export group nothing was ever trimmed, so
    events to new users filled Redis."""
    from model_export.freshness.clicklog import export_clicks

    redis, make = small_nodes
    r = redis.client()
    with make(click_stream_max_len=50, click_stream_hard_max_len=100) as c:
        post(c, 100)
        res = c.post("/events", json={"user_id": "new", "item_id": "1", "event_id": "e1"})
        assert res.status_code == 503 and res.headers["retry-after"] == "60"
        assert res.json()["type"] == "/problems/click-log-full"
        assert "SINE_CLICK_STREAM_HARD_MAX_LEN" in res.json()["detail"]
        assert r.xlen("sine:clicks") == 100 and not r.exists("sine:history:new")
        assert not r.exists("sine:event:new:e1")           # a retry is not a duplicate
        assert metric(c, "sine_events_total", outcome="refused_full") == 1
        assert c.post("/recommend", json={"user_id": "u1", "n": 5}).json()["fallback"] is None
        assert export_clicks(redis.url, tmp_path / "clicks").written == 100
        again = c.post("/events", json={"user_id": "new", "item_id": "1", "event_id": "e1"})
        assert again.status_code == 200 and again.json()["duplicate"] is False
        assert r.xlen("sine:clicks") <= 100


def test_the_hard_cap_can_trim_instead_and_counts_what_it_removes(small_nodes):
    redis, make = small_nodes
    with make(click_stream_max_len=50, click_stream_hard_max_len=100,
              click_stream_overflow="trim") as c:
        post(c, 300)
        assert redis.client().xlen("sine:clicks") == 100
        assert metric(c, "sine_click_log_lost_entries") == 200


@pytest.mark.parametrize("ttl", [0.0, 3600.0])
def test_histories_expire_after_the_last_event(events, own_redis, ttl):
    from service.history.bulk import load_histories

    r = own_redis.client()
    with events(history_ttl_s=ttl) as c:
        assert c.post("/events", json={"user_id": "u", "item_id": "1"}).status_code == 200
        left = r.pttl("sine:history:u")
        assert left == -1 if ttl == 0 else 0 < left <= ttl * 1000
    s = Settings(redis_url=own_redis.url, history_ttl_s=ttl)
    assert load_histories(s, [("loaded", ["1", "2"])]) == 1
    left = r.pttl("sine:history:loaded")
    assert left == -1 if ttl == 0 else 0 < left <= ttl * 1000


def test_redis_memory_use_is_a_gauge_for_the_alert(events, own_redis):
    r = own_redis.client()
    with events() as c:
        assert metric(c, "sine_redis_memory_used_ratio") == 0          # no maxmemory: absent
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used * 4)
        try:
            ratio = metric(c, "sine_redis_memory_used_ratio")
        finally:
            r.config_set("maxmemory", 0)
        assert 0.1 < ratio < 0.5, ratio


def test_a_flood_of_scrapes_reads_redis_once_a_second(events, own_redis):
    """The finding: /metrics was not admitted and cost 1 + 3 x shards Redis round trips each, so
    a scrape flood was a Redis load. Now concurrent scrapes share one reading, and one a second
    at most is made."""
    import concurrent.futures as cf
    r = own_redis.client()
    with events(metrics_redis_every_s=1.0) as c:
        c.get("/metrics")
        before = r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda _: c.get("/metrics").status_code, range(40)))
        took = time.monotonic() - t0
        after = r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
    assert codes == [200] * 40
    readings = after - before                        # one ping a reading
    assert readings <= int(took) + 2 and readings < 40, (readings, took)


@pytest.mark.parametrize("created, aged", [("2026-01-01T00:00:00.250Z", True),
                                           ("2026-01-01T00:00:00+02:00", True),
                                           ("last tuesday", False)])
def test_a_scrape_never_fails_on_a_bundles_metadata(small_world, own_redis, serve, tmp_path,
                                                   created, aged):
    import shutil

    from index_builder import bundle

    root = tmp_path / "root"
    shutil.copytree(small_world["bundle"].path, root / "v1")
    m = json.loads((root / "v1" / "manifest.json").read_text())
    m["created"] = created
    (root / "v1" / "manifest.json").write_text(json.dumps(m))
    bundle.set_current(root, "v1")
    (root / "refresh.json").write_text(json.dumps({"outcome": "refused", "version": 3,
                                                   "finished_unix": "soon",
                                                   "gate": {"metrics": [1, 2]}}))
    s = Settings(bundle=str(root), redis_url=own_redis.url, watch_interval_s=0)
    with serve(s) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert (metric(c, "sine_bundle_age_seconds") > 0) == aged
        assert metric(c, "sine_refresh_last", outcome="refused", version="3") == 1
        (root / "refresh.json").write_text(json.dumps({"outcome": "published",
                                                       "gate": {"metrics": {"live": 5}}}))
        assert c.get("/metrics").status_code == 200
        (root / "refresh.json").write_text("[1, 2]")
        assert c.get("/metrics").status_code == 200


def test_a_read_token_guards_the_recommend_routes(events, own_redis):
    with events(read_token="r-tok") as c:
        for path, body in (("/recommend", {"user_id": "u", "n": 3}),
                           ("/recommend/batch", {"requests": [{"user_id": "u", "n": 3}]})):
            r = c.post(path, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = c.post(path, json=body, headers={"Authorization": "Bearer r-tok"})
            assert ok.status_code == 200, ok.text
        assert c.get("/livez").status_code == 200                     # probes stay open
        assert c.post("/events", json={"user_id": "u", "item_id": "1"}).status_code == 200


def test_event_keys_never_collide_across_users_and_int_ids_are_capped(events, own_redis):
    from service.history import Keys

    k = Keys(Settings())
    assert k.event("a", "b:c") != k.event("a:b", "c")
    assert k.event("a%3Ab", "c") != k.event("a:b", "c")
    with events() as c:
        first = c.post("/events", json={"user_id": "a", "item_id": "1", "event_id": "b:c"})
        second = c.post("/events", json={"user_id": "a:b", "item_id": "2", "event_id": "c"})
        assert first.json()["duplicate"] is False and second.json()["duplicate"] is False
        long = int("9" * 129)                               # 129 digits: past the 128 cap
        for path, body in (("/events", {"user_id": long, "item_id": "1"}),
                           ("/recommend", {"user_id": long, "n": 3})):
            r = c.post(path, json=body)
            assert r.status_code == 422 and "user_id" in r.json()["detail"], r.text
        assert c.post("/recommend", json={"user_id": int("9" * 128), "n": 3}).status_code == 200
        assert c.post("/recommend", json={"user_id": -int("9" * 127), "n": 3}).status_code == 200
