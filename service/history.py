"""User histories in Redis: one list per user, newest click first, capped at `history_keep`.

A micro-batch reads all its users in one pipelined round trip (one LRANGE each). An event
updates the user's history and appends to the click log stream in one atomic script (`RECORD`). On a single
Redis that read goes through `ListReader`, one connection of the service's own that writes a
batch's commands in one send and parses the replies with hiredis as they arrive: redis-py's
pipeline machinery costs about five times as much CPU per batch (benchmarks/results/
redis-reads.md). Everything else (events, readiness pings, Redis Cluster) uses redis-py. The
history is LPUSH + LTRIM inside that script, so a reader never sees a list longer than the cap and
two writers never lose a click. After a refused or broken connection, requests skip Redis for
`redis_retry_after_ms`, then try again; a connection that a restarted Redis closed is reconnected
once, at once, instead of failing the call.
"""
from __future__ import annotations

import asyncio
import ssl
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import hiredis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
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
        # no client-level retry: redis-py retries a failed cluster pipeline by closing every
        # connection, the healthy masters' in-flight reads included; HistoryStore refreshes the
        # slot map itself instead
        kw["retry"] = Retry(NoBackoff(), 0)
        return RedisCluster.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_pool_size, timeout=timeout_s, **kw)
    return aioredis.Redis(connection_pool=pool)


class HistoryError(RuntimeError):
    """Redis could not answer in time."""


# One event, atomically: the history update and the click log entry both happen or neither.
# A script rather than MULTI because an event_id seen before must write nothing, a condition a
# transaction cannot express; the type checks come first so that no command fails half-way.
# KEYS: history list, click stream, and the event-id key when the client sent an id (on a
# cluster all in one slot: Keys gives them one hash tag).
# ARGV: item, keep, user, event id, time ms, stream max len, stream min id, id ttl ms, log on.
# Returns {1, length}, {-1, length} for a repeated event_id, {-2, key} for a key of another type.
RECORD = """
if redis.call('TYPE', KEYS[1]).ok ~= 'none' and redis.call('TYPE', KEYS[1]).ok ~= 'list' then
  return {-2, KEYS[1]}
end
local log = ARGV[9] == '1'
if log and redis.call('TYPE', KEYS[2]).ok ~= 'none' and redis.call('TYPE', KEYS[2]).ok ~= 'stream' then
  return {-2, KEYS[2]}
end
if #KEYS == 3 and not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) then
  return {-1, redis.call('LLEN', KEYS[1])}
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
if log then
  if tonumber(ARGV[6]) > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'user', ARGV[3], 'item', ARGV[1],
               'ts', ARGV[5], 'event', ARGV[4])
  else
    redis.call('XADD', KEYS[2], '*', 'user', ARGV[3], 'item', ARGV[1], 'ts', ARGV[5],
               'event', ARGV[4])
  end
  if ARGV[7] ~= '' then
    redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[7])
  end
end
return {1, redis.call('LLEN', KEYS[1])}
"""


