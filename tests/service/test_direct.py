"""`direct_routes`: POST /recommend answered past FastAPI gives, for every kind of body, the
answer and the error that the FastAPI route gives (two real servers side by side)."""
import pytest

from service.routers.direct import DirectRoutes
from service.settings import Settings

BODIES = [
    b'{"user_id": "u1", "n": 5}',
    b'{"user_id": 7, "n": 3, "exclude_seen": false}',
    b'{"user_id": "u1", "n": 4, "mode": "per_interest", "merge": "quota", "include_interests": true}',
    b'{"user_id": "u1", "n": 4, "merge": "weighted"}',
    b'{"user_id": "nobody", "n": 2}',                                       # cold start
    b'{"user_id": "u1", "n": 0}',                                           # 422: n
    b'{"user_id": "u1", "n": 500}',                                         # 422: past max_n
    b'{"user_id": "u1"}',                                                   # 422: n missing
    b'{"user_id": "u1", "n": 3, "mode": "aggregate", "merge": "max"}',      # 422: merge alone
    b'{"user_id": "u1", "n": 3, "colour": "red"}',                          # 422: extra field
    b'{"user_id": "", "n": 3}',                                             # 422: empty id
    b'{"user_id": "u1", "n": "3"}',                                         # 422: strict int
    b'[1, 2]',                                                              # 422: not an object
    b'{"user_id": "u1", "n": 3',                                            # 400: not JSON
    b'',                                                                    # 422: no body
    b'{"user_id": "u1", "n": 3}\xff',                                       # 400: not UTF-8
]


@pytest.fixture(scope="module")
def pair(small_world, redis_server, serve):
    common = dict(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                  max_n=50, max_user_id_length=16, floor_endpoint=True)
    ds = small_world["ds"]
    r = redis_server.client()
    key = Settings(bundle="x").redis_key_template
    for user in ("u1", "7"):
        r.delete(key.format(user_id=user))
        r.rpush(key.format(user_id=user), *[ds.item_ids[int(i)] for i in ds.sequences[3][::-1]])
    with serve(Settings(**common, direct_routes=True)) as direct, \
            serve(Settings(**common, direct_routes=False)) as routed:
        yield direct, routed


@pytest.fixture
def answered(monkeypatch):
    """The paths the direct-routes middleware is called with, in order (only the direct server
    has it)."""
    paths = []
    real = DirectRoutes.__call__

    async def counting(self, scope, receive, send):
        paths.append(scope["path"])
        return await real(self, scope, receive, send)
    monkeypatch.setattr(DirectRoutes, "__call__", counting)
    return paths


def comparable(r):
    body = r.json()
    if isinstance(body, dict):
        body.pop("request_id", None)
    return r.status_code, r.headers["content-type"], body


@pytest.mark.parametrize("body", BODIES)
def test_the_direct_route_answers_as_the_fastapi_route(pair, body, answered):
    direct, routed = pair
    headers = {"Content-Type": "application/json"}
    a = direct.post("/recommend", content=body, headers=headers)
    b = routed.post("/recommend", content=body, headers=headers)
    assert answered == ["/recommend"]              # the direct server alone has the middleware
    sa, ca, ba = comparable(a)
    sb, cb, bb = comparable(b)
    assert (sa, ca, ba) == (sb, cb, bb)
    assert sa in (200, 400, 422)


def test_other_methods_and_paths_pass_through(pair):
    direct, routed = pair
    for c in pair:
        assert c.post("/recommend/batch", json={"requests": [{"user_id": "u1", "n": 2}]}
                      ).status_code == 200
    assert comparable(direct.get("/recommend")) == comparable(routed.get("/recommend"))
    assert direct.get("/recommend").status_code == 405


def test_the_floor_is_fastapis_and_past_it_the_same_answer(pair):
    direct, routed = pair
    body = {"user_id": "u1", "n": 5}
    fastapi = direct.post("/floor", json=body)
    asgi = direct.post("/floor/asgi", json=body)
    assert fastapi.status_code == asgi.status_code == 200
    assert fastapi.content == asgi.content and fastapi.content == routed.post("/floor", json=body).content
    assert direct.post("/floor/asgi", json={"user_id": "u1"}).status_code == 422
    assert routed.post("/floor/asgi", json=body).status_code == 404    # no direct routes there


@pytest.mark.parametrize("why", [None, "no bundle served for 600 s"])
def test_the_liveness_probe_answers_as_the_fastapi_route(pair, why, answered, monkeypatch):
    from service import lifecycle

    direct, routed = pair
    monkeypatch.setattr(lifecycle, "alive", lambda st: why)
    a, b = direct.get("/livez"), routed.get("/livez")
    assert answered == ["/livez"]
    assert comparable(a) == comparable(b)
    assert a.status_code == (200 if why is None else 503)
    assert a.content == b.content if why is None else why in a.json()["detail"]
