"""The FastAPI app: `create_app(settings)` builds everything once and passes it down.

No `from __future__ import annotations` here: FastAPI reads the request models of the routes
from their annotations at run time, and they are local to `create_app`.
"""

import asyncio
import calendar
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Header
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index_builder import bundle as bundle_mod

from . import errors
from .admission import Admission
from .engine import Engine, EngineError, load_engine
from .history import HistoryError, HistoryStore
from .metrics import Metrics
from .pipeline import Query, Recommender, render
from .schemas import BatchResponse, EventResponse, Recommendation, ReloadRequest, request_models
from .server import LIMITS, ConnectionLimits
from .settings import Settings

log = logging.getLogger("sine.service")
JSON = "application/json"


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    store: HistoryStore | None
    recommender: Recommender
    admission: Admission
    engine: Engine | None = None
    not_ready: str | None = "the bundle is still loading"
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    floor_body: bytes = b""

    @property
    def bundle_root(self) -> Path | None:
        p = Path(self.settings.bundle)
        return p if (p / bundle_mod.CURRENT).exists() else None

    def serving(self) -> Engine:
        if self.engine is None:
            raise errors.NotReady(f"No bundle is being served: {self.not_ready}.",
                                  {"Retry-After": "5"})
        return self.engine


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                             and media.endswith(b"+json"))


