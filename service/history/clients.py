"""Every Redis client the project opens, made in one place: the service's (asyncio, a bounded
pool, or a cluster client for bulk loading), one per cluster master, and the exporter's
(synchronous). They share their timeouts, decoding and retry policy."""
from __future__ import annotations

from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def _options(timeout_s: float, password: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                              decode_responses=True)
    if password is not None:
        kw["password"] = password
    return kw


def async_client(url: str, *, password: str | None, timeout_s: float, cluster: bool = False,
                 pool_size: int = 64) -> Any:
    """An asyncio client for `url`: a bounded blocking pool (callers wait for a connection within
    the timeout), or, with `cluster`, redis-py's cluster client. Broken connections are
    retried once, at once."""
    kw = {**_options(timeout_s, password), "retry": Retry(NoBackoff(), 1),
          "retry_on_error": [RedisConnectionError]}
    if cluster:
        from redis.asyncio.cluster import RedisCluster
        return RedisCluster.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=pool_size,
                                                    timeout=timeout_s, **kw)
    return aioredis.Redis(connection_pool=pool)


def node_client(host: str, port: int, *, username: str | None, password: str | None,
                timeout_s: float, tls: bool, pool_size: int) -> Any:
    """An asyncio client for one node (a cluster's master), never retried by redis-py: a failure
    is the caller's to count and route around."""
    kw = {**_options(timeout_s, password), "retry": Retry(NoBackoff(), 0)}
    if tls:
        kw["connection_class"] = aioredis.SSLConnection
    pool = aioredis.BlockingConnectionPool(host=host, port=port, username=username,
                                           max_connections=pool_size, timeout=timeout_s, **kw)
    return aioredis.Redis(connection_pool=pool)


def sync_client(url: str, *, password: str | None, timeout_s: float, cluster: bool = False) -> Any:
    """A synchronous client (the offline tools): plain, or redis-py's cluster client."""
    import redis

    kw = _options(timeout_s, password)
    if cluster:
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(url, **kw)
    return redis.Redis.from_url(url, **kw)
