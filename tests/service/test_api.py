"""POST /recommend, /recommend/batch and /events over real HTTP, checked against brute force;
bad input of every kind; the operations endpoints, the OpenAPI document and the offline docs."""
import concurrent.futures as cf
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.settings import Settings
from tests.helpers import metric

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def world(small_world, redis_server, serve):
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                 max_n=50, max_batch_users=8, history_keep=30, max_user_id_length=16,
                 max_body_bytes=512, max_batch_body_bytes=2048)
    ds = small_world["ds"]
    items = np.load(small_world["export"] / "items.npy")                     # [M, D]
    sess = ort.InferenceSession(str(small_world["bundle"].file("encoder")),
                                providers=["CPUExecutionProvider"])
    with serve(s) as c:
        yield {"c": c, "ds": ds, "items": items, "sess": sess, "redis": redis_server.client(),
               "key": s.redis_key_template, "n": small_world["bundle"].manifest["model"]["n"]}


def put_history(w, user: str, newest_first: list[str]) -> None:
    k = w["key"].format(user_id=user)
    w["redis"].delete(k)
    if newest_first:
        w["redis"].rpush(k, *newest_first)


def brute(w, newest_first: list[str], n: int, exclude_seen=True, per_interest=False):
    """Exact top-n by inner product, as external ids, from the encoder and the item table."""
    ds = w["ds"]
    index = {s: i for i, s in enumerate(ds.item_ids) if i}
    known = [index[h] for h in newest_first if h in index]
    win = np.zeros((1, w["n"]), dtype=np.int64)
    win[0, : min(len(known), w["n"])] = known[: w["n"]]
    interests, uv, weights = w["sess"].run(None, {"item_ids": win})
    q = interests[0] if per_interest else uv                                   # [Q, D]
    scores = (q @ w["items"].T).max(axis=0)                                    # [M]
    order = np.argsort(-scores, kind="stable") + 1
    if exclude_seen:
        order = [i for i in order if i not in set(known)]
    top = [int(i) for i in order[:n]]
    return [ds.item_ids[i] for i in top], scores[np.array(top) - 1], weights[0], interests[0]


def test_recommend_matches_brute_force_and_excludes_history(world):
    ds = world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[0][::-1]]               # newest first
    put_history(world, "u0", hist)
    r = world["c"].post("/recommend", json={"user_id": "u0", "n": 25})
    assert r.status_code == 200, r.text
    body = r.json()
    want, scores, _, _ = brute(world, hist, 25)
    assert [x["item_id"] for x in body["items"]] == want
    np.testing.assert_allclose([x["score"] for x in body["items"]], scores, rtol=1e-4, atol=1e-4)
    assert not {x["item_id"] for x in body["items"]} & set(hist)      # the service excluded them
    assert body["fallback"] is None and body["mode"] == "aggregate"
    assert body["score_kind"] == "inner_product"
    assert body["version"] == "v1" and body["user_id"] == "u0"
    from service.stages import STAGES
    timed = [p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")]
    assert set(timed) == {"queue", *STAGES}, timed       # every stage, under its own name
    assert "window" in stages_docstring()


def test_exclude_seen_false_and_int_user_id_is_its_string(world):
    ds = world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[1][::-1]]
    put_history(world, "17", hist)
    r = world["c"].post("/recommend", json={"user_id": 17, "n": 30, "exclude_seen": False})
    assert r.status_code == 200
    want, _, _, _ = brute(world, hist, 30, exclude_seen=False)
    assert [x["item_id"] for x in r.json()["items"]] == want
    assert r.json()["user_id"] == "17"


