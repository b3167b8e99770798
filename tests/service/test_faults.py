"""Redis down, slow and back; overload; the history store switched to strict mode."""
import concurrent.futures as cf
import time

import pytest

from service.history import HistoryError
from service.settings import Settings
from tests.helpers import metric, wait_until


def settings(world, redis, **kw) -> Settings:
    base = dict(bundle=str(world["root"]), redis_url=redis.url, watch_interval_s=0,
                redis_timeout_ms=100, redis_retry_after_ms=200)
    return Settings(**{**base, **kw})


def seed_history(redis, world, user="u") -> list[str]:
    ds = world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[0][::-1]]
    c = redis.client()
    c.delete(f"sine:history:{user}")
    c.rpush(f"sine:history:{user}", *hist)
    return hist


def personalized(c) -> bool:
    return c.post("/recommend", json={"user_id": "u", "n": 5}).json()["fallback"] is None


def test_redis_down_then_back(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    with serve(settings(small_world, own_redis)) as c:
        assert c.post("/recommend", json={"user_id": "u", "n": 5}).json()["fallback"] is None
        own_redis.stop()
        for _ in range(5):
            t0 = time.perf_counter()
            r = c.post("/recommend", json={"user_id": "u", "n": 5})
            assert r.status_code == 200
            assert r.json()["fallback"] == "history_unavailable"
            assert len(r.json()["items"]) == 5
            assert time.perf_counter() - t0 < 5.0        # no hang on the dead connection
        # readiness is this pod's own state: a Redis outage must not take every pod out of
        # the Service, or the fallback answers above would never be served
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"].startswith("unavailable")
        health = c.get("/health/redis")
        assert health.status_code == 503 and "redis" in health.json()["detail"]
        assert metric(c, "sine_redis_up") == 0
        ev = c.post("/events", json={"user_id": "u", "item_id": "1", "event_id": "e-9"})
        assert ev.status_code == 503 and "may not have been recorded" in ev.json()["detail"]
        assert "same event_id" in ev.json()["detail"] and ev.headers["retry-after"] == "1"
        assert metric(c, "sine_fallbacks_total", reason="history_unavailable") >= 5
        assert metric(c, "sine_redis_errors_total", op="read") >= 1

        own_redis.start()                  # same port, empty: the history must be loaded again
        seed_history(own_redis, small_world)
        wait_until(lambda: personalized(c), 2.0, "personalized again after Redis returned")
        assert c.get("/readyz").json()["redis"] == "ok"
        assert c.get("/health/redis").status_code == 200 and metric(c, "sine_redis_up") == 1


def test_slow_redis_times_out_to_fallback(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    with serve(settings(small_world, own_redis, redis_timeout_ms=50)) as c:
        own_redis.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
        r = c.post("/recommend", json={"user_id": "u", "n": 5})
        # the fallback is the proof: had it waited out the pause, the history would be there
        assert r.status_code == 200 and r.json()["fallback"] == "history_unavailable"
        wait_until(lambda: personalized(c), 4.0, "personalized once the pause ended")


def test_strict_mode_answers_503(small_world, own_redis, serve):
    with serve(settings(small_world, own_redis, on_history_unavailable="error")) as c:
        own_redis.stop()
        r = c.post("/recommend", json={"user_id": "u", "n": 5})
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        assert "history store is unavailable" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"


def test_overload_is_refused_fast(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    s = settings(small_world, own_redis, max_in_flight=2, redis_timeout_ms=800)
    with serve(s) as c:
        own_redis.client().execute_command("CLIENT", "PAUSE", 1000, "ALL")

        def call(_):
            t0 = time.perf_counter()
            r = c.post("/recommend", json={"user_id": "u", "n": 5})
            return r.status_code, time.perf_counter() - t0, r

        with cf.ThreadPoolExecutor(8) as ex:
            out = list(ex.map(call, range(8)))
        refused = [o for o in out if o[0] == 429]
        admitted = [o for o in out if o[0] == 200]
        assert len(admitted) >= 2 and len(refused) >= 1
        # refused at once, not queued: each before any admitted one (those wait for Redis)
        assert max(o[1] for o in refused) < min(o[1] for o in admitted)
        assert refused[0][2].headers["retry-after"] == "1"
        assert "in flight" in refused[0][2].json()["detail"]
        wait_until(lambda: c.post("/recommend", json={"user_id": "u", "n": 5}).status_code == 200,
                   3.0, "admitted again once Redis answers")


def test_without_redis_every_user_is_cold(small_world, serve):
    s = Settings(bundle=str(small_world["root"]), watch_interval_s=0)
    with serve(s) as c:
        r = c.post("/recommend", json={"user_id": "u", "n": 4})
        assert r.status_code == 200 and r.json()["fallback"] == "cold_start"
        assert c.get("/readyz").json()["redis"] == "not configured"
        assert c.post("/events", json={"user_id": "u", "item_id": "1"}).status_code == 503


def test_exhausted_catalog_returns_what_is_left(small_world, own_redis, serve):
    ds = small_world["ds"]
    n_items = ds.n_items
    c_r = own_redis.client()
    c_r.rpush("sine:history:all", *[ds.item_ids[i] for i in range(1, n_items - 4)])   # 5 unseen
    s = settings(small_world, own_redis, history_keep=1000, max_n=100, redis_timeout_ms=1000)
    with serve(s) as c:
        r = c.post("/recommend", json={"user_id": "all", "n": 20})
        items = [x["item_id"] for x in r.json()["items"]]
        assert sorted(items) == sorted(ds.item_ids[i] for i in range(n_items - 4, n_items + 1))


def test_timeouts_do_not_pause_redis_but_a_refused_connection_does(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    s = settings(small_world, own_redis, redis_timeout_ms=50, redis_retry_after_ms=1500)
    with serve(s) as c:
        # long enough for three requests on a loaded machine; the ping below waits it out
        own_redis.client().execute_command("CLIENT", "PAUSE", 2000, "ALL")
        for _ in range(3):
            r = c.post("/recommend", json={"user_id": "u", "n": 5})
            assert r.json()["fallback"] == "history_unavailable"
        # timeouts did not pause Redis: the first request after the stall is personalized
        own_redis.client().ping()                  # blocks until the pause is over
        assert personalized(c)
        own_redis.stop()
        assert c.post("/recommend", json={"user_id": "u", "n": 5}).json()["fallback"] == \
            "history_unavailable"
        own_redis.start()
        seed_history(own_redis, small_world)
        # back, but the pause (1.5 s) after the refused connection still holds
        t0 = time.monotonic()
        assert c.post("/recommend", json={"user_id": "u", "n": 5}).json()["fallback"] == \
            "history_unavailable"
        wait_until(lambda: personalized(c), 3.0, "personalized after the pause")
        assert time.monotonic() - t0 > 0.5          # not before the pause ran out


def test_stale_pooled_connections_reconnect_after_a_redis_restart(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    s = settings(small_world, own_redis, redis_retry_after_ms=5000)
    with serve(s) as c:
        with cf.ThreadPoolExecutor(8) as ex:       # fill the pool with several connections
            list(ex.map(lambda _: c.post("/recommend", json={"user_id": "u", "n": 5}), range(32)))
        own_redis.stop()
        own_redis.start()                          # no request saw it down: nothing paused
        seed_history(own_redis, small_world)
        with cf.ThreadPoolExecutor(8) as ex:
            flags = list(ex.map(lambda _: c.post("/recommend", json={"user_id": "u", "n": 5})
                                .json()["fallback"], range(32)))
        assert flags == [None] * 32


def test_a_read_connection_that_goes_silent_is_replaced(small_world, own_redis, serve):
    """The read connection silenced without being closed (a failover behind a stable address):
    reads time out until it is taken as dead and a new one is opened; personalized again within
    a few seconds, without a restart."""
    from devtools.local import TcpProxy

    seed_history(own_redis, small_world)
    proxy = TcpProxy(own_redis.port)
    try:
        s = settings(small_world, own_redis, redis_url=proxy.url, redis_timeout_ms=100,
                     redis_retry_after_ms=5000)
        with serve(s) as c:
            assert personalized(c)
            proxy.silence()                            # every open connection; new ones work
            flags = [c.post("/recommend", json={"user_id": "u", "n": 5}).json()["fallback"]
                     for _ in range(3)]
            assert "history_unavailable" in flags
            wait_until(lambda: personalized(c), 5.0, "personalized on a new read connection")
            wait_until(lambda: c.get("/health/redis").status_code == 200, 5.0, "health back")
            assert metric(c, "sine_redis_errors_total", op="read") >= 1
    finally:
        proxy.close()


def test_a_black_hole_is_reported_and_personalization_returns_after_it(small_world, own_redis,
                                                                         serve):
    from devtools.local import TcpProxy

    seed_history(own_redis, small_world)
    proxy = TcpProxy(own_redis.port)
    try:
        s = settings(small_world, own_redis, redis_url=proxy.url, redis_timeout_ms=100)
        with serve(s) as c:
            assert personalized(c)
            proxy.silence(new=True)                    # nothing answers, nothing closes
            for _ in range(10):
                r = c.post("/recommend", json={"user_id": "u", "n": 5})
                assert r.status_code == 200 and r.json()["fallback"] == "history_unavailable"
            assert c.get("/health/redis").status_code == 503
            assert metric(c, "sine_redis_up") == 0
            # every dead read connection was dropped: at most a few stay open behind the proxy
            assert proxy.open_connections() < 20, proxy.open_connections()
            proxy.forward()
            wait_until(lambda: personalized(c), 5.0, "personalized once Redis answers again")
            assert c.get("/health/redis").status_code == 200
    finally:
        proxy.close()


def test_the_store_reports_a_silent_read_connection_and_replaces_it(own_redis):
    import asyncio

    from devtools.local import TcpProxy
    from service.history import HistoryStore

    own_redis.client().rpush("sine:history:u", "a", "b")
    proxy = TcpProxy(own_redis.port)

    async def main():
        store = HistoryStore(Settings(redis_url=proxy.url, redis_timeout_ms=100))
        try:
            assert await store.get_many(["u"]) == [["a", "b"]]
            await store.ping()
            proxy.silence()
            await store.client.connection_pool.disconnect()   # redis-py's own: fresh ones work
            with pytest.raises(HistoryError):
                await store.ping()                     # the read path's own connection is dead
            assert store.reader.dropped == 1 and store.available
            assert await store.get_many(["u"]) == [["a", "b"]]   # on a new connection
            await store.ping()
        finally:
            await store.close()
    try:
        asyncio.run(main())
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["wrongtype", "oom"])
def test_a_failing_event_never_pauses_reads(small_world, own_redis, serve, fault):
    seed_history(own_redis, small_world)
    r = own_redis.client()
    s = settings(small_world, own_redis, redis_retry_after_ms=60_000)
    with serve(s) as c:
        if fault == "wrongtype":
            r.set("sine:history:w", "not a list")
        else:
            r.config_set("maxmemory", 1)              # every write refused: OOM
        try:
            for _ in range(3):
                ev = c.post("/events", json={"user_id": "w", "item_id": "1"})
                assert ev.status_code == 503, ev.text
                assert personalized(c)                 # reads go on at once
        finally:
            r.config_set("maxmemory", 0)
        ok = c.post("/events", json={"user_id": "ok", "item_id": small_world["ds"].item_ids[1]})
        assert ok.status_code in (200, 201, 202), ok.text    # writes are not paused either


def test_a_write_stall_holds_events_in_their_own_pool_never_reads(small_world, own_redis, serve):
    seed_history(own_redis, small_world)
    s = settings(small_world, own_redis, max_in_flight=4, max_events_in_flight=2,
                 redis_write_timeout_ms=1500, redis_timeout_ms=500)
    with serve(s) as c:
        own_redis.client().execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        with cf.ThreadPoolExecutor(8) as ex:
            events = [ex.submit(c.post, "/events", json={"user_id": f"e{i}", "item_id": "1"})
                      for i in range(8)]
            wait_until(lambda: metric(c, "sine_in_flight_requests") >= 2, 5.0, "events in flight")
            reads = [c.post("/recommend", json={"user_id": "u", "n": 5}) for _ in range(6)]
            statuses = sorted(f.result().status_code for f in events)
        assert [r.status_code for r in reads] == [200] * 6
        assert all(r.json()["fallback"] is None for r in reads)        # reads are not paused
        assert statuses.count(429) >= 1 and set(statuses) <= {200, 429, 503}
