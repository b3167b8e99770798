"""User histories in Redis: one list per user, newest click first, capped at `history_keep`.

Reads are one LRANGE; an event is LPUSH + LTRIM in one MULTI/EXEC, so a reader never sees a list
longer than the cap and two writers never lose a click. After a refused or broken connection,
requests skip Redis for `redis_retry_after_ms`, then try again; a pooled connection that a
restarted Redis closed is reconnected once, at once, instead of failing the call.
"""
from __future__ import annotations

import asyncio
import time
from typing import Iterable

from redis import asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from .settings import Settings


def redis_client(settings: Settings, timeout_s: float):
    """An asyncio client for `redis_url`: a bounded blocking pool, or a cluster client."""
    pw = settings.redis_password.get_secret_value() if settings.redis_password else None
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    kw = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True,
              retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
    if pw is not None:
        kw["password"] = pw
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster
        return RedisCluster.from_url(settings.redis_url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_pool_size, timeout=timeout_s, **kw)
    return aioredis.Redis(connection_pool=pool)


class HistoryError(RuntimeError):
    """Redis could not answer in time."""


class HistoryStore:
    def __init__(self, settings: Settings, on_error=None):
        self.s = settings
        self.keep = settings.history_keep
        self.timeout = settings.redis_timeout_ms / 1000
        self.write_timeout = settings.redis_write_timeout_ms / 1000
        self.retry_after = settings.redis_retry_after_ms / 1000
        self._down_until = 0.0
        self._on_error = on_error or (lambda op: None)
        self.client = redis_client(settings, max(self.timeout, self.write_timeout))

    def key(self, user_id: str) -> str:
        return self.s.redis_key_template.format(user_id=user_id)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, op: str, coro, timeout: float | None = None):
        if not self.available:
            coro.close()
            raise HistoryError("Redis failed recently; retrying after a pause")
        try:
            return await asyncio.wait_for(coro, timeout or self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            # a refused or broken connection pauses Redis; a timeout does not: it is already
            # bounded, and a stall of this process (a bundle loading beside it) would otherwise
            # switch personalization off for everyone
            if not isinstance(e, (asyncio.TimeoutError, TimeoutError, RedisTimeout)):
                self._down_until = time.monotonic() + self.retry_after
            self._on_error(op)
            raise HistoryError(f"Redis {op} failed: {type(e).__name__}: {e}") from e

    async def get(self, user_id: str) -> list[str] | None:
        """Newest first; None when the user has no history key."""
        items = await self._call("read", self.client.lrange(self.key(user_id), 0, self.keep - 1))
        return items or None

    async def get_many(self, user_ids: list[str]) -> list[list[str] | None]:
        async def run():
            pipe = self.client.pipeline(transaction=False)
            for u in user_ids:
                pipe.lrange(self.key(u), 0, self.keep - 1)
            return await pipe.execute()
        res = await self._call("read", run())
        return [r or None for r in res]

    async def append(self, user_id: str, item_id: str) -> int:
        """Record a click; returns the history length after the cap."""
        async def run():
            k = self.key(user_id)
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(k, item_id)
            pipe.ltrim(k, 0, self.keep - 1)
            pipe.llen(k)
            return (await pipe.execute())[-1]
        return await self._call("write", run(), self.write_timeout)

    async def ping(self) -> None:
        self._down_until = 0.0          # a readiness probe always tries Redis itself
        await self._call("ping", self.client.ping())

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            pass


async def bulk_load(client, key_template: str, histories: Iterable[tuple[str, list[str]]],
                    keep: int, chunk: int = 500, progress=None) -> int:
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