def bearer_ok(authorization: bytes | str | None, token: SecretStr | None) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (never, without a token)."""
    if token is None or authorization is None:
        return False
    got = authorization if isinstance(authorization, bytes) else authorization.encode()
    return hmac.compare_digest(got, f"Bearer {token.get_secret_value()}".encode())


class Guard:
    """ASGI middleware in front of the routes, before any of the body is read:

    - the admin routes, and `/events` when `events_token` is set, need their bearer token (401);
    - a POST body over its route's limit is refused from its Content-Length (413), one not sent
      as JSON too (415);
    - then the whole body is read within `body_timeout_s` (else 408, and the connection is
      closed) and counted as it streams (413 past the limit); only then does the route run and
      take its in-flight units (`Admission`), so a slow client holds no unit, only its socket.

    Refusing costs next to nothing, so refusals cannot starve the requests already admitted."""

    def __init__(self, app: ASGIApp, st: State):
        self.app, self.st = app, st
        s = st.settings
        self.limits = {"/recommend/batch": s.max_batch_body_bytes}
        self.default_limit = s.max_body_bytes
        self.tokens = {"/events": s.events_token} if s.events_token is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        s = self.st.settings
        headers = dict(scope["headers"])          # the last of repeated headers: enough here
        if path.startswith("/admin/") or path in self.tokens:
            token = s.admin_token if path.startswith("/admin/") else self.tokens[path]
            if not bearer_ok(headers.get(b"authorization"), token):
                if token is None:
                    log.warning("admin route called while disabled", extra={"path": path})
                return await self._refuse(401, "A valid 'Authorization: Bearer <token>' header "
                                          "is required.", scope, receive, send,
                                          {"WWW-Authenticate": "Bearer"})
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length, ctype = headers.get(b"content-length"), headers.get(b"content-type")
        chunked = headers.get(b"transfer-encoding")
        limit = self.limits.get(path, self.default_limit)
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and size > limit:
            return await self._refuse(413, f"The request body has {size} bytes; this route "
                                      f"takes at most {limit}.", scope, receive, send, CLOSE)
        if (size or chunked) and (ctype is None or not _is_json(ctype)):
            got = ctype.decode("latin-1") if ctype else "no Content-Type"
            return await self._refuse(415, f"The body must be sent as application/json, "
                                      f"not {got}.", scope, receive, send, CLOSE)
        try:
            async with asyncio.timeout(s.body_timeout_s):
                body = await _read_body(receive, limit)
        except TimeoutError:
            return await self._refuse(408, f"The request body did not arrive within "
                                      f"{s.body_timeout_s:g} s (SINE_BODY_TIMEOUT_S).", scope,
                                      receive, send, CLOSE)
        except errors.BodyTooLarge as e:
            return await self._refuse(413, str(e.detail), scope, receive, send, CLOSE)
        if body is None:                              # the client went away
            return None
        return await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, status: int, detail: str, scope: Scope, receive: Receive,
                      send: Send, headers: dict[str, str] | None = None) -> None:
        slug = errors.SLUGS[status]
        self.st.metrics.failures.labels(slug).inc()
        await errors.problem(status, errors.TITLES[status], detail, slug, scope["path"],
                             headers)(scope, receive, send)


# an answer sent before the body was read whole: the rest of it must not be taken for the next
# request, so the connection closes after it
CLOSE = {"Connection": "close"}


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


def _load(st: State, path: str | Path) -> Engine:
    s = st.settings
    return load_engine(path, providers=s.providers, allow_cpu_fallback=s.allow_cpu_fallback,
                       intra_op_threads=s.intra_op_threads, faiss_gpu=s.faiss_gpu,
                       search_params=s.search_params, warm_batch=s.batch_max_size,
                       faiss_threads=s.faiss_threads, index_mmap=s.index_mmap)


async def reload(st: State, version: str | None = None) -> Engine:
    """Load, validate and warm a bundle beside the live one, then swap. Whatever fails on the
    way is a refused bundle (409, counted, logged): the old one keeps serving."""
    async with st.reload_lock:
        root = st.bundle_root
        if version is not None:
            if root is None:
                raise errors.ReloadRefused(f"{st.settings.bundle} is a single bundle, not a "
                                           f"bundle root; a version cannot be chosen.")
            try:
                path: Path = root / bundle_mod.check_version(version)
            except bundle_mod.BundleError as e:
                raise errors.BadRequest(str(e)) from None
        else:
            path = Path(st.settings.bundle)
        try:
            eng = await asyncio.to_thread(_load, st, path)
        except Exception as e:       # an encoder ORT cannot parse, a manifest lacking a field...
            st.metrics.reloads.labels("refused").inc()
            reason = str(e) if isinstance(e, (EngineError, bundle_mod.BundleError)) \
                else f"{type(e).__name__}: {e}"
            log.error("bundle refused", extra={"path": str(path), "reason": reason})
            raise errors.ReloadRefused(f"{reason} The served version is unchanged "
                                       f"({st.engine.version if st.engine else 'none'}).") from e
        old = st.engine
        _serve(st, eng)                          # in-flight requests keep their reference to `old`
        st.metrics.reloads.labels("ok").inc()
        log.info("bundle swapped", extra={"old": old.version if old else None, "new": eng.version})
        return eng


def _serve(st: State, eng: Engine) -> None:
    """Make `eng` the served bundle."""
    st.engine, st.not_ready = eng, None
    m = eng.bundle.manifest
    st.metrics.set_bundle(eng.version, m["index"]["factory"], eng.n_items)
    if st.settings.floor_endpoint:
        st.floor_body = render(eng, Query("0", st.settings.max_n),
                               eng.popular[: st.settings.max_n],
                               eng.popularity[eng.popular[: st.settings.max_n]], None)
    if st.settings.gc_freeze:
        # what is loaded now lives as long as the bundle: keep it out of the collector's scans
        gc.collect()
        gc.freeze()


async def _watch(st: State) -> None:
    """Follow the root's `current` pointer. Nothing that goes wrong ends the loop: a pointer
    that cannot be read is retried, a version that cannot be loaded is refused and counted,
    and a later good version is loaded."""
    root = st.bundle_root
    if root is None:
        return
    m = st.metrics
    m.watcher_up.set(1)
    # what is served, not what `current` says when this task first runs: a version published
    # between the start-up load and then would otherwise never be loaded
    last: str | None = st.engine.version if st.engine is not None else None
    try:
        while True:
            await asyncio.sleep(st.settings.watch_interval_s)
            try:
                cur = await asyncio.to_thread(bundle_mod.current_version, root)
                m.watch_time.set(time.time())
                served = st.engine.version if st.engine is not None else None
                m.behind_current.set(int(cur != served))
                if cur == last:
                    continue
                last = cur
                log.info("current pointer moved", extra={"current": cur})
                try:
                    await reload(st)
                except errors.ServiceError:
                    pass        # logged and counted in reload(); keep serving the old version
                served = st.engine.version if st.engine is not None else None
                m.behind_current.set(int(cur != served))
            except Exception as e:
                log.error("bundle watch step failed; watching on",
                          extra={"reason": f"{type(e).__name__}: {e}"})
    finally:
        m.watcher_up.set(0)


async def _freshness(st: State) -> None:
    """The gauges read when /metrics is scraped: Redis up, the bundle's age, the click log's
    length, the exporter's lag and the entries the cap removed unexported, the last refresh."""
    m = st.metrics
    if st.engine is not None:
        created = st.engine.bundle.manifest.get("created")
        if created:
            born = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
            m.bundle_age.set(time.time() - born)
    if st.store is not None:
        m.redis_up.set(int(await _redis_ok(st) is None))
        if st.settings.click_log:
            stream = await st.store.stream_info(st.settings.click_export_group)
            if stream is not None:
                m.stream_length.set(stream.entries)
                m.stream_lag.set(stream.lag)
                m.stream_lost.set(stream.lost)
    root = st.bundle_root
    if root is not None:
        report = read_refresh_report(root)
        if report is not None:
            m.set_refresh(report)


