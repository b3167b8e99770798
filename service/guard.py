"""The request guard: ASGI middleware in front of the routes, before any of the body is read.

- the admin routes, `/events` when `events_token` is set and the `/recommend` routes when
  `read_token` is set need their bearer token (401);
- a POST body over its route's limit is refused from its Content-Length (413), one not sent as
  JSON too (415);
- then the whole body is read within `body_timeout_s` (else 408, and the connection is closed)
  and counted as it streams (413 past the limit); only then does the route run and take its
  in-flight units (`service.admission`), so a slow client holds no unit, only its socket.

Refusing costs next to nothing, so refusals cannot starve the requests already admitted. The
header deadline and size cap come before all this, in the HTTP protocol (`service.server`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .inspector import INSPECT_API
from .metrics import Metrics
from .settings import Settings
from .tracing import CURRENT_SPAN, HEADER, REQUEST_ID, Tracing, request_id

log = logging.getLogger("sine.service")
# an answer sent before the body was read whole: the rest of it must not be taken for the next
# request, so the connection closes after it
CLOSE = {"Connection": "close"}


def bearer_ok(authorization: bytes | str | None, token: SecretStr | None) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (never, without a token)."""
    if token is None or authorization is None:
        return False
    got = authorization if isinstance(authorization, bytes) else authorization.encode()
    return hmac.compare_digest(got, f"Bearer {token.get_secret_value()}".encode())


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                             and media.endswith(b"+json"))


class Guard:
    """ASGI middleware: tokens, body limits and content type, the body read under a deadline."""
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics,
                 tracing: Tracing | None = None):
        self.app, self.s, self.metrics, self.tracing = app, settings, metrics, tracing
        self.limits = {"/recommend/batch": settings.max_batch_body_bytes}
        self.default_limit = settings.max_body_bytes
        routes = {"/events": settings.events_token, "/recommend": settings.read_token,
                  "/recommend/batch": settings.read_token}
        self.tokens = {path: token for path, token in routes.items() if token is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])          # the last of repeated headers: enough here
        rid = request_id(headers.get(HEADER))
        REQUEST_ID.set(rid)                       # this request's task only: logs and problems
        if self.tracing is None:
            return await self._guarded(scope, receive, _echo_id(send, rid.encode()), headers)
        span = self.tracing.request(scope["method"], scope["path"], scope["headers"], rid)
        CURRENT_SPAN.set(span)
        try:
            return await self._guarded(scope, receive, _echo_id(send, rid.encode(), span,
                                                               self.tracing), headers)
        finally:
            span.end()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send,
                       headers: dict[bytes, bytes]) -> None:
        refusal = self._unauthorized(scope["path"], headers)
        if refusal is None and scope["method"] == "POST":
            refusal = self._refused_by_headers(scope["path"], headers)
        if refusal is not None:
            return await self._refuse(*refusal, scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default_limit)
        try:
            async with asyncio.timeout(self.s.body_timeout_s):
                body = await _read_body(receive, limit)
        except TimeoutError:
            return await self._refuse(408, f"The request body did not arrive within "
                                      f"{self.s.body_timeout_s:g} s (SINE_BODY_TIMEOUT_S).",
                                      CLOSE, scope, receive, send)
        except errors.BodyTooLarge as e:
            return await self._refuse(413, str(e.detail), CLOSE, scope, receive, send)
        if body is None:                              # the client went away
            return None
        return await self.app(scope, _replay(body, receive), send)

    def _unauthorized(self, path: str, headers: dict[bytes, bytes]
                      ) -> tuple[int, str, dict[str, str]] | None:
        if not (path.startswith("/admin/") or path in self.tokens):
            return None
        if path == INSPECT_API and self.s.inspector == "open":
            return None
        token = self.s.admin_token if path.startswith("/admin/") else self.tokens[path]
        if bearer_ok(headers.get(b"authorization"), token):
            return None
        if token is None:
            log.warning("admin route called while disabled", extra={"path": path})
        return (401, "A valid 'Authorization: Bearer <token>' header is required.",
                {"WWW-Authenticate": "Bearer", **CLOSE})

    def _refused_by_headers(self, path: str, headers: dict[bytes, bytes]
                            ) -> tuple[int, str, dict[str, str]] | None:
        length, ctype = headers.get(b"content-length"), headers.get(b"content-type")
        limit = self.limits.get(path, self.default_limit)
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and size > limit:
            return 413, f"The request body has {size} bytes; this route takes at most {limit}.", \
                CLOSE
        if (size or headers.get(b"transfer-encoding")) and (ctype is None or not _is_json(ctype)):
            got = ctype.decode("latin-1") if ctype else "no Content-Type"
            return 415, f"The body must be sent as application/json, not {got}.", CLOSE
        return None

    async def _refuse(self, status: int, detail: str, headers: dict[str, str] | None,
                      scope: Scope, receive: Receive, send: Send) -> None:
        slug = errors.SLUGS[status]
        self.metrics.failures.labels(slug).inc()
        await errors.problem(status, errors.TITLES[status], detail, slug, scope["path"],
                             headers)(scope, receive, send)


def _echo_id(send: Send, rid: bytes, span: object = None,
             tracing: Tracing | None = None) -> Send:
    """`send` that adds `X-Request-ID` to the answer (and its status to the request's span)."""
    async def echo(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg["headers"] = [*msg.get("headers", ()), (HEADER, rid)]
            if tracing is not None:
                tracing.answered(span, msg["status"])  # type: ignore[arg-type]
        await send(msg)
    return echo


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (None if the client disconnected); BodyTooLarge past `limit`."""
    chunks, got = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        got += len(chunk)
        if got > limit:
            raise errors.BodyTooLarge(limit)
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the route: the body read, in one message, then the client's own."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay
