"""The FastAPI app: `create_app(settings)` builds everything once and wires it together: the
state (`service.state`), the guard (`service.guard`), the error mapping (`service.errors`), the
routers (`service.routers`), the bundle's lifecycle (`service.lifecycle`) and the offline docs.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from . import errors, lifecycle
from .guard import Guard
from .routers import admin, events, inspection, operations, retrieval
from .routers.direct import DirectRoutes
from .schemas import request_models
from .server import LIMITS, ConnectionLimits
from .settings import Settings
from .state import State
from .version import __version__

log = logging.getLogger("sine.service")
OPENAPI = "/openapi.json"


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
    st = State.of(s)
    metrics = st.metrics
    limits = ConnectionLimits.of(s, on_refused=lambda why: metrics.failures.labels(why).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        log.info("starting", extra={"bundle": s.bundle, "redis": s.redis_url_redacted(),
                                    "providers": s.providers, "batching": s.batching,
                                    "traces": s.otel_traces_exporter})
        await lifecycle.start(st)
        if st.store is not None:
            await st.store.start()
        if s.watch_interval_s > 0:
            st.watcher = asyncio.create_task(lifecycle.watch(st))
        if st.shadow is not None:
            st.shadow.start()
        # uvicorn hands this state to every connection's protocol (service.server)
        yield {LIMITS: limits}
        if st.watcher:
            st.watcher.cancel()
        if st.shadow is not None:
            await st.shadow.stop()
        if st.store:
            await st.store.close()
        if st.tracing:
            st.tracing.shutdown()
        log.info("stopped")

    app = FastAPI(title="sine-retrieval", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None,       # served below, its bytes built once
                  description="Candidate retrieval with SINE: a user's recent clicks in, the "
                              "top-n items by inner product with their interest vectors out. "
                              "Every error is an RFC 9457 `application/problem+json`.",
                  lifespan=lifespan)
    app.state.sine = st
    models = request_models(s)
    count = lambda reason: metrics.failures.labels(reason).inc()
    if s.direct_routes:         # inside the guard: added first, so it wraps less
        app.add_middleware(DirectRoutes, state=st, count=count,
                           routes=retrieval.direct_routes(models, s.floor_endpoint),
                           probes=operations.direct_probes())
    app.add_middleware(Guard, settings=s, metrics=metrics, tracing=st.tracing)
    errors.install(app, on_error=count)
    _docs(app)
    # straight onto the app, not include_router: an included router is a dispatch hop per request
    retrieval.register(app, models, floor_endpoint=s.floor_endpoint)
    events.register(app, models)
    operations.register(app)
    admin.register(app)
    if s.inspector != "off":
        inspection.register(app, models)
    _openapi(app)
    return app


def _openapi(app: FastAPI) -> None:
    """`GET /openapi.json` as bytes serialized on first use: FastAPI's own route serializes the
    21 kB document on every request, and a client pipelining requests it never reads had the
    server do that hundreds of times a second (loadtests idle-sockets)."""
    built: list[bytes] = []

    async def openapi() -> Response:
        if not built:
            built.append(orjson.dumps(app.openapi()))
        return Response(built[0], media_type="application/json")

    app.openapi_url = OPENAPI
    app.add_api_route(OPENAPI, openapi, methods=["GET"], include_in_schema=False)