class _Batch:
    __slots__ = ("left", "replies", "future")

    def __init__(self, n: int, future: asyncio.Future[list[Any]]):
        self.left, self.future = n, future
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    """Replies, in order, to the batches written on one connection. A batch whose caller gave up
    (a timeout) stays in line until its replies have been read, so none goes to another."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.pending: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            batch = self.pending[0]
            batch.replies.append(reply)
            batch.left -= 1
            if batch.left == 0:
                self.pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("Redis closed the connection")
        while self.pending:
            f = self.pending.popleft().future
            if not f.done():
                f.set_exception(RedisConnectionError(f"connection lost: {self.lost}"))

    def send(self, packed: bytes, n: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.pending.append(_Batch(n, future))
        assert self.transport is not None
        self.transport.write(packed)
        return future


def _pack(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


class ListReader:
    """LRANGE for many keys in one round trip, on one connection of its own (Redis answers a
    connection's commands in order, so batches in flight share it). Connects on first use and
    again after the connection is lost; AUTH and SELECT follow the URL and the password setting.
    Errors surface as redis-py's exception types, so that callers treat both paths alike."""

    def __init__(self, url: str, password: str | None, timeout_s: float):
        opts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.host, self.port = opts.get("host", "localhost"), int(opts.get("port", 6379))
        self.db = int(opts.get("db", 0))
        self.username = opts.get("username")
        self.password = password if password is not None else opts.get("password")
        self.tls = opts.get("connection_class") is not None          # rediss://
        self.timeout = timeout_s
        self._proto: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> tuple[_Protocol, bool]:
        """The connection, and whether it was opened just now."""
        if self._proto is not None and self._proto.lost is None:
            return self._proto, False
        async with self._connecting:
            if self._proto is not None and self._proto.lost is None:
                return self._proto, False
            loop = asyncio.get_running_loop()
            ctx = ssl.create_default_context() if self.tls else None
            _, proto = await asyncio.wait_for(loop.create_connection(
                _Protocol, self.host, self.port, ssl=ctx), self.timeout)
            hello = []
            if self.password is not None:
                hello.append(_pack("AUTH", *([self.username] if self.username else []),
                                   self.password))
            if self.db:
                hello.append(_pack("SELECT", str(self.db)))
            if hello:
                for reply in await proto.send(b"".join(hello), len(hello)):
                    if isinstance(reply, Exception):
                        proto.transport.close()  # type: ignore[union-attr]
                        raise RedisConnectionError(f"Redis refused the connection: {reply}")
            self._proto = proto
            return proto, True

    async def lranges(self, keys: list[str], stop: int) -> list[list[str]]:
        """LRANGE key 0 stop for every key, in one send."""
        tail = b"$1\r\n0\r\n" + _pack(str(stop))[4:]                 # the two index arguments
        packed = b"".join(b"*4\r\n$6\r\nLRANGE\r\n$%d\r\n%b\r\n%b" % (len(kb), kb, tail)
                          for kb in (k.encode() for k in keys))
        proto, new = await self._connection()
        try:
            replies = await proto.send(packed, len(keys))
        except RedisConnectionError:
            if new:
                raise
            proto, _ = await self._connection()   # it went stale (a restarted Redis): once, anew
            replies = await proto.send(packed, len(keys))
        for r in replies:
            if isinstance(r, Exception):
                raise RedisError(f"LRANGE failed: {r}")
        return replies

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()


class Keys:
    """Where a user's data lives. Without shards, the templates as written and one stream; with
    N shards, each key of user u starts with the hash tag `{sK}:` (K = crc32(u) mod N), so the
    history, the event id and the stream an event goes to hash to one Redis Cluster slot."""

    def __init__(self, settings: Settings):
        self.n = settings.shards
        self._history = settings.redis_key_template.format
        self._event = settings.event_key_template.format
        self._stream = settings.click_stream_key

    @staticmethod
    def _tag(shard: int) -> str:
        return f"{{s{shard}}}:"

    def tag(self, user_id: str) -> str:
        return self._tag(zlib.crc32(user_id.encode()) % self.n) if self.n else ""

    def history(self, user_id: str) -> str:
        return self.tag(user_id) + self._history(user_id=user_id)

    def event(self, user_id: str, event_id: str) -> str:
        return self.tag(user_id) + self._event(event_id=event_id)

    def stream(self, user_id: str) -> str:
        return self.tag(user_id) + self._stream

    def streams(self) -> list[str]:
        """Every stream of the click log."""
        if not self.n:
            return [self._stream]
        return [self._tag(k) + self._stream for k in range(self.n)]


class HistoryStore:
    def __init__(self, settings: Settings, on_error: Callable[[str], None] | None = None):
        self.s = settings
        self.keep = settings.history_keep
        self.timeout = settings.redis_timeout_ms / 1000
        self.write_timeout = settings.redis_write_timeout_ms / 1000
        self.retry_after = settings.redis_retry_after_ms / 1000
        self._down_until = 0.0
        self._on_error = on_error or (lambda op: None)
        self.keys = Keys(settings)
        self._refreshing: asyncio.Task[None] | None = None
        self._node_down_until: dict[str, float] = {}      # cluster: per master
        self._refreshed_at = 0.0
        self._key = self.keys.history
        self.client = redis_client(settings, max(self.timeout, self.write_timeout))
        self._record = self.client.register_script(RECORD)
        pw = settings.redis_password.get_secret_value() if settings.redis_password else None
        self.reader = (None if settings.redis_cluster or not settings.redis_url else
                       ListReader(settings.redis_url, pw, self.timeout))

    def key(self, user_id: str) -> str:
        return self._key(user_id)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, op: str, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self.available:
            coro.close()
            raise HistoryError("Redis failed recently; retrying after a pause")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await coro
        except (TimeoutError, RedisError, OSError, RuntimeError) as e:
            # RuntimeError: redis-py writing on a transport uvloop already closed (a cluster
            # node killed under load). A refused or broken connection pauses Redis (on a
            # cluster each master pauses alone, in _get_many_cluster); a timeout does not: it
            # is already bounded, and a stall of this process (a bundle loading beside it)
            # would otherwise switch personalization off for everyone
            if self.s.redis_cluster:
                self._refresh_slots()
            elif not isinstance(e, (asyncio.TimeoutError, TimeoutError, RedisTimeout)):
                self._down_until = time.monotonic() + self.retry_after
            self._on_error(op)
            raise HistoryError(f"Redis {op} failed: {type(e).__name__}: {e}") from e

    async def get_many(self, user_ids: list[str]) -> list[list[str] | None]:
        """Each user's history, newest first ([] when the user has no key), in one round trip;
        on a cluster one per master, concurrently, and None for the users of a master that
        failed (only when every one failed is it an error)."""
        if self.reader is not None:
            got: list[list[str] | None] = await self._call("read", self.reader.lranges(  # type: ignore[arg-type]
                [self._key(u) for u in user_ids], self.keep - 1))
            return got
        if self.s.redis_cluster:
            return await self._call("read", self._get_many_cluster(user_ids))

        async def run() -> list[list[str] | None]:
            pipe = self.client.pipeline(transaction=False)
            for u in user_ids:
                pipe.lrange(self._key(u), 0, self.keep - 1)
            res: list[list[str] | None] = await pipe.execute()
            return res
        return await self._call("read", run())

    async def _get_many_cluster(self, user_ids: list[str]) -> list[list[str] | None]:
        # a cluster pipeline fails whole when one node is down: one pipeline per master instead
        keys = [self._key(u) for u in user_ids]
        by_node: dict[str, list[int]] = {}
        nodes = self.client.nodes_manager
        for i, k in enumerate(keys):
            node = nodes.get_node_from_slot(self.client.keyslot(k))
            by_node.setdefault(node.name, []).append(i)
        now = time.monotonic()
        out: list[list[str] | None] = [None] * len(keys)
        paused = [name for name in by_node if self._node_down_until.get(name, 0.0) > now]
        for name in paused:             # a master that failed just now: its users fall back
            del by_node[name]
        if not by_node:
            raise HistoryError("every master of these users failed recently; retrying after a "
                               "pause")

        async def one(idx: list[int]) -> list[list[str]]:
            pipe = self.client.pipeline(transaction=False)
            for i in idx:
                pipe.lrange(keys[i], 0, self.keep - 1)
            async with asyncio.timeout(self.timeout):
                res: list[list[str]] = await pipe.execute()
            return res

        names, groups = list(by_node), list(by_node.values())
        got = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
        failed = []
        for name, idx, res in zip(names, groups, got):
            if isinstance(res, BaseException):
                failed.append(res)
                if not isinstance(res, (asyncio.TimeoutError, TimeoutError, RedisTimeout)):
                    self._node_down_until[name] = now + self.retry_after
                continue
            for i, h in zip(idx, res):
                out[i] = h
        if failed:
            self._refresh_slots()
            if len(failed) == len(groups) and not paused:
                raise failed[0]
            self._on_error("read")          # counted, but the healthy masters keep serving
        return out

    def _refresh_slots(self) -> None:
        """Re-read the cluster's slot map in the background, at most every 100 ms: once a
        replica is promoted, its slots' reads and writes go to it."""
        now = time.monotonic()
        if self._refreshing is not None and not self._refreshing.done() or \
                now - self._refreshed_at < 0.1:
            return
        self._refreshed_at = now

        async def run() -> None:
            try:
                await self.client.nodes_manager.initialize()
            except Exception:           # the next failure tries again
                pass
        self._refreshing = asyncio.get_running_loop().create_task(run())

    async def append(self, user_id: str, item_id: str,
                     event_id: str | None = None) -> tuple[int, str, bool]:
        """Record a click: history and click log together, or neither; an `event_id` seen
        before is not recorded again. Returns (history length, event id, duplicate)."""
        s = self.s
        eid = event_id or uuid.uuid4().hex
        keys = [self.key(user_id), self.keys.stream(user_id)]
        if event_id:
            keys.append(self.keys.event(user_id, event_id))
        min_id = (f"{int((time.time() - s.click_stream_max_age_s) * 1000)}-0"
                  if s.click_stream_max_age_s else "")
        args = [item_id, self.keep, user_id, eid, int(time.time() * 1000),
                s.click_stream_max_len, min_id, int(s.event_id_ttl_s * 1000),
                1 if s.click_log else 0]

        async def run() -> tuple[int, str, bool]:
            status, length = await self._record(keys=keys, args=args)
            if status == -2:
                raise RedisError(f"a key of this event holds another type: {length}")
            return int(length), eid, status == -1
        return await self._call("write", run(), self.write_timeout)

    async def stream_info(self, group: str) -> tuple[int, int | None] | None:
        """(entries, lag of `group`) of the click log, summed over its streams, or None when
        Redis cannot say now. The lag is None until the group has read every stream."""
        if not self.available:
            return None
        length, lag, every_read = 0, 0, True
        try:
            async with asyncio.timeout(max(self.timeout, 0.01 * len(self.keys.streams()))):
                for stream in self.keys.streams():
                    n = int(await self.client.xlen(stream))
                    length += n
                    seen = None
                    for g in await self.client.xinfo_groups(stream) if n else []:
                        if g.get("name") == group and g.get("lag") is not None:
                            seen = int(g["lag"])
                    if n and seen is None:
                        every_read = False
                    elif seen is not None:
                        lag += seen
                return length, lag if every_read else None
        except (RedisError, OSError, TimeoutError):
            return None

    async def ping(self) -> None:
        self._down_until = 0.0          # a readiness probe always tries Redis itself
        await self._call("ping", self.client.ping())

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        try:
            await self.client.aclose()
        except Exception:
            pass


async def bulk_load(client: Any, key: Callable[[str], str],
                    histories: Iterable[tuple[str, list[str]]], keep: int, chunk: int = 500,
                    progress: Callable[[int], None] | None = None) -> int:
    """Replace each user's history (given oldest first) with its newest `keep` clicks, pipelined."""
    n = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for user, items in histories:
        k = key(user)
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
            return await bulk_load(client, Keys(settings).history, histories,
                                   settings.history_keep, progress=step)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as e:
        raise HistoryError(f"Redis at {settings.redis_url_redacted()}: {e}") from None