def test_per_interest_merge_and_interest_features(world):
    ds = world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[2][::-1]]
    put_history(world, "u2", hist)
    r = world["c"].post("/recommend", json={"user_id": "u2", "n": 20, "mode": "per_interest",
                                             "include_interests": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want, scores, weights, interests = brute(world, hist, 20, per_interest=True)
    assert [x["item_id"] for x in body["items"]] == want
    K = interests.shape[0]
    np.testing.assert_allclose(body["interest_weights"], weights, atol=1e-5)
    assert abs(sum(body["interest_weights"]) - 1) < 1e-4
    for it in body["items"]:
        assert len(it["interest_scores"]) == K and 0 <= it["interest"] < K
        assert it["score"] == pytest.approx(max(it["interest_scores"]), abs=1e-4)
        assert it["interest_scores"][it["interest"]] == pytest.approx(it["score"], abs=1e-4)


@pytest.fixture(scope="module")
def per_interest_root(small_world, tmp_path_factory):
    """small_world's bundle, its manifest saying per_interest with the quota merge."""
    import shutil

    from index_builder import bundle
    root = tmp_path_factory.mktemp("pi") / "bundles"
    shutil.copytree(small_world["root"] / "v1", root / "v1")
    m = json.loads((root / "v1" / "manifest.json").read_text())
    m["serving"] = {"mode": "per_interest", "merge": "quota", "chosen_on": "valid HR@50"}
    (root / "v1" / "manifest.json").write_text(json.dumps(m))
    bundle.set_current(root, "v1")
    return root


@pytest.mark.parametrize("default_mode, interest_merge, want", [
    ("bundle", "bundle", ("per_interest", "quota")),
    ("aggregate", "bundle", ("aggregate", None)),
    ("bundle", "weighted", ("per_interest", "weighted")),
    ("per_interest", "max", ("per_interest", "max"))])
def test_the_default_search_is_the_bundles_unless_settings_or_the_request_say(
        world, per_interest_root, serve, redis_server, default_mode, interest_merge, want):
    ds = world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[5][::-1]]
    put_history(world, "pi5", hist)
    s = Settings(bundle=str(per_interest_root), redis_url=redis_server.url, watch_interval_s=0,
                 default_mode=default_mode, interest_merge=interest_merge)
    with serve(s) as c:
        def ask(**extra):
            r = c.post("/recommend", json={"user_id": "pi5", "n": 12, **extra})
            assert r.status_code == 200, r.text
            return r.json()
        got = ask()
        assert (got["mode"], got["merge"]) == want
        explicit = ask(mode=want[0], **({"merge": want[1]} if want[1] else {}))
        assert got["items"] == explicit["items"]
        # what a request names wins; a merge alone means per_interest
        own = ask(mode="aggregate")
        assert (own["mode"], own["merge"]) == ("aggregate", None)
        assert [x["item_id"] for x in own["items"]] == brute(world, hist, 12)[0]
        alone = ask(merge="max")
        assert (alone["mode"], alone["merge"]) == ("per_interest", "max")
        assert [x["item_id"] for x in alone["items"]] == brute(world, hist, 12,
                                                              per_interest=True)[0]
        batch = c.post("/recommend/batch", json={"requests": [{"user_id": "pi5", "n": 12}]})
        assert batch.json()["results"][0] == got
        assert c.get("/bundle").json()["default_search"] == {"mode": want[0], "merge": want[1]}


def test_cold_start_and_unknown_items(world):
    ds = world["ds"]
    pop_order = list(np.argsort(-np.asarray(world["c"].app.state.sine.engine.popularity[1:]),
                                kind="stable") + 1)
    r = world["c"].post("/recommend", json={"user_id": "never-seen", "n": 5})
    body = r.json()
    assert body["fallback"] == "cold_start" and body["score_kind"] == "popularity"
    assert [x["item_id"] for x in body["items"]] == [ds.item_ids[int(i)] for i in pop_order[:5]]

    put_history(world, "ghost", ["no-such-item", "nor-this"])
    before = metric(world["c"], "sine_history_unknown_items_total")
    r = world["c"].post("/recommend", json={"user_id": "ghost", "n": 5})
    assert r.json()["fallback"] == "cold_start"
    assert metric(world["c"], "sine_history_unknown_items_total") == before + 2

    hist = ["no-such-item"] + [ds.item_ids[int(i)] for i in ds.sequences[3][::-1]]
    put_history(world, "mixed", hist)
    r = world["c"].post("/recommend", json={"user_id": "mixed", "n": 10})
    assert r.json()["fallback"] is None
    assert [x["item_id"] for x in r.json()["items"]] == brute(world, hist, 10)[0]


def test_batch_equals_single_answers(world):
    ds = world["ds"]
    reqs = []
    for u in range(4):
        put_history(world, f"b{u}", [ds.item_ids[int(i)] for i in ds.sequences[10 + u][::-1]])
        reqs.append({"user_id": f"b{u}", "n": 7})
    reqs.append({"user_id": "nobody-here", "n": 3, "mode": "per_interest"})
    r = world["c"].post("/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5
    for q, got in zip(reqs, results):
        single = world["c"].post("/recommend", json=q).json()
        assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in single["items"]]
        np.testing.assert_allclose([x["score"] for x in got["items"]],
                                   [x["score"] for x in single["items"]], rtol=1e-5)
        assert {k: v for k, v in got.items() if k != "items"} == \
            {k: v for k, v in single.items() if k != "items"}
    r = world["c"].post("/recommend/batch", json={"requests": reqs * 2})
    assert r.status_code == 422 and "requests" in r.json()["detail"]


def test_a_batch_counts_each_stage_once_per_request(world):
    """A micro-batch's requests share their stage times, observed once with a count: the
    histograms still count one observation per request and stage."""
    c, ds = world["c"], world["ds"]
    reqs = []
    for u in range(3):
        put_history(world, f"cnt{u}", [ds.item_ids[int(i)] for i in ds.sequences[20 + u][::-1]])
        reqs.append({"user_id": f"cnt{u}", "n": 5})
    reqs.append({"user_id": "cnt-cold", "n": 5})
    count = "sine_stage_duration_seconds_count"
    stages = ("queue", "history", "window", "encode", "search", "filter", "answer", "popularity")
    before = {s: metric(c, count, stage=s) for s in stages}
    assert c.post("/recommend/batch", json={"requests": reqs}).status_code == 200
    after = {s: metric(c, count, stage=s) - before[s] for s in stages}
    assert after == {"queue": 4, "history": 4, "window": 4, "encode": 3, "search": 3,
                     "filter": 3, "answer": 3, "popularity": 1}


def test_events_append_cap_and_no_lost_writes(world):
    c, ds = world["c"], world["ds"]
    world["redis"].delete(world["key"].format(user_id="ev"))
    r = c.post("/events", json={"user_id": "ev", "item_id": ds.item_ids[5]})
    assert r.status_code == 200
    assert {k: v for k, v in r.json().items() if k != "event_id"} == {
        "user_id": "ev", "history_length": 1, "duplicate": False}
    assert len(r.json()["event_id"]) == 32                      # made for it
    with cf.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda i: c.post("/events", json={"user_id": "ev", "item_id": i})
                            .status_code, range(100, 140)))
    assert codes == [200] * 40
    stored = world["redis"].lrange(world["key"].format(user_id="ev"), 0, -1)
    assert len(stored) == 30                        # history_keep
    assert set(stored) <= {str(i) for i in range(100, 140)}
    # the newest click comes first and feeds the encoder
    c.post("/events", json={"user_id": "ev", "item_id": ds.item_ids[7]})
    assert world["redis"].lindex(world["key"].format(user_id="ev"), 0) == ds.item_ids[7]


