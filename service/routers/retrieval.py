"""`POST /recommend`, `POST /recommend/batch` (and the benchmarks' `/floor`)."""
import time
from enum import Enum

from fastapi.responses import Response

from .. import errors
from ..deps import StateDep
from ..engine import Engine
from ..schemas import BatchBody, BatchResponse, Recommendation, RecommendBody, RequestModels
from ..settings import Settings
from ..stages import Query, resolve_search, server_timing
from ..tracing import CURRENT_SPAN
from . import Router, bind
from .direct import Endpoint

JSON = "application/json"
ASGI_FLOOR = "/floor/asgi"     # with floor_endpoint and direct_routes: the floor past FastAPI
ERRORS = errors.responses(400, 408, 413, 415, 422, 429, 503)
TAGS: list[str | Enum] = ["retrieval"]


def query(r: RecommendBody, engine: Engine, s: Settings) -> Query:
    """A request as the request path takes it, its search resolved once."""
    mode, merge = resolve_search(r.mode, r.merge, engine.bundle.serving, s.default_mode,
                                 s.interest_merge)
    return Query(str(r.user_id), r.n, r.exclude_seen, mode, r.include_interests, merge)


async def recommend(req: RecommendBody, st: StateDep) -> Response:
    """Top-n candidates for one user from their newest clicks in Redis."""
    t0 = time.perf_counter()
    engine = st.engine_for(str(req.user_id))
    q = query(req, engine, st.settings)
    with st.admission.admit(1):
        t_ns = time.time_ns()
        try:
            (answer,) = await st.recommender.recommend(engine, [q])
        except errors.ServiceError:
            if st.recommender.per_arm:
                st.metrics.arm_requests.labels(engine.arm, "error").inc()
            raise
    st.metrics.child(st.metrics.request, "recommend").observe(time.perf_counter() - t0)
    if st.recommender.per_arm:
        st.metrics.arm_requests.labels(engine.arm, answer.fallback or "personalized").inc()
        if st.shadow is not None:
            st.shadow.offer(q, engine, answer)
    if st.tracing is not None and (span := CURRENT_SPAN.get()) is not None:
        st.tracing.stages(span, t_ns, answer.timings, **{"sine.mode": req.mode})
    return Response(answer.body, media_type=JSON,
                    headers={"Server-Timing": answer.server_timing()})


async def recommend_batch(req: BatchBody, st: StateDep) -> Response:
    """Many users in one call, sharing micro-batches (Redis read, encoder, search). Admitted by
    its number of users; a large one (bulk) yields to single requests."""
    t0 = time.perf_counter()
    engines = [st.engine_for(str(r.user_id)) for r in req.requests]
    queries = [query(r, e, st.settings) for r, e in zip(req.requests, engines, strict=True)]
    bulk = len(queries) > st.settings.interactive_batch_users
    with st.admission.admit(len(queries), "bulk" if bulk else "single"):
        t_ns = time.time_ns()
        answers = await st.recommender.recommend(engines, queries, bulk=bulk)
    worst: dict[str, float] = {}
    for a in answers:
        for k, v in a.timings.items():
            worst[k] = max(worst.get(k, 0.0), v)
    st.metrics.child(st.metrics.request, "recommend_batch").observe(time.perf_counter() - t0)
    if st.tracing is not None and (span := CURRENT_SPAN.get()) is not None:
        st.tracing.stages(span, t_ns, worst, **{"sine.users": len(queries)})
    return Response(b'{"results":[' + b",".join(a.body for a in answers) + b"]}",
                    media_type=JSON, headers={"Server-Timing": server_timing(worst)})


async def floor(req: RecommendBody, st: StateDep) -> Response:
    """A prebuilt answer of `/recommend`'s size: the HTTP stack's floor, for benchmarks."""
    with st.admission.admit(1):
        return Response(st.floor_body, media_type=JSON)


def direct_routes(models: RequestModels, floor_endpoint: bool = False
                  ) -> dict[str, tuple[type[RecommendBody], Endpoint]]:
    """The routes `service.routers.direct` answers past FastAPI: {path: (body model, endpoint)}."""
    routes: dict[str, tuple[type[RecommendBody], Endpoint]] = {
        "/recommend": (models.recommend, recommend)}
    if floor_endpoint:         # /floor stays FastAPI's (the framework's floor); this is ASGI's
        routes[ASGI_FLOOR] = (models.recommend, floor)
    return routes


def register(app: Router, models: RequestModels, floor_endpoint: bool = False) -> None:
    app.add_api_route("/recommend", bind(recommend, req=models.recommend), methods=["POST"],
                      response_model=Recommendation, responses=ERRORS, tags=TAGS)
    app.add_api_route("/recommend/batch", bind(recommend_batch, req=models.batch),
                      methods=["POST"], response_model=BatchResponse, responses=ERRORS, tags=TAGS)
    if floor_endpoint:              # built only when asked for
        app.add_api_route("/floor", bind(floor, req=models.recommend), methods=["POST"],
                          include_in_schema=False)