async def _redis_ok(st: State) -> str | None:
    """None when Redis answers a ping, else why not."""
    if st.store is None:
        return "not configured"
    try:
        await st.store.ping()
    except HistoryError as e:
        st.metrics.redis_up.set(0)
        return str(e)
    st.metrics.redis_up.set(1)
    return None


def read_refresh_report(root: Path) -> dict[str, Any] | None:
    """`<root>/refresh.json`, the last `sine refresh` outcome, or None (absent or unreadable)."""
    try:
        report: dict[str, Any] = orjson.loads((root / bundle_mod.REFRESH_REPORT).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle-v2 package, not a CDN: /docs works offline."""
    import swagger_ui_bundle

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                                   title=f"{app.title} - docs",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings()
    metrics = Metrics()
    store = HistoryStore(s, on_error=lambda op: metrics.redis_errors.labels(op).inc()) \
        if s.redis_url else None
    st = State(s, metrics, store, Recommender(s, metrics, store),
               Admission(s.max_in_flight, s.max_batch_in_flight))
    limits = ConnectionLimits.of(s, on_refused=lambda why: metrics.failures.labels(why).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        log.info("starting", extra={"bundle": s.bundle, "redis": s.redis_url_redacted(),
                                    "providers": s.providers, "batching": s.batching})
        try:
            _serve(st, await asyncio.to_thread(_load, st, s.bundle))
        except Exception as e:     # whatever it is, the reason is readiness's detail
            st.not_ready = str(e) if isinstance(e, (EngineError, bundle_mod.BundleError)) \
                else f"{type(e).__name__}: {e}"
            log.error("bundle not loaded; not ready", extra={"reason": st.not_ready})
        if store is not None:
            await store.start()
        if s.watch_interval_s > 0:
            st.watcher = asyncio.create_task(_watch(st))
        # uvicorn hands this state to every connection's protocol (service.server)
        yield {LIMITS: limits}
        if st.watcher:
            st.watcher.cancel()
        if store:
            await store.close()
        log.info("stopped")

    app = FastAPI(title="sine-retrieval", version="1", docs_url=None, redoc_url=None,
                  description="Candidate retrieval with SINE: a user's recent clicks in, the "
                              "top-n items by inner product with their interest vectors out. "
                              "Every error is an RFC 9457 `application/problem+json`.",
                  lifespan=lifespan)
    app.state.sine = st
    app.add_middleware(Guard, st=st)
    errors.install(app, on_error=lambda reason: metrics.failures.labels(reason).inc())
    _docs(app)
    RecommendRequest, BatchRequest, EventRequest = request_models(s)
    t_recommend = metrics.child(metrics.request, "recommend")
    t_batch = metrics.child(metrics.request, "recommend_batch")
    t_events = metrics.child(metrics.request, "events")
    recommender, admission = st.recommender, st.admission

    def query(r: Any) -> Query:
        return Query(str(r.user_id), r.n, r.exclude_seen, r.mode, r.include_interests)

    @app.post("/recommend", response_model=Recommendation, tags=["retrieval"],
              responses=errors.responses(400, 408, 413, 415, 422, 429, 503))
    async def recommend(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
        """Top-n candidates for one user from their newest clicks in Redis."""
        t0 = time.perf_counter()
        engine = st.serving()
        with admission.admit(1):
            (answer,) = await recommender.recommend(engine, [query(req)])
        t_recommend.observe(time.perf_counter() - t0)
        return Response(answer.body, media_type=JSON,
                        headers={"Server-Timing": answer.server_timing()})

    @app.post("/recommend/batch", response_model=BatchResponse, tags=["retrieval"],
              responses=errors.responses(400, 408, 413, 415, 422, 429, 503))
    async def recommend_batch(req: BatchRequest) -> Response:  # type: ignore[valid-type]
        """Many users in one call, sharing micro-batches (Redis read, encoder, search). Admitted
        by its number of users; a large one (bulk) yields to single requests."""
        t0 = time.perf_counter()
        engine = st.serving()
        queries = [query(r) for r in req.requests]  # type: ignore[attr-defined]
        bulk = len(queries) > s.interactive_batch_users
        with admission.admit(len(queries), bulk=bulk):
            answers = await recommender.recommend(engine, queries, bulk=bulk)
        worst: dict[str, float] = {}
        for a in answers:
            for k, v in a.timings.items():
                worst[k] = max(worst.get(k, 0.0), v)
        t_batch.observe(time.perf_counter() - t0)
        return Response(b'{"results":[' + b",".join(a.body for a in answers) + b"]}",
                        media_type=JSON, headers={"Server-Timing": ", ".join(
                            f"{k};dur={v * 1000:.3f}" for k, v in worst.items())})

    @app.post("/events", response_model=EventResponse, tags=["history"],
              responses=errors.responses(400, 401, 408, 413, 415, 422, 429, 503))
    async def events(req: EventRequest) -> Response:  # type: ignore[valid-type]
        """Record a click: it becomes the newest entry of the user's history (capped) and, with
        the click log on, an entry of the log; both or neither. A retry with the same
        `event_id` (ids are per user) is answered `duplicate: true` and writes nothing. With
        `SINE_EVENTS_TOKEN` set, the call needs `Authorization: Bearer <token>`."""
        t0 = time.perf_counter()
        if store is None:
            raise errors.HistoryUnavailable("No history store is configured (SINE_REDIS_URL).")
        user = str(req.user_id)  # type: ignore[attr-defined]
        with admission.admit(1):
            try:
                length, eid, dup = await store.append(
                    user, str(req.item_id), req.event_id)  # type: ignore[attr-defined]
            except HistoryError as e:
                raise errors.HistoryUnavailable(
                    f"The click may not have been recorded: {e}. Retry with the same event_id "
                    f"(it is stored once).", {"Retry-After": "1"}) from e
        metrics.events.labels("duplicate" if dup else "recorded").inc()
        t_events.observe(time.perf_counter() - t0)
        return Response(orjson.dumps({"user_id": user, "history_length": length,
                                      "event_id": eid, "duplicate": dup}), media_type=JSON)

    @app.get("/livez", tags=["operations"])
    async def livez() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses=errors.responses(503))
    async def readyz() -> Any:
        """Ready when a warmed bundle is served: what this pod alone decides. Redis is not a
        condition (without it every pod answers from popularity, flagged; a Redis outage
        must not take every endpoint out of service); its state is in the body, in
        `GET /health/redis` and in `sine_redis_up`."""
        if st.engine is None:
            return errors.problem(503, "Not ready", f"bundle: {st.not_ready}", "not-ready",
                                  "/readyz", {"Retry-After": "5"})
        eng = st.engine
        why = await _redis_ok(st)
        return {"status": "ready", "version": eng.version, "providers": eng.providers,
                "faiss": eng.faiss_device, "items": eng.n_items,
                "graph": eng.bundle.manifest["onnx"].get("graph", "plain"),
                "redis": "ok" if why is None else
                ("not configured" if store is None else f"unavailable: {why}")}

    @app.get("/health/redis", tags=["operations"], responses=errors.responses(503))
    async def health_redis() -> Any:
        """Whether Redis answers a ping now (for operators and alerts; not readiness)."""
        why = await _redis_ok(st)
        if why is not None:
            return errors.problem(503, "Redis unavailable", f"redis: {why}", "redis-unavailable",
                                  "/health/redis")
        return {"status": "ok"}

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        metrics.in_flight.set(admission.in_flight)
        await _freshness(st)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/bundle", tags=["operations"], responses=errors.responses(503))
    async def bundle_info(authorization: str | None = Header(None)) -> dict[str, Any]:
        """The served bundle: its version, item count and index; the whole manifest (commit,
        libraries, data set, offline metrics) with the admin token or
        SINE_BUNDLE_DETAILS_PUBLIC."""
        m = st.serving().bundle.manifest
        if s.bundle_details_public or bearer_ok(authorization, s.admin_token):
            return m
        return {"version": m["version"], "created": m.get("created"),
                "items": {"count": m["items"]["count"]},
                "index": {"factory": m["index"]["factory"]}}

    @app.post("/admin/reload", tags=["operations"],
              responses=errors.responses(400, 401, 409, 413, 415, 422))
    async def admin_reload(body: ReloadRequest | None = None) -> dict[str, str | None]:
        """Load, validate and warm a bundle version beside the live one, then swap. Needs
        `Authorization: Bearer <SINE_ADMIN_TOKEN>` (checked before the body is read); without
        the setting every call is 401."""
        old = st.engine.version if st.engine else None
        eng = await reload(st, body.version if body else None)
        return {"previous": old, "version": eng.version}

    if s.floor_endpoint:
        @app.post("/floor", include_in_schema=False)
        async def floor(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
            with admission.admit(1):
                return Response(st.floor_body, media_type=JSON)

    return app
