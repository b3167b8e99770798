"""The FastAPI app: `create_app(settings)` builds everything once and passes it down.

No `from __future__ import annotations` here: FastAPI reads the request models of the routes
from their annotations at run time, and they are local to `create_app`.
"""

import asyncio
import calendar
import gc
import hmac
import logging
import os
import tempfile
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index_builder import bundle as bundle_mod

from . import errors
from .engine import Engine, EngineError, load_engine
from .history import HistoryError, HistoryStore
from .metrics import Metrics
from .pipeline import Query, Recommender, render
from .schemas import BatchResponse, EventResponse, Recommendation, ReloadRequest, request_models
from .settings import Settings

log = logging.getLogger("sine.service")
JSON = "application/json"


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    store: HistoryStore | None
    recommender: Recommender
    engine: Engine | None = None
    not_ready: str | None = "the bundle is still loading"
    in_flight: int = 0
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


class Guard:
    """ASGI middleware in front of the routes. From the headers alone, before any of the body is
    read: a POST body over its route's limit is refused (413), one not sent as JSON too (415), and
    beyond `max_in_flight` requests the guarded routes answer 429. A body without Content-Length
    is counted as it streams and refused once past the limit. Refusing costs next to nothing, so
    refusals cannot starve the requests already admitted."""

    GUARDED = frozenset(("/recommend", "/recommend/batch", "/events", "/floor"))

    def __init__(self, app: ASGIApp, st: State):
        self.app, self.st = app, st
        s = st.settings
        self.limits = {"/recommend/batch": s.max_batch_body_bytes}
        self.default_limit = s.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        st = self.st
        if scope["method"] == "POST":
            length = ctype = chunked = None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    length = v
                elif k == b"content-type":
                    ctype = v
                elif k == b"transfer-encoding":
                    chunked = v
            limit = self.limits.get(path, self.default_limit)
            size = int(length) if length is not None and length.isdigit() else None
            if size is not None and size > limit:
                return await self._refuse(413, f"The request body has {size} bytes; this route "
                                          f"takes at most {limit}.", scope, receive, send)
            if (size or chunked) and (ctype is None or not _is_json(ctype)):
                got = ctype.decode("latin-1") if ctype else "no Content-Type"
                return await self._refuse(415, f"The body must be sent as application/json, "
                                          f"not {got}.", scope, receive, send)
            if size is None and chunked:
                receive = _counting(receive, limit)
        if path not in self.GUARDED:
            return await self.app(scope, receive, send)
        limit_n = st.settings.max_in_flight
        if st.in_flight >= limit_n:
            st.metrics.failures.labels("overloaded").inc()
            refusal = errors.problem(429, "Too many requests in flight",
                                     f"{st.in_flight} requests are in flight (limit {limit_n}); "
                                     f"retry shortly.", "overloaded", path, {"Retry-After": "1"})
            return await refusal(scope, receive, send)
        st.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            st.in_flight -= 1

    async def _refuse(self, status: int, detail: str, scope: Scope, receive: Receive,
                      send: Send) -> None:
        slug = errors.SLUGS[status]
        self.st.metrics.failures.labels(slug).inc()
        await errors.problem(status, errors.TITLES[status], detail, slug,
                             scope["path"])(scope, receive, send)


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive`, refusing (413) once more than `limit` body bytes have come in."""
    got = 0

    async def counted() -> Message:
        nonlocal got
        msg = await receive()
        if msg["type"] == "http.request":
            got += len(msg.get("body", b""))
            if got > limit:
                raise errors.BodyTooLarge(limit)
        return msg
    return counted


def _load(st: State, path: str | Path) -> Engine:
    s = st.settings
    return load_engine(path, providers=s.providers, allow_cpu_fallback=s.allow_cpu_fallback,
                       intra_op_threads=s.intra_op_threads, faiss_gpu=s.faiss_gpu,
                       search_params=s.search_params, warm_batch=s.batch_max_size,
                       faiss_threads=s.faiss_threads, index_mmap=s.index_mmap)


async def reload(st: State, version: str | None = None) -> Engine:
    """Load, validate and warm a bundle beside the live one, then swap; refuse a broken one."""
    async with st.reload_lock:
        root = st.bundle_root
        if version is not None:
            if root is None:
                raise errors.ReloadRefused(f"{st.settings.bundle} is a single bundle, not a "
                                           f"bundle root; a version cannot be chosen.")
            if "/" in version or version in ("", ".", ".."):
                raise errors.BadRequest(f"version {version!r} is not a version name.")
            path: Path = root / version
        else:
            path = Path(st.settings.bundle)
        try:
            eng = await asyncio.to_thread(_load, st, path)
        except (EngineError, bundle_mod.BundleError) as e:
            st.metrics.reloads.labels("refused").inc()
            log.error("bundle refused", extra={"path": str(path), "reason": str(e)})
            raise errors.ReloadRefused(f"{e} The served version is unchanged "
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
    st.floor_body = render(eng, Query("0", st.settings.max_n), eng.popular[: st.settings.max_n],
                           eng.popularity[eng.popular[: st.settings.max_n]], None)
    if st.settings.gc_freeze:
        # what is loaded now lives as long as the bundle: keep it out of the collector's scans
        gc.collect()
        gc.freeze()


async def _watch(st: State) -> None:
    root = st.bundle_root
    if root is None:
        return
    # what is served, not what `current` says when this task first runs: a version published
    # between the start-up load and then would otherwise never be loaded
    last: str | None = st.engine.version if st.engine is not None else None
    while True:
        await asyncio.sleep(st.settings.watch_interval_s)
        try:
            cur = await asyncio.to_thread(bundle_mod.current_version, root)
        except (bundle_mod.BundleError, OSError):
            continue
        if cur == last:
            continue
        last = cur
        log.info("current pointer moved", extra={"current": cur})
        try:
            await reload(st)
        except errors.ServiceError:
            pass        # logged and counted in reload(); keep serving the old version


async def _freshness(st: State) -> None:
    """The gauges of how fresh the model is, read when /metrics is scraped: the bundle's age,
    the click log's length and the exporter's lag, the last `sine refresh` outcome."""
    m = st.metrics
    if st.engine is not None:
        created = st.engine.bundle.manifest.get("created")
        if created:
            born = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
            m.bundle_age.set(time.time() - born)
    if st.store is not None and st.settings.click_log:
        stream = await st.store.stream_info(st.settings.click_export_group)
        if stream is not None:
            m.stream_length.set(stream[0])
            if stream[1] is not None:
                m.stream_lag.set(stream[1])
    root = st.bundle_root
    if root is not None:
        report = read_refresh_report(root)
        if report is not None:
            m.set_refresh(report)


def read_refresh_report(root: Path) -> dict[str, Any] | None:
    """`<root>/refresh.json`, the last `sine refresh` outcome, or None (absent or unreadable)."""
    try:
        report: dict[str, Any] = orjson.loads((root / bundle_mod.REFRESH_REPORT).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return report


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
    st = State(s, metrics, store, Recommender(s, metrics, store))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting", extra={"bundle": s.bundle, "redis": s.redis_url_redacted(),
                                    "providers": s.providers, "batching": s.batching})
        try:
            _serve(st, await asyncio.to_thread(_load, st, s.bundle))
        except (EngineError, bundle_mod.BundleError) as e:
            st.not_ready = str(e)
            log.error("bundle not loaded; not ready", extra={"reason": str(e)})
        if s.watch_interval_s > 0:
            st.watcher = asyncio.create_task(_watch(st))
        yield
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
    recommender = st.recommender

    def query(r: Any) -> Query:
        return Query(str(r.user_id), r.n, r.exclude_seen, r.mode, r.include_interests)

    @app.post("/recommend", response_model=Recommendation, tags=["retrieval"],
              responses=errors.responses(400, 413, 415, 422, 429, 503))
    async def recommend(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
        """Top-n candidates for one user from their newest clicks in Redis."""
        t0 = time.perf_counter()
        (answer,) = await recommender.recommend(st.serving(), [query(req)])
        t_recommend.observe(time.perf_counter() - t0)
        return Response(answer.body, media_type=JSON,
                        headers={"Server-Timing": answer.server_timing()})

    @app.post("/recommend/batch", response_model=BatchResponse, tags=["retrieval"],
              responses=errors.responses(400, 413, 415, 422, 429, 503))
    async def recommend_batch(req: BatchRequest) -> Response:  # type: ignore[valid-type]
        """Many users in one call; they share one micro-batch (Redis read, encoder, search)."""
        t0 = time.perf_counter()
        answers = await recommender.recommend(st.serving(),
                                              [query(r) for r in req.requests])  # type: ignore[attr-defined]
        worst: dict[str, float] = {}
        for a in answers:
            for k, v in a.timings.items():
                worst[k] = max(worst.get(k, 0.0), v)
        t_batch.observe(time.perf_counter() - t0)
        return Response(b'{"results":[' + b",".join(a.body for a in answers) + b"]}",
                        media_type=JSON, headers={"Server-Timing": ", ".join(
                            f"{k};dur={v * 1000:.3f}" for k, v in worst.items())})

    @app.post("/events", response_model=EventResponse, tags=["history"],
              responses=errors.responses(400, 413, 415, 422, 429, 503))
    async def events(req: EventRequest) -> Response:  # type: ignore[valid-type]
        """Record a click: it becomes the newest entry of the user's history (capped) and, with
        the click log on, an entry of the log; both or neither. A retry with the same
        `event_id` is answered `duplicate: true` and writes nothing."""
        t0 = time.perf_counter()
        if store is None:
            raise errors.HistoryUnavailable("No history store is configured (SINE_REDIS_URL).")
        user = str(req.user_id)  # type: ignore[attr-defined]
        try:
            length, eid, dup = await store.append(
                user, str(req.item_id), req.event_id)  # type: ignore[attr-defined]
        except HistoryError as e:
            raise errors.HistoryUnavailable(f"The click was not recorded: {e}.",
                                            {"Retry-After": "1"}) from e
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
        """Ready when a warmed bundle is served and Redis answers a ping."""
        reasons = []
        if st.engine is None:
            reasons.append(f"bundle: {st.not_ready}")
        if store is not None:
            try:
                await store.ping()
            except HistoryError as e:
                reasons.append(f"redis: {e}")
        if reasons:
            return errors.problem(503, "Not ready", "; ".join(reasons), "not-ready", "/readyz")
        eng = st.serving()
        return {"status": "ready", "version": eng.version, "providers": eng.providers,
                "faiss": eng.faiss_device, "items": eng.n_items,
                "graph": eng.bundle.manifest["onnx"].get("graph", "plain"),
                "redis": "ok" if store is not None else "not configured"}

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        metrics.in_flight.set(st.in_flight)
        await _freshness(st)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/bundle", tags=["operations"], responses=errors.responses(503))
    async def bundle_info() -> dict[str, Any]:
        """The served bundle's manifest."""
        return st.serving().bundle.manifest

    @app.post("/admin/reload", tags=["operations"],
              responses=errors.responses(400, 401, 404, 409, 413, 415, 422))
    async def admin_reload(body: ReloadRequest | None = None,
                           authorization: str | None = Header(None)) -> dict[str, str | None]:
        """Load, validate and warm a bundle version beside the live one, then swap."""
        if s.admin_token is None:
            raise errors.Disabled("Reload is disabled: set SINE_ADMIN_TOKEN to enable it.")
        want = f"Bearer {s.admin_token.get_secret_value()}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), want.encode()):
            raise errors.Unauthorized("A valid 'Authorization: Bearer <token>' header is required.",
                                      {"WWW-Authenticate": "Bearer"})
        old = st.engine.version if st.engine else None
        eng = await reload(st, body.version if body else None)
        return {"previous": old, "version": eng.version}

    if s.floor_endpoint:
        @app.post("/floor", include_in_schema=False)
        async def floor(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
            return Response(st.floor_body, media_type=JSON)

    return app


def serve(settings: Settings) -> None:
    """`sine serve`: refuse a broken bundle at once (with the reason), then run uvicorn, in
    this process or, with `workers` > 1, in that many worker processes on one port."""
    import uvicorn

    from .logs import configure

    bundle_mod.load(settings.bundle, verify_hashes=True, deep=False)
    configure(settings.log_level)
    common: dict[str, Any] = dict(host=settings.host, port=settings.port, log_config=None,
                                  access_log=settings.access_log,
                                  timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # the workers are new interpreters: they rebuild these settings from the environment, and
    # prometheus_client picks its multiprocess mode from PROMETHEUS_MULTIPROC_DIR at import
    folder = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="sine-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.db"):
        f.unlink()
    os.environ.update(settings.to_env())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    uvicorn.run("service.app:worker_app", factory=True, workers=settings.workers, **common)


def worker_app() -> FastAPI:
    """One worker of `sine serve --workers N`: the settings its parent exported."""
    from .logs import configure

    settings = Settings()
    configure(settings.log_level)
    return create_app(settings)
