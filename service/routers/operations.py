"""Probes, metrics and the served bundle: `/livez`, `/readyz`, `/health/redis`, `/metrics`,
`/bundle`."""
from enum import Enum
from typing import Any

from fastapi import Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import errors, lifecycle
from ..deps import StateDep
from ..guard import bearer_ok
from ..stages import resolve_search
from . import Router


async def livez(st: StateDep) -> dict[str, str] | JSONResponse:
    """The process answers, and has served a bundle within `liveness_without_bundle_s` of
    start-up (or of losing it): past that, 503, and the orchestrator restarts it."""
    why = lifecycle.alive(st)
    if why is not None:
        return errors.problem(503, "Not alive", why, "not-alive", "/livez")
    return {"status": "ok"}


async def readyz(st: StateDep) -> dict[str, Any] | JSONResponse:
    """Ready when a warmed bundle is served: what this pod alone decides. Redis is not a
    condition (without it every pod answers from popularity, flagged; a Redis outage
    must not take every endpoint out of service); its state is in the body, in
    `GET /health/redis` and in `sine_redis_up`."""
    if st.engine is None:
        return errors.problem(503, "Not ready", f"bundle: {st.not_ready}", "not-ready",
                              "/readyz", {"Retry-After": "5"})
    eng = st.engine
    why = await lifecycle.redis_ok(st)
    return {"status": "ready", "version": eng.version, "providers": eng.providers,
            "faiss": eng.faiss_device, "items": eng.n_items,
            "graph": eng.bundle.manifest["onnx"].get("graph", "plain"),
            "redis": "ok" if why is None else
            ("not configured" if st.store is None else f"unavailable: {why}")}


async def health_redis(st: StateDep) -> dict[str, str] | JSONResponse:
    """Whether Redis answers a ping now (for operators and alerts; not readiness)."""
    why = await lifecycle.redis_ok(st)
    if why is not None:
        return errors.problem(503, "Redis unavailable", f"redis: {why}", "redis-unavailable",
                              "/health/redis")
    return {"status": "ok"}


async def prometheus(st: StateDep) -> Response:
    st.metrics.in_flight.set(st.admission.in_flight)
    await lifecycle.freshness(st)
    return Response(st.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def bundle_info(st: StateDep, authorization: str | None = Header(None)) -> dict[str, Any]:
    """The served bundle: its version, item count and index, and the search a request that
    names no mode gets (`resolve_search`); the whole manifest (commit, libraries, data set,
    offline metrics) with the admin token or SINE_BUNDLE_DETAILS_PUBLIC."""
    engine, s = st.serving(), st.settings
    m = engine.bundle.manifest
    search = resolve_search(None, None, engine.bundle.serving, s.default_mode,
                            s.interest_merge)._asdict()
    if s.bundle_details_public or bearer_ok(authorization, s.admin_token):
        return {**m, "default_search": search}
    return {"version": m["version"], "created": m.get("created"),
            "items": {"count": m["items"]["count"]},
            "index": {"factory": m["index"]["factory"]}, "default_search": search}


def direct_probes() -> dict[str, Any]:
    """The GETs `service.routers.direct` answers past FastAPI: {path: endpoint(state)}."""
    return {"/livez": livez}


def register(app: Router) -> None:
    tags: list[str | Enum] = ["operations"]
    app.add_api_route("/livez", livez, methods=["GET"], tags=tags, response_model=None,
                      responses=errors.responses(503))
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=tags, response_model=None,
                      responses=errors.responses(503))
    app.add_api_route("/health/redis", health_redis, methods=["GET"], tags=tags,
                      response_model=None, responses=errors.responses(503))
    app.add_api_route("/metrics", prometheus, methods=["GET"], tags=tags)
    app.add_api_route("/bundle", bundle_info, methods=["GET"], tags=tags,
                      responses=errors.responses(503))