@pytest.mark.parametrize("body, status, field", [
    ({"user_id": "a", "n": 0}, 422, "n"),
    ({"user_id": "a", "n": 51}, 422, "n"),
    ({"user_id": "a", "n": "5"}, 422, "n"),
    ({"user_id": "a", "n": 5.0}, 422, "n"),
    ({"user_id": 1.5, "n": 5}, 422, "user_id"),
    ({"user_id": True, "n": 5}, 422, "user_id"),
    ({"user_id": "", "n": 5}, 422, "user_id"),
    ({"user_id": "x" * 17, "n": 5}, 422, "user_id"),
    ({"n": 5}, 422, "user_id"),
    ({"user_id": "a", "n": 5, "mode": "both"}, 422, "mode"),
    ({"user_id": "a", "n": 5, "colour": "red"}, 422, "colour"),
    ({"user_id": "a", "n": 5, "mode": "per_interest", "merge": "median"}, 422, "merge"),
    ({"user_id": "a", "n": 5, "mode": "aggregate", "merge": "quota"}, 422,
     "merge applies to mode=per_interest"),
    ([1, 2], 422, "body"),
])
def test_bad_requests_are_explained(world, body, status, field):
    r = world["c"].post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    p = r.json()
    assert p["status"] == status and p["title"] and field in p["detail"]
    assert "Traceback" not in r.text


