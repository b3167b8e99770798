"""The FastAPI app: `create_app(settings)` builds everything once and passes it down."""

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from fastapi import FastAPI, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from index_builder import bundle as bundle_mod

from . import errors
from .engine import Engine, EngineError, load_engine
from .history import HistoryError, HistoryStore
from .metrics import Metrics
from .pipeline import Query, Recommender
from .schemas import (BatchResponse, EventResponse, Recommendation, ReloadRequest,
                      request_models)
from .settings import Settings

log = logging.getLogger("sine.service")


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
    watcher: asyncio.Task | None = None
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


class Admission:
    """Bounded concurrency, checked before the body is read or parsed, so that refusing costs
    next to nothing and refusals cannot starve the requests already admitted."""

    GUARDED = ("/recommend", "/recommend/batch", "/events", "/floor")

    def __init__(self, app, st: State):
        self.app, self.st = app, st

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.GUARDED:
            return await self.app(scope, receive, send)
        st = self.st
        limit = st.settings.max_in_flight
        if st.in_flight >= limit:
            st.metrics.failures.labels("overloaded").inc()
            refusal = errors.problem(429, "Too many requests in flight",
                                     f"{st.in_flight} requests are in flight (limit {limit}); "
                                     f"retry shortly.", "overloaded", scope["path"],
                                     {"Retry-After": "1"})
            return await refusal(scope, receive, send)
        st.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            st.in_flight -= 1


def _json(body, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


def _server_timing(t: dict[str, float]) -> dict[str, str]:
    return {"Server-Timing": ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in t.items())}


def _load(st: State, path: str | Path) -> Engine:
    s = st.settings
    return load_engine(path, providers=s.providers, allow_cpu_fallback=s.allow_cpu_fallback,
                       intra_op_threads=s.intra_op_threads, faiss_gpu=s.faiss_gpu,
                       search_params=s.search_params, warm_batch=s.batch_max_size,
                       faiss_threads=s.faiss_threads)


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
    items = st.recommender.popular(eng, st.settings.max_n, set())
    st.floor_body = orjson.dumps({"user_id": "0", "version": eng.version, "mode": "aggregate",
                                  "fallback": None, "items": items, "interest_weights": None})


async def _watch(st: State) -> None:
    root = st.bundle_root
    if root is None:
        return
    try:
        last = bundle_mod.current_version(root)
    except bundle_mod.BundleError:
        last = None
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


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings()
    metrics = Metrics()
    store = HistoryStore(s, on_error=lambda op: metrics.redis_errors.labels(op).inc()) \
        if s.redis_url else None
    st = State(s, metrics, store, Recommender(s, metrics, store))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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

    app = FastAPI(title="sine-retrieval", version="1",
                  description="Candidate retrieval with SINE: a user's recent clicks in, the "
                              "top-n items by inner product with their interest vectors out.",
                  lifespan=lifespan)
    app.state.sine = st
    app.add_middleware(Admission, st=st)
    errors.install(app, on_error=lambda reason: metrics.failures.labels(reason).inc())
    RecommendRequest, BatchRequest, EventRequest = request_models(s)

    def query(r) -> Query:
        return Query(str(r.user_id), r.n, r.exclude_seen, r.mode, r.include_interests)

    @app.post("/recommend", response_model=Recommendation, tags=["retrieval"],
              responses={422: {"description": "Invalid request (problem+json)"},
                         429: {"description": "Overloaded"}, 503: {"description": "Not ready"}})
    async def recommend(req: RecommendRequest):
        """Top-n candidates for one user from their newest clicks in Redis."""
        t0 = time.perf_counter()
        eng = st.serving()
        q = query(req)
        timings: dict[str, float] = {}
        (hist,), unavailable = await st.recommender.histories([q.user_id], timings)
        body = await st.recommender.recommend(eng, q, hist, unavailable, timings)
        metrics.request.labels("recommend").observe(time.perf_counter() - t0)
        return _json(body, _server_timing(timings))

    @app.post("/recommend/batch", response_model=BatchResponse, tags=["retrieval"])
    async def recommend_batch(req: BatchRequest):
        """Many users in one call; their encodes and searches share micro-batches."""
        t0 = time.perf_counter()
        eng = st.serving()
        qs = [query(r) for r in req.requests]
        timings: dict[str, float] = {}
        hists, unavailable = await st.recommender.histories([q.user_id for q in qs], timings)
        bodies = await asyncio.gather(*(st.recommender.recommend(eng, q, h, unavailable, {})
                                        for q, h in zip(qs, hists)))
        metrics.request.labels("recommend_batch").observe(time.perf_counter() - t0)
        return _json({"results": bodies}, _server_timing(timings))

    @app.post("/events", response_model=EventResponse, tags=["history"],
              responses={503: {"description": "History store unavailable"}})
    async def events(req: EventRequest):
        """Record a click: it becomes the newest entry of the user's history (capped)."""
        t0 = time.perf_counter()
        if store is None:
            raise errors.HistoryUnavailable("No history store is configured (SINE_REDIS_URL).")
        user = str(req.user_id)
        try:
            length = await store.append(user, str(req.item_id))
        except HistoryError as e:
            raise errors.HistoryUnavailable(f"The click was not recorded: {e}.",
                                            {"Retry-After": "1"}) from e
        metrics.request.labels("events").observe(time.perf_counter() - t0)
        return _json({"user_id": user, "history_length": length})

    @app.get("/livez", tags=["operations"])
    async def livez():
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
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
        eng = st.engine
        return {"status": "ready", "version": eng.version, "providers": eng.providers,
                "faiss": eng.faiss_device, "items": eng.n_items,
                "redis": "ok" if store is not None else "not configured"}

    @app.get("/metrics", tags=["operations"])
    async def prometheus():
        metrics.in_flight.set(st.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/bundle", tags=["operations"])
    async def bundle_info():
        """The served bundle's manifest."""
        return st.serving().bundle.manifest

    @app.post("/admin/reload", tags=["operations"],
              responses={401: {"description": "Missing or wrong token"},
                         409: {"description": "Bundle refused; the old one keeps serving"}})
    async def admin_reload(body: ReloadRequest | None = None,
                           authorization: str | None = Header(None)):
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
        async def floor(req: RecommendRequest):
            return Response(st.floor_body, media_type="application/json")

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory service.app:app_from_env`."""
    from .logs import configure
    s = Settings()
    configure(s.log_level)
    return create_app(s)
