"""`ListReader`: the read path's own Redis connection. A micro-batch's LRANGEs go out in one send
and their replies are parsed by hiredis as they arrive; redis-py's pipeline machinery costs
about five times as much CPU per batch (benchmarks/results/redis-reads.md).

A connection can die without closing (a failover behind a stable address, a peer that
vanished, a firewall that dropped the flow): no reply comes, and no error. So a connection is
taken as dead, closed and replaced, when its oldest unanswered batch is `STALL_TIMEOUTS` read
timeouts old, when `MAX_PENDING` batches wait on it, or when a ping on it times out; the
batches still waiting on it fail as timeouts (not as a broken connection, which would pause
the store).
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

STALL_TIMEOUTS = 3     # a reply this many read timeouts late: the connection is dead
MAX_PENDING = 256      # batches waiting on one connection at most


class _Batch:
    __slots__ = ("left", "replies", "future", "sent")

    def __init__(self, n: int, future: asyncio.Future[list[Any]], sent: float):
        self.left, self.future, self.sent = n, future, sent
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
        if self.lost is None:
            self.lost = exc or ConnectionResetError("Redis closed the connection")
        self._fail(RedisConnectionError(f"connection lost: {self.lost}"))

    def _fail(self, error: Exception) -> None:
        while self.pending:
            f = self.pending.popleft().future
            if not f.done():
                f.set_exception(error)

    def stalled(self, now: float, after_s: float) -> bool:
        """No reply for `after_s` to the oldest batch, or too many batches waiting."""
        return bool(self.pending) and (now - self.pending[0].sent > after_s
                                       or len(self.pending) >= MAX_PENDING)

    def drop(self, why: str) -> None:
        """Take this connection as dead: abort it (its buffers go with it) and fail the
        batches waiting on it as timed out."""
        self.lost = RedisTimeout(why)
        self._fail(RedisTimeout(why))
        if self.transport is not None:
            self.transport.abort()

    def send(self, packed: bytes, n: int) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self.pending.append(_Batch(n, future, loop.time()))
        assert self.transport is not None
        self.transport.write(packed)
        return future


def pack(*args: str | bytes) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


class ListReader:
    """LRANGE for many keys in one round trip, on one connection of its own (Redis answers a
    connection's commands in order, so batches in flight share it). Connects on first use and
    again after the connection is lost; AUTH and SELECT follow the URL and the password setting
    (`host`, `port`: another node than the URL's, with its credentials: a cluster's masters).
    Errors surface as redis-py's exception types, so that callers treat both paths alike."""

    def __init__(self, url: str, password: str | None, timeout_s: float,
                 host: str | None = None, port: int | None = None):
        opts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.host = host or opts.get("host", "localhost")
        self.port = port or int(opts.get("port", 6379))
        self.db = int(opts.get("db", 0))
        self.username = opts.get("username")
        self.password = password if password is not None else opts.get("password")
        self.tls = opts.get("connection_class") is not None          # rediss://
        self.timeout = timeout_s
        self._proto: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self.dropped = 0            # connections taken as dead: stalled, or a failed ping

    def _check(self) -> None:
        """Drop the connection if it stalled (see the module's docstring)."""
        p = self._proto
        if p is not None and p.lost is None and p.stalled(asyncio.get_running_loop().time(),
                                                            STALL_TIMEOUTS * self.timeout):
            self.dropped += 1
            p.drop(f"no reply from Redis on this connection for {STALL_TIMEOUTS} read "
                   f"timeouts, or {MAX_PENDING} reads waiting: replaced")

    @property
    def healthy(self) -> bool:
        """The connection is open and answering (or not opened yet)."""
        p = self._proto
        return p is None or (p.lost is None and not p.stalled(
            asyncio.get_running_loop().time(), STALL_TIMEOUTS * self.timeout))

    async def _connection(self) -> tuple[_Protocol, bool]:
        """The connection, and whether it was opened just now."""
        self._check()
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
                hello.append(pack("AUTH", *([self.username] if self.username else []),
                                  self.password))
            if self.db:
                hello.append(pack("SELECT", str(self.db)))
            if hello:
                for reply in await proto.send(b"".join(hello), len(hello)):
                    if isinstance(reply, Exception):
                        proto.transport.close()  # type: ignore[union-attr]
                        raise RedisConnectionError(f"Redis refused the connection: {reply}")
            self._proto = proto
            return proto, True

    async def lranges(self, keys: list[str], stop: int) -> list[list[str]]:
        """LRANGE key 0 stop for every key, in one send."""
        tail = b"$1\r\n0\r\n" + pack(str(stop))[4:]                  # the two index arguments
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

    async def ping(self) -> None:
        """PING on this very connection, within the read timeout; one that does not answer in
        time is dropped, so that the next read opens a new one."""
        proto, _ = await self._connection()
        try:
            async with asyncio.timeout(self.timeout):
                reply = (await proto.send(pack("PING"), 1))[0]
        except (TimeoutError, asyncio.CancelledError) as e:   # our deadline, or the caller's
            if proto.lost is None:
                self.dropped += 1
                proto.drop("no answer to a ping on the read connection: replaced")
            if isinstance(e, asyncio.CancelledError):
                raise
            raise RedisTimeout("the read connection did not answer a ping in time") from None
        if isinstance(reply, Exception):
            raise RedisError(f"PING failed: {reply}")

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
