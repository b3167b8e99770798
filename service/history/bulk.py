"""`sine load-histories`: users' histories written into Redis in pipelined chunks."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import RedisError

from ..keys import Keys
from ..settings import Settings
from .store import HistoryError, redis_client


async def bulk_load(client: Any, key: Callable[[str], str],
                    histories: Iterable[tuple[str, list[str]]], keep: int, chunk: int = 500,
                    progress: Callable[[int], None] | None = None, ttl_ms: int = 0) -> int:
    """Replace each user's history (given oldest first) with its newest `keep` clicks, pipelined;
    with `ttl_ms`, each expires that long after (as an event's update sets it)."""
    n = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for user, items in histories:
        k = key(user)
        newest_first = list(reversed(items[-keep:]))
        pipe.delete(k)
        if newest_first:
            pipe.rpush(k, *newest_first)
            if ttl_ms > 0:
                pipe.pexpire(k, ttl_ms)
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
            return await bulk_load(client, Keys(settings).history, histories,
                                   settings.history_keep, progress=step,
                                   ttl_ms=int(settings.history_ttl_s * 1000))
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as e:
        raise HistoryError(f"Redis at {settings.redis_url_redacted()}: {e}") from None
