"""The history store's read path against a real redis-server: batches in flight on one
connection, timeouts that must not hand replies to the wrong caller, error replies, AUTH and
SELECT, a restarted Redis; and the store's pause after a refused connection."""
import asyncio

import pytest
import redis

from devtools.local import EmbeddedRedis, free_port
from service.history import HistoryError, HistoryStore, ListReader
from service.settings import Settings
from tests.helpers import RedisServer


def fill(client, n: int = 50) -> dict[str, list[str]]:
    lists = {f"h:{i}": [f"i{i}-{j}" for j in range(i % 7 + 1)] for i in range(n)}
    for k, v in lists.items():
        client.delete(k)
        client.rpush(k, *v)
    return lists


def test_batches_in_flight_each_get_their_own_replies(redis_server):
    lists = fill(redis_server.client())
    keys = sorted(lists)

    async def main():
        r = ListReader(redis_server.url, None, 1.0)
        try:
            parts = [keys[i::5] + ["h:none"] for i in range(5)]
            got = await asyncio.gather(*(r.lranges(p, 19) for p in parts))
            return parts, got, await r.lranges(keys[:3], 1)
        finally:
            r.close()
    parts, got, short = asyncio.run(main())
    for p, g in zip(parts, got):
        assert g == [lists.get(k, []) for k in p]
    assert short == [lists[k][:2] for k in keys[:3]]


def test_a_timed_out_batch_never_answers_the_next_caller(own_redis):
    lists = fill(own_redis.client(), 10)
    keys = sorted(lists)

    async def main():
        r = ListReader(own_redis.url, None, 1.0)
        try:
            await r.lranges(keys[:1], 19)                    # connected
            own_redis.client().execute_command("CLIENT", "PAUSE", 300, "ALL")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await r.lranges(keys[:5], 19)            # its replies come later
            return await r.lranges(keys[5:], 19)              # queued behind them
        finally:
            r.close()
    assert asyncio.run(main()) == [lists[k] for k in keys[5:]]


def test_an_error_reply_fails_that_batch_only(redis_server):
    c = redis_server.client()
    c.set("h:string", "not a list")
    lists = fill(c, 3)

    async def main():
        r = ListReader(redis_server.url, None, 1.0)
        try:
            with pytest.raises(redis.RedisError, match="WRONGTYPE"):
                await r.lranges(["h:0", "h:string"], 19)
            return await r.lranges(["h:1"], 19)
        finally:
            r.close()
    assert asyncio.run(main()) == [lists["h:1"]]


def test_auth_and_database_from_the_url_or_the_password_setting():
    srv = RedisServer(args=["--requirepass", "s3cret"]).start()
    try:
        c = redis.Redis(port=srv.port, password="s3cret", db=3, decode_responses=True)
        c.rpush("h:a", "x", "y")

        async def read(url, password=None):
            r = ListReader(url, password, 1.0)
            try:
                return await r.lranges(["h:a"], 19)
            finally:
                r.close()
        base = f"127.0.0.1:{srv.port}"
        assert asyncio.run(read(f"redis://:s3cret@{base}/3")) == [["x", "y"]]
        assert asyncio.run(read(f"redis://{base}/3", "s3cret")) == [["x", "y"]]
        assert asyncio.run(read(f"redis://:s3cret@{base}/0")) == [[]]     # another database
        with pytest.raises(redis.ConnectionError, match="refused the connection"):
            asyncio.run(read(f"redis://:wrong@{base}/3"))
        with pytest.raises(redis.ConnectionError, match="refused the connection"):
            asyncio.run(read(f"redis://{base}/3"))                         # no password at all
    finally:
        srv.cleanup()


def test_a_restarted_redis_is_reconnected_at_once(own_redis):
    async def main():
        r = ListReader(own_redis.url, None, 1.0)
        try:
            own_redis.client().rpush("h:r", "before")
            assert await r.lranges(["h:r"], 19) == [["before"]]
            own_redis.stop()
            own_redis.start()                                # a fresh, empty Redis
            own_redis.client().rpush("h:r", "after")
            return await r.lranges(["h:r"], 19)
        finally:
            r.close()
    assert asyncio.run(main()) == [["after"]]


def test_the_store_pauses_after_a_refused_connection_but_not_after_a_timeout():
    port = free_port()                                       # nothing listens here
    s = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_ms=200,
                 redis_retry_after_ms=60_000)
    errors = []

    async def main():
        store = HistoryStore(s, on_error=errors.append)
        try:
            with pytest.raises(HistoryError, match="Refused|refused|Connect"):
                await store.get_many(["u"])
            assert not store.available                       # paused
            with pytest.raises(HistoryError, match="after a pause"):
                await store.get_many(["u"])
        finally:
            await store.close()
    asyncio.run(main())
    assert errors == ["read"]                                # the paused call never tried
    redis_srv = EmbeddedRedis().start()
    try:
        redis_srv_client = redis.Redis(port=redis_srv.port)
        redis_srv_client.execute_command("CLIENT", "PAUSE", 500, "ALL")
        s2 = Settings(redis_url=redis_srv.url, redis_timeout_ms=50, redis_retry_after_ms=60_000)

        async def slow():
            store = HistoryStore(s2)
            try:
                with pytest.raises(HistoryError, match="TimeoutError"):
                    await store.get_many(["u"])
                return store.available
            finally:
                await store.close()
        assert asyncio.run(slow()) is True                   # a timeout does not pause Redis
    finally:
        redis_srv.cleanup()
