"""The inspector's data route, `POST /admin/inspect`, against a real uvicorn and redis-server:
its lists equal brute force and what `/recommend` answers, its fallbacks, its switch and token."""
import numpy as np
import pytest

from service.settings import Settings

TOKEN = "insp3ct"


def settings(world, redis=None, **kw) -> Settings:
    base = dict(bundle=str(world["root"]), watch_interval_s=0, inspector="admin",
                admin_token=TOKEN, redis_url=redis.url if redis else None, redis_timeout_ms=200,
                redis_retry_after_ms=200)
    return Settings(**{**base, **kw})


def seed(redis, world, user="u", items=None) -> list[str]:
    ds = world["ds"]
    hist = items if items is not None else [ds.item_ids[int(i)] for i in ds.sequences[0][::-1]]
    c = redis.client()
    c.delete(f"sine:history:{user}")
    if hist:
        c.rpush(f"sine:history:{user}", *hist)
    return hist


def ask(c, user="u", n=10, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return c.post("/admin/inspect", json={"user_id": user, "n": n}, headers=headers)


def ids(items):
    return [x["item_id"] for x in items]


def test_every_list_is_the_brute_force_top_n_and_matches_recommend(small_world, own_redis, serve):
    hist = seed(own_redis, small_world)
    with serve(settings(small_world, own_redis)) as c:
        r = ask(c, n=7)
        assert r.status_code == 200, r.text
        a = r.json()
        engine = c.app.state.sine.engine
        K = small_world["bundle"].manifest["model"]["K"]
        assert a["fallback"] is None and a["K"] == K == len(a["interests"]) and a["n"] == 7
        read = hist[: c.app.state.sine.settings.history_keep]
        assert ids(a["history"]) == read                          # as the service reads them
        assert sum(x["in_window"] for x in a["history"]) == min(len(read), engine.n)
        assert all(x["title"] for x in a["history"])                 # the bundle carries titles
        seen = {engine.item_index[x] for x in read}
        table = engine.vectors(np.arange(1, engine.n_items + 1))     # [M, D], row i-1 = id i
        from service.stages import encode, window
        e = encode(engine, window(engine, [read]).window)
        for k, view in enumerate(a["interests"]):
            scores = table @ e.interests[0, k]
            order = [i + 1 for i in np.argsort(-scores, kind="stable") if i + 1 not in seen][:7]
            assert ids(view["items"]) == [engine.bundle.item_ids()[i] for i in order]
            assert view["weight"] == pytest.approx(float(e.weights[0, k]), abs=1e-6)
        assert sum(v["weight"] for v in a["interests"]) == pytest.approx(1.0, abs=1e-5)
        same = c.post("/recommend", json={"user_id": "u", "n": 7, "mode": "aggregate"}).json()
        assert ids(a["aggregate"]) == ids(same["items"])
        for how, items in a["merges"].items():
            served = c.post("/recommend", json={"user_id": "u", "n": 7, "merge": how}).json()
            assert ids(items) == ids(served["items"]), how
            assert [x["interest"] for x in items] == [x["interest"] for x in served["items"]]
        assert set(a["merges"]) == {"max", "weighted", "quota"}
        assert not set(ids(a["aggregate"])) & set(read)              # seen items excluded


def test_fallbacks_say_why(small_world, own_redis, serve):
    seed(own_redis, small_world, "strangers", ["nope-1", "nope-2"])
    with serve(settings(small_world, own_redis)) as c:
        popular = c.post("/recommend", json={"user_id": "nobody", "n": 5}).json()
        none = ask(c, "nobody", 5).json()
        assert none["fallback"] == "no_history" and none["history"] == []
        assert none["interests"] == [] and none["merges"] == {}
        assert ids(none["popular"]) == ids(popular["items"])
        cold = ask(c, "strangers", 5).json()
        assert cold["fallback"] == "cold_start"
        assert [(x["item_id"], x["known"]) for x in cold["history"]] == [("nope-1", False),
                                                                         ("nope-2", False)]
        own_redis.stop()
        down = ask(c, "u", 5)
        assert down.status_code == 200 and down.json()["fallback"] == "history_unavailable"


def test_off_by_default_and_behind_the_admin_token(small_world, serve):
    with serve(Settings(bundle=str(small_world["root"]), watch_interval_s=0,
                        admin_token=TOKEN)) as c:
        assert c.get("/inspect").status_code == 404
        assert ask(c).status_code == 404                           # no such route when off
    with serve(settings(small_world)) as c:
        assert ask(c, token=None).status_code == 401
        assert ask(c, token="wrong").status_code == 401
        assert ask(c).status_code == 200
        page = c.get("/inspect")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert c.get("/inspect/inspect.js").headers["content-type"].startswith("text/javascript")
        missing = c.get("/inspect/secrets.txt")
        assert missing.status_code == 404 and "secrets.txt" in missing.json()["detail"]
    with serve(settings(small_world, admin_token=None)) as c:
        assert ask(c, token=None).status_code == 401              # admin without a token: shut
    with serve(settings(small_world, inspector="open", admin_token=None)) as c:
        assert ask(c, token=None).status_code == 200


@pytest.mark.parametrize("body, field", [({"user_id": "u", "n": 0}, "n"),
                                         ({"user_id": "u", "n": 101}, "n"),
                                         ({"user_id": "", "n": 5}, "user_id"),
                                         ({"n": 5}, "user_id"),
                                         ({"user_id": "u", "n": 5, "x": 1}, "x")])
def test_bad_requests_are_422_naming_the_field(small_world, serve, body, field):
    with serve(settings(small_world, inspector="open")) as c:
        r = c.post("/admin/inspect", json=body)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field
