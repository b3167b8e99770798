"""The process: uvicorn with this service's HTTP protocol, in one process or several workers.

uvicorn reads a request's headers with no deadline and no size cap: a socket that sends half a
request line stays open, and a 64 MiB header section is read whole. `GuardedHttpTools` is
uvicorn's httptools protocol with both:

- **header deadline**: the request line and headers must be complete within `header_timeout_s`
  of the connection opening, or of the first byte of a later request on a kept-alive
  connection; past it the client gets a 408 and the connection is closed (a sweep of the
  connections a few times per deadline, not a timer per request);
- **header cap**: past `max_header_bytes` of request line and headers the client gets a 431 and
  the connection is closed, before more is read.

The body has its deadline in the app (`Guard` in `app.py`), which reads it whole before a request
takes an in-flight slot. The limits reach each connection through the app's lifespan state
(`LIMITS`), which uvicorn hands to every protocol instance, so the workers of `serve` (new
interpreters) get them from the app they build.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from index_builder import bundle as bundle_mod

from .settings import Settings

log = logging.getLogger("sine.service")
LIMITS = "sine.connection_limits"       # the lifespan state key uvicorn passes to protocols


@dataclass(frozen=True)
class ConnectionLimits:
    """The header deadline and size cap every connection gets, and who counts refusals."""
    header_timeout_s: float = 5.0
    max_header_bytes: int = 16_384
    on_refused: Callable[[str], None] | None = None     # counts each closed connection by reason

    @classmethod
    def of(cls, s: Settings, on_refused: Callable[[str], None] | None = None) -> ConnectionLimits:
        return cls(s.header_timeout_s, s.max_header_bytes, on_refused)


class _HeadersTooLarge(Exception):
    pass


def _problem(status: int, title: str, slug: str, detail: str) -> bytes:
    body = orjson.dumps({"type": f"/problems/{slug}", "title": title, "status": status,
                         "detail": detail})
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
    return (b"HTTP/1.1 %d %b\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, reason, len(body), body))


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a header size cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.app_state.get(LIMITS) if isinstance(self.app_state, dict) else None
        self.limits: ConnectionLimits = limits or ConnectionLimits()
        self._header_bytes = 0
        self._headers_since: float | None = None     # when the awaited header section began
        self._refused: str | None = None

    # the deadline runs from the connection (or a request's first byte) to its last header.
    # No timer per request: one sweep of the server's connections a few times per deadline
    def _arm(self) -> None:
        if self._headers_since is None:
            self._headers_since = self.loop.time()
        _Sweeper.of(self.server_state, self.loop, self.limits.header_timeout_s)

    def _disarm(self) -> None:
        self._headers_since = None

    def late(self, now: float) -> bool:
        return (self._headers_since is not None
                and now - self._headers_since > self.limits.header_timeout_s)

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self._disarm()
        if self._refused is not None or self.transport.is_closing():
            return
        self._refused = reason
        if self.limits.on_refused is not None:
            self.limits.on_refused(reason)
        if self.cycle is None or self.cycle.response_complete:   # never inside another answer
            title = {408: "Request timeout", 431: "Request header fields too large"}[status]
            self.transport.write(_problem(status, title, reason, detail))
        self.transport.close()

    def headers_late(self) -> None:
        self._refuse(408, "header-timeout", f"The request's headers did not arrive within "
                     f"{self.limits.header_timeout_s:g} s (SINE_HEADER_TIMEOUT_S).")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # a parser callback raised: ours (the cap) or the parser's own error
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers-too-large", f"The request line and headers exceed "
                         f"{self.limits.max_header_bytes} bytes (SINE_MAX_HEADER_BYTES).")
            return
        self._disarm()
        super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm()

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
        self._disarm()
        super().on_headers_complete()


class _Sweeper:
    """Closes the connections of one server whose headers are late, checking them every
    quarter of the header deadline (so a late one goes within 1.25 deadlines)."""

    def __init__(self, server_state: Any, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.server_state, self.loop = server_state, loop
        self.every = max(0.01, timeout_s / 4)
        loop.call_later(self.every, self.sweep)

    @classmethod
    def of(cls, server_state: Any, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        if getattr(server_state, "_sine_sweeper", None) is None:
            server_state._sine_sweeper = cls(server_state, loop, timeout_s)

    def sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.server_state.connections):
            if isinstance(conn, GuardedHttpTools) and conn.late(now):
                conn.headers_late()
        self.loop.call_later(self.every, self.sweep)


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
