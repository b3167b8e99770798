"""The process: uvicorn with this service's HTTP protocol, in one process or several workers.

uvicorn reads a request's headers with no deadline and no size cap, keeps a connection whose
request body never ends for as long as bytes trickle in (a stray byte cancels its keep-alive
timer, and nothing arms it again), accepts connections until the process runs out of file
descriptors, and holds an answer that the client never reads. `GuardedHttpTools` is uvicorn's
httptools protocol with a deadline on every state a connection can be in, which no byte the
client sends can cancel, and a cap on connections:

- **headers**: the request line and headers must be complete within `header_timeout_s` of the
  connection opening, or of the first byte of a later request on a kept-alive connection; past
  it the client gets a 408 and the connection is closed;
- **header cap**: past `max_header_bytes` of request line and headers the client gets a 431 and
  the connection is closed, before more is read;
- **body**: whatever the method, the body must be complete within `body_timeout_s` of the
  headers (the app answers a POST's late body with its own 408 first: `Guard` in `guard.py`,
  which reads it whole before a request takes an in-flight slot; this is the backstop, one
  second later, for every other case, such as a GET that announces a body and answers before it);
- **idle**: a connection with no request in progress is closed `keep_alive_s` after its last
  answer;
- **writes**: an answer the client does not read (the socket's buffer full) for
  `write_timeout_s` aborts the connection, which frees the buffer;
- **connections**: past `max_connections` open at once (lowered to fit the process's file
  descriptor limit, with `FD_RESERVE` kept for Redis, the bundle watcher and the metrics), a
  new connection is answered 503 and closed at once.

One sweep of the server's connections enforces the deadlines (`ConnectionLimits.sweep_s`: an
eighth of the shortest, at most every half second), not a timer per request. The limits reach
each connection through the app's lifespan state (`LIMITS`), which uvicorn hands to every
protocol instance, so the workers of `serve` (new interpreters) get them from the app they
build.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from index_builder import bundle as bundle_mod

from . import errors
from .settings import Settings

log = logging.getLogger("sine.service")
LIMITS = "sine.connection_limits"       # the lifespan state key uvicorn passes to protocols
FD_RESERVE = 64            # descriptors never given to clients (beside the Redis pool): the
#                            read connection, the watcher, the metrics, the bundle's files
BODY_GRACE_S = 1.0         # the app's own body deadline answers first
SWEEP_CHUNK = 32           # connections a sweep closes in one turn of the event loop


def connection_cap(wanted: int, reserve: int = FD_RESERVE) -> int:
    """`wanted`, lowered so that the open connections stay under the process's descriptor
    limit with `reserve` to spare (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


@dataclass(frozen=True)
class ConnectionLimits:
    """The deadlines and caps every connection gets, and who counts refusals."""
    header_timeout_s: float = 5.0
    max_header_bytes: int = 16_384
    body_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    write_timeout_s: float = 10.0
    max_connections: int = 1_000
    on_refused: Callable[[str], None] | None = None     # counts each closed connection by reason

    @property
    def sweep_s(self) -> float:
        """How often the deadlines are checked: an eighth of the shortest, at most every half
        second (a sweep of a thousand connections costs about a millisecond)."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s,
                       self.write_timeout_s)
        return min(0.5, max(0.01, shortest / 8))

    @functools.cached_property
    def over_cap_answer(self) -> bytes:
        """The 503 a connection past `max_connections` gets, built once."""
        return _problem(503, "too-many-connections", f"The server holds {self.max_connections} "
                        "connections (SINE_MAX_CONNECTIONS, within its file descriptor limit); "
                        "retry on another connection later.")

    @classmethod
    def of(cls, s: Settings, on_refused: Callable[[str], None] | None = None) -> ConnectionLimits:
        return cls(s.header_timeout_s, s.max_header_bytes, s.body_timeout_s, s.keep_alive_s,
                   s.write_timeout_s,
                   connection_cap(s.max_connections, FD_RESERVE + s.redis_pool_size), on_refused)


class _HeadersTooLarge(Exception):
    pass


def _problem(status: int, slug: str, detail: str) -> bytes:
    """A whole problem+json answer, written by the protocol itself (no app behind it)."""
    body = orjson.dumps({"type": f"/problems/{slug}", "title": errors.TITLES[status],
                         "status": status, "detail": detail})
    return (b"HTTP/1.1 %d %b\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, HTTPStatus(status).phrase.encode(), len(body), body))


def _limits(app_state: Any) -> ConnectionLimits:
    """The limits the app's lifespan handed to its connections (the defaults without them)."""
    limits = app_state.get(LIMITS) if isinstance(app_state, dict) else None
    return limits or ConnectionLimits()


class _OverCap(asyncio.Protocol):
    """A connection past the cap: its prebuilt 503 written, then closed. Nothing of uvicorn's
    is made for it (an attacker past the cap reconnects as fast as it is refused, and each
    refusal runs on the event loop)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.limits.on_refused is not None:
            self.limits.on_refused("too-many-connections")
        transport.write(self.limits.over_cap_answer)  # type: ignore[attr-defined]
        transport.close()


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on every state and a connection cap."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # uvicorn makes one protocol per accepted connection: past the cap, a refusal instead
        state, limits = kwargs.get("server_state"), _limits(kwargs.get("app_state"))
        if state is not None and len(state.connections) >= limits.max_connections:
            return _OverCap(limits)
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = _limits(self.app_state)
        self._header_bytes = 0
        self._deadline: float | None = None     # loop time past which `_phase` has failed
        self._phase = "headers"                 # headers, body, answer or idle
        self._message_done = True
        self._write_blocked: float | None = None   # since when the client reads nothing
        self._refused: str | None = None

    # -- deadlines: one per state, set on entering it; only the sweep acts on them ---------------
    def _enter(self, phase: str, seconds: float | None) -> None:
        self._phase = phase
        self._deadline = None if seconds is None else self.loop.time() + seconds
        _Sweeper.of(self.server_state, self.loop, self.limits.sweep_s)

    def overdue(self, now: float) -> str | None:
        """Why this connection must close now, or None."""
        if self._write_blocked is not None and now - self._write_blocked > self.limits.write_timeout_s:
            return "write-timeout"
        if self._deadline is not None and now > self._deadline:
            return {"headers": "header-timeout", "body": "body-timeout"}.get(self._phase, "idle")
        return None

    def expire(self, why: str) -> None:
        if why == "header-timeout":
            self._refuse(408, why, f"The request's headers did not arrive within "
                         f"{self.limits.header_timeout_s:g} s (SINE_HEADER_TIMEOUT_S).")
        elif why == "body-timeout":
            self._refuse(408, why, f"The request's body did not arrive within "
                         f"{self.limits.body_timeout_s:g} s (SINE_BODY_TIMEOUT_S).")
        elif why == "write-timeout":
            self._deadline = self._write_blocked = None
            if self.limits.on_refused is not None:
                self.limits.on_refused(why)
            self._disconnect_cycles()
            self.transport.abort()              # a close would wait for the unread buffer
        else:                                   # idle: what keep-alive does, uncancellable
            self._deadline = None
            self.transport.close()

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self._deadline = None
        if self._refused is not None or self.transport.is_closing():
            return
        self._refused = reason
        if self.limits.on_refused is not None:
            self.limits.on_refused(reason)
        if self.cycle is None or self.cycle.response_complete:   # never inside another answer
            self.transport.write(_problem(status, reason, detail))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("headers", self.limits.header_timeout_s)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle                   # with pipelining, not always `self.cycle`
        super()._start_asgi_task(cycle, app)

    def _disconnect_cycles(self) -> None:
        """Every answer of this connection, running or pipelined, writes nothing more: uvicorn
        marks only the newest request's, and the one that runs may be an older one, blocked
        on a full buffer, that would write to the closed transport once woken."""
        for cycle in {id(c): c for c in (self.cycle, getattr(self, "_running", None),
                                         *(c for c, _ in self.pipeline)) if c}.values():
            cycle.disconnected = True
            cycle.message_event.set()
        self.pipeline.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = self._write_blocked = None
        self._disconnect_cycles()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_blocked is None:
            self._write_blocked = self.loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = None

    def send_400_response(self, msg: str) -> None:
        # a parser callback raised: ours (the cap) or the parser's own error
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers-too-large", f"The request line and headers exceed "
                         f"{self.limits.max_header_bytes} bytes (SINE_MAX_HEADER_BYTES).")
            return
        self._deadline = None
        super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._message_done = False
        if self._phase != "headers":            # the first request's clock runs from the connection
            self._enter("headers", self.limits.header_timeout_s)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise _HeadersTooLarge()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)          # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._enter("body", self.limits.body_timeout_s + BODY_GRACE_S)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_done = True
        if self.cycle is not None and self.cycle.response_complete:
            self._enter("idle", self.limits.keep_alive_s)
        else:
            self._enter("answer", None)         # the app's own deadlines bound its work

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._message_done and self._phase != "headers":   # else a body is still due
            self._enter("idle", self.limits.keep_alive_s)


class _Sweeper:
    """Closes the connections of one server that are past a deadline, checking them every
    `ConnectionLimits.sweep_s` (so a late one goes within that much of its deadline)."""

    def __init__(self, server_state: Any, loop: asyncio.AbstractEventLoop, every_s: float):
        self.server_state, self.loop, self.every = server_state, loop, every_s
        loop.call_later(self.every, self.sweep)

    @classmethod
    def of(cls, server_state: Any, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
        if getattr(server_state, "_sine_sweeper", None) is None:
            server_state._sine_sweeper = cls(server_state, loop, every_s)

    def sweep(self) -> None:
        now = self.loop.time()
        self.expire([conn for conn in list(self.server_state.connections)
                     if isinstance(conn, GuardedHttpTools) and conn.overdue(now)])
        self.loop.call_later(self.every, self.sweep)

    def expire(self, due: list[Any]) -> None:
        """Close the `due` connections SWEEP_CHUNK at a time, each chunk in its own turn of the
        loop: sockets opened together fall due together, and closing hundreds in one callback
        would hold every request behind them. Each is checked again when its turn comes (a
        request may have arrived on it meanwhile)."""
        now = self.loop.time()
        for conn in due[:SWEEP_CHUNK]:
            if why := conn.overdue(now):
                conn.expire(why)
        if len(due) > SWEEP_CHUNK:
            self.loop.call_soon(self.expire, due[SWEEP_CHUNK:])


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every server of this service runs with (`serve`, the tests): uvicorn keyword
    arguments, this module's protocol among them."""
    return dict(host=settings.host, port=settings.port, log_config=None,
                access_log=settings.access_log, http=GuardedHttpTools, lifespan="on",
                timeout_keep_alive=settings.keep_alive_s,
                timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None)


def serve(settings: Settings) -> None:
    """`sine serve`: refuse a broken bundle at once (with the reason), then run uvicorn, in
    this process or, with `workers` > 1, in that many worker processes on one port."""
    import uvicorn

    from .app import create_app
    from .logs import configure

    bundle_mod.load(settings.bundle, verify_hashes=True, deep=False)
    configure(settings.log_level)
    opts = uvicorn_options(settings)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **opts)
        return
    # the workers are new interpreters: they rebuild these settings from the environment, and
    # prometheus_client picks its multiprocess mode from PROMETHEUS_MULTIPROC_DIR at import
    folder = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="sine-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.db"):
        f.unlink()
    os.environ.update(settings.to_env())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    uvicorn.run("service.server:worker_app", factory=True, workers=settings.workers, **opts)


def worker_app() -> Any:
    """One worker of `sine serve --workers N`: the settings its parent exported."""
    from .app import create_app
    from .logs import configure

    settings = Settings()
    configure(settings.log_level)
    return create_app(settings)