def test_malformed_json_and_unknown_routes(world):
    c = world["c"]
    r = c.post("/recommend", content=b'{"user_id": "a", "n": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == PROBLEM
    assert "not valid JSON" in r.json()["detail"]
    r = c.get("/recommend")
    assert r.status_code == 405 and r.headers["content-type"] == PROBLEM
    r = c.get("/nowhere")
    assert r.status_code == 404 and "/nowhere" in r.json()["detail"]
    r = c.post("/events", json={"user_id": "a", "item_id": "y" * 200})
    assert r.status_code == 422 and "item_id" in r.json()["detail"]


def test_operations_endpoints(world):
    c, ds = world["c"], world["ds"]
    put_history(world, "ops", [ds.item_ids[int(i)] for i in ds.sequences[5][::-1]])
    before = {"cold": metric(c, "sine_fallbacks_total", reason="cold_start"),
              "bad": metric(c, "sine_failures_total", reason="invalid-request"),
              "encode": metric(c, "sine_stage_duration_seconds_count", stage="encode")}
    assert c.post("/recommend", json={"user_id": "ops", "n": 5}).json()["fallback"] is None
    assert c.post("/recommend", json={"user_id": "ops-cold", "n": 5}).json()["fallback"]
    assert c.post("/recommend", json={"user_id": "ops", "n": 0}).status_code == 422
    assert c.get("/livez").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and ready["version"] == "v1"
    assert ready["providers"] == ["CPUExecutionProvider"] and ready["redis"] == "ok"
    assert metric(c, "sine_fallbacks_total", reason="cold_start") == before["cold"] + 1
    assert metric(c, "sine_failures_total", reason="invalid-request") == before["bad"] + 1
    assert metric(c, "sine_stage_duration_seconds_count", stage="encode") == before["encode"] + 1
    for stage in ("history", "queue", "window", "encode", "search", "filter", "answer",
                  "popularity"):
        assert metric(c, "sine_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert metric(c, "sine_bundle_info", factory="Flat", items="300", version="v1") == 1.0
    assert metric(c, "sine_batch_size_count") >= 2
    assert c.get("/bundle").json()["version"] == "v1"


def test_openapi_documents_every_answer(world):
    spec = world["c"].get("/openapi.json").json()
    assert "/recommend" in spec["paths"] and "/recommend/batch" in spec["paths"]
    schema = spec["components"]["schemas"]["RecommendRequest"]
    assert schema["properties"]["n"]["maximum"] == 50 and schema.get("examples")
    for path in ("/recommend", "/recommend/batch", "/events"):
        answers = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "413", "415", "422", "429", "503"} <= set(answers), (path, answers)
        for code in ("400", "413", "415", "422", "429", "503"):
            assert "application/problem+json" in answers[code]["content"], (path, code)
    rec = spec["components"]["schemas"]["Recommendation"]["properties"]
    assert rec["score_kind"]["enum"] == ["inner_product", "popularity"]
    assert "never rank them against each other" in rec["score_kind"]["description"]


def test_bodies_over_the_limit_are_refused_with_413(world):
    c = world["c"]
    pad = {"user_id": "a", "n": 5, "x": "y" * 600}                  # over 512 bytes
    r = c.post("/recommend", json=pad)
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    assert "512" in r.json()["detail"] and r.json()["title"] == "Payload too large"
    assert c.post("/events", json=pad).status_code == 413
    # the batch route has its own, larger limit
    reqs = [{"user_id": f"batch-user-{i:05d}", "n": 5, "mode": "aggregate",
             "exclude_seen": True} for i in range(8)]
    assert len(json.dumps({"requests": reqs})) > 512
    assert c.post("/recommend/batch", json={"requests": reqs}).status_code == 200
    big = {"requests": reqs, "x": "y" * 3000}
    assert c.post("/recommend/batch", json=big).status_code == 413

    def chunks():                                                 # no Content-Length: streamed
        yield b'{"user_id": "a", "n": 5, "x": "'
        for _ in range(40):
            yield b"y" * 100
        yield b'"}'
    r = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["status"] == 413, r.text
    assert "512" in r.json()["detail"]
    assert metric(c, "sine_failures_total", reason="payload-too-large") >= 4
    ok = c.post("/recommend", content=iter([b'{"user_id": "a",', b' "n": 5}']),
                headers={"content-type": "application/json"})
    assert ok.status_code == 200                                  # a small streamed body is fine


@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {},
                                     {"content-type": "application/x-www-form-urlencoded"}])
def test_a_body_not_sent_as_json_is_refused_with_415(world, headers):
    with httpx.Client(base_url=world["c"].base_url) as raw:     # no default content type
        r = raw.post("/recommend", content=b'{"user_id": "a", "n": 5}', headers=headers)
    assert r.status_code == 415 and r.headers["content-type"] == PROBLEM
    assert "application/json" in r.json()["detail"]
    assert world["c"].post("/recommend", content=b'{"user_id": "a", "n": 5}', headers={
        "content-type": "application/json; charset=utf-8"}).status_code == 200


def test_docs_work_offline(world):
    c = world["c"]
    html = c.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in html and "/openapi.json" in html
    assert "cdn" not in html and "https://" not in html.replace("https://swagger.io", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = c.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert c.get("/redoc").status_code == 404                     # it would need a CDN


def stages_docstring() -> str:
    import service.stages
    return service.stages.__doc__ or ""


def test_the_openapi_document_is_built_once_and_served_as_bytes(small_world):
    from fastapi.testclient import TestClient

    from service.app import create_app
    app = create_app(Settings(bundle=str(small_world["root"]), watch_interval_s=0))
    calls = []
    real = app.openapi
    app.openapi = lambda: calls.append(1) or real()                 # type: ignore[method-assign]
    with TestClient(app) as c:
        first, second = c.get("/openapi.json"), c.get("/openapi.json")
        assert first.status_code == second.status_code == 200
        assert first.content == second.content and first.json() == real()
        assert c.get("/docs").status_code == 200
    assert len(calls) == 1
