"""User histories in Redis: one list per user, newest click first, capped at `history_keep`.

A micro-batch reads all its users in one pipelined round trip (one LRANGE each); an event is
LPUSH + LTRIM in one MULTI/EXEC, so a reader never sees a list longer than the cap and two writers
never lose a click. After a refused or broken connection, requests skip Redis for
`redis_retry_after_ms`, then try again; a pooled connection that a restarted Redis closed is
reconnected once, at once, instead of failing the call.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from .settings import Settings

T = TypeVar("T")


def redis_client(settings: Settings, timeout_s: float) -> Any:
    """An asyncio client for `redis_url`: a bounded blocking pool, or a cluster client."""
    pw = settings.redis_password.get_secret_value() if settings.redis_password else None
    kw: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                              decode_responses=True, retry=Retry(NoBackoff(), 1),
                              retry_on_error=[RedisConnectionError])
    if pw is not None:
        kw["password"] = pw
    url = settings.redis_url
    if url is None:
        raise HistoryError("no Redis URL is configured (SINE_REDIS_URL)")
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster
        return RedisCluster.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_pool_size, timeout=timeout_s, **kw)
    return aioredis.Redis(connection_pool=pool)


class HistoryError(RuntimeError):
    """Redis could not answer in time."""


class HistoryStore:
    def __init__(self, settings: Settings, on_error: Callable[[str], None] | None = None):
        self.s = settings
        self.keep = settings.history_keep
        self.timeout = settings.redis_timeout_ms / 1000
        self.write_timeout = settings.redis_write_timeout_ms / 1000
        self.retry_after = settings.redis_retry_after_ms / 1000
        self._down_until = 0.0
        self._on_error = on_error or (lambda op: None)
        self._key = settings.redis_key_template.format
        self.client = redis_client(settings, max(self.timeout, self.write_timeout))

    def key(self, user_id: str) -> str:
        return self._key(user_id=user_id)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, op: str, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self.available:
            coro.close()
            raise HistoryError("Redis failed recently; retrying after a pause")
        try:
            return await asyncio.wait_for(coro, timeout or self.timeout)
        except (TimeoutError, RedisError, OSError) as e:
            # a refused or broken connection pauses Redis; a timeout does not: it is already
            # bounded, and a stall of this process (a bundle loading beside it) would otherwise
            # switch personalization off for everyone
            if not isinstance(e, (asyncio.TimeoutError, TimeoutError, RedisTimeout)):
                self._down_until = time.monotonic() + self.retry_after
            self._on_error(op)
            raise HistoryError(f"Redis {op} failed: {type(e).__name__}: {e}") from e

    async def get_many(self, user_ids: list[str]) -> list[list[str]]:
        """Each user's history, newest first ([] when the user has no key), in one round trip."""
        async def run() -> list[list[str]]:
            pipe = self.client.pipeline(transaction=False)
            for u in user_ids:
                pipe.lrange(self._key(user_id=u), 0, self.keep - 1)
            res: list[list[str]] = await pipe.execute()
            return res
        return await self._call("read", run())

    async def append(self, user_id: str, item_id: str) -> int:
        """Record a click; returns the history length after the cap."""
        async def run() -> int:
            k = self.key(user_id)
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(k, item_id)
            pipe.ltrim(k, 0, self.keep - 1)
            pipe.llen(k)
            return int((await pipe.execute())[-1])
        return await self._call("write", run(), self.write_timeout)

    async def ping(self) -> None:
        self._down_until = 0.0          # a readiness probe always tries Redis itself
        await self._call("ping", self.client.ping())

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            pass


async def bulk_load(client: Any, key_template: str, histories: Iterable[tuple[str, list[str]]],
                    keep: int, chunk: int = 500,
                    progress: Callable[[int], None] | None = None) -> int:
    """Replace each user's history (given oldest first) with its newest `keep` clicks, pipelined."""
    n = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for user, items in histories:
        k = key_template.format(user_id=user)
        newest_first = list(reversed(items[-keep:]))
        pipe.delete(k)
        if newest_first:
            pipe.rpush(k, *newest_first)
        pending += 1
        n += 1
        if pending >= chunk:
            await pipe.execute()
            if progress:
                progress(pending)
            pending = 0
    if pending:
        await pipe.execute()
        if progress:
            progress(pending)
    return n


def load_histories(settings: Settings, histories: Iterable[tuple[str, list[str]]],
                   total: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """`sine load-histories`: write (user, items oldest first) into `settings.redis_url`, each
    user's newest `history_keep` clicks replacing what was there. Returns the users written."""
    if not settings.redis_url:
        raise HistoryError("no Redis URL is configured (SINE_REDIS_URL)")
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None and total:
            progress(done, total)

    async def run() -> int:
        client = redis_client(settings, timeout_s=30.0)
        try:
            return await bulk_load(client, settings.redis_key_template, histories,
                                   settings.history_keep, progress=step)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as e:
        raise HistoryError(f"Redis at {settings.redis_url_redacted()}: {e}") from None
