"""The request stages as units, without HTTP: windows, encode and search, the filter with its
top-up (the merges in test_merge), popularity, the answer's JSON (and its schema), and whole micro-batches of the
recommender against brute force."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from index_builder.bundle import MERGES, MODES, Search
from service.engine import Engine, item_json_prefixes, load_engine
from service.metrics import Metrics
from service.recommender import Recommender
from service.settings import Settings
from service.stages import Query, compute, knn, render, resolve_search, top_up, window

# -- stages on the small world's engine ---------------------------------------------------------

@pytest.fixture(scope="module")
def engine(small_world) -> Engine:
    return load_engine(small_world["root"])


@pytest.fixture(scope="module", params=["faiss", "dense"])
def either(request, small_world) -> Engine:
    """The engine searching with faiss, or with dense scores over the exact index's table."""
    eng = load_engine(small_world["root"],
                      dense_max_items=10**6 if request.param == "dense" else 0)
    assert (eng.table is not None) == (request.param == "dense")
    return eng


@pytest.fixture(scope="module")
def items(small_world) -> np.ndarray:
    return np.load(small_world["export"] / "items.npy")          # [M, D], row j = id j + 1


def test_windows_drop_unknown_ids_and_keep_newest_first(engine):
    ext = engine.bundle.item_ids()
    long = [ext[i] for i in range(1, 31)]                         # 30 known, newest first
    hists = [[ext[5], "nope", ext[7]], [], ["x", "y"], long]
    w = window(engine, hists)
    n = engine.n
    assert w.window.shape == (4, n) and w.window.dtype == np.int64
    assert list(w.window[0, :3]) == [5, 7, 0] and not w.window[0, 2:].any()
    assert not w.window[1].any() and not w.window[2].any()
    assert list(w.window[3]) == list(range(1, n + 1))            # the n newest known
    assert list(w.known) == [2, 0, 0, 30] and w.unknown == 3
    assert list(w.seen[3, :30]) == list(range(1, 31))            # every known id, for exclusion
    assert list(w.seen[0, :2]) == [5, 7] and not w.seen[0, 2:].any()


class NoWalk(np.ndarray):
    """An id array that refuses to be walked or listed whole."""

    def __iter__(self):
        raise AssertionError("walked the whole catalog")

    def tolist(self):
        if len(self) > 1000:
            raise AssertionError("listed the whole catalog")
        return super().tolist()


def test_popular_ids_skip_exclusions_and_never_walk_the_catalog():
    pop = SimpleNamespace(popular=np.arange(1, 10_000_001, dtype=np.int64).view(NoWalk))
    got = Engine.popular_ids(pop, 5, np.array([[1, 3, 0], [4, 0, 0]]))
    assert got.view(np.ndarray).tolist() == [2, 5, 6, 7, 8]
    got = Engine.popular_ids(pop, 3, np.zeros(0, np.int64))
    assert got.view(np.ndarray).tolist() == [1, 2, 3]
    small = SimpleNamespace(popular=np.array([3, 1, 2]))
    assert list(Engine.popular_ids(small, 5, np.array([1]))) == [3, 2]    # catalog runs out


def test_compute_is_the_encoder_and_exact_search(engine, items):
    win = window(engine, [[engine.bundle.item_ids()[i] for i in (3, 9, 4)],
                          [engine.bundle.item_ids()[i] for i in (11, 2)]]).window
    interests, uv, weights = engine.session.run(None, {"item_ids": win})
    c = compute(engine, win, np.array([False, True]), 12)
    np.testing.assert_allclose(c.user_vector, uv, atol=1e-6)
    agg, per = c.hits["aggregate"], c.hits["per_interest"]
    assert list(agg.rows) == [0] and list(per.rows) == [1] and agg.width == per.width == 12
    assert agg.ids.shape == (1, 1, 12) and per.ids.shape == (1, interests.shape[1], 12)
    want = np.argsort(-(uv[0] @ items.T), kind="stable")[:12] + 1
    assert list(agg.ids[0, 0]) == list(want)
    for k in range(interests.shape[1]):
        want = np.argsort(-(interests[1, k] @ items.T), kind="stable")[:12] + 1
        assert list(per.ids[0, k]) == list(want)
        np.testing.assert_allclose(per.scores[0, k], np.sort(interests[1, k] @ items.T)[::-1][:12],
                                   rtol=1e-5, atol=1e-5)
    assert c.seconds > 0 and c.encoded.seconds > 0


def test_top_up_adds_popular_items_with_exact_scores(engine, items):
    query = items[[4, 8]].astype(np.float32)                      # [Q=2, D]
    have = engine.popular[[0, 2]]
    exclude = np.array([engine.popular[1], 0])
    extra, s, r = top_up(engine, have, exclude, 3, query)
    assert list(extra) == list(engine.popular[3:6])               # skips answered and excluded
    exact = items[extra - 1] @ query.T                            # [3, 2]
    np.testing.assert_allclose(s, exact.max(1), rtol=1e-5, atol=1e-5)
    assert list(r) == list(exact.argmax(1))


def test_render_builds_the_json_a_dict_would(engine):
    weird = SimpleNamespace(item_json=item_json_prefixes(["<pad>", 'quo"te', "ünï", "back\\slash"]),
                            version="v1", arm="v1-candidate",
                            vectors=lambda ids: np.eye(3, dtype=np.float32)[ids - 1])
    ids = np.array([3, 1, 2])
    scores = np.array([2.5, -1.25, 0.5], np.float32)
    body = json.loads(render(weird, Query("u\"1", 3), ids, scores))
    assert body == {"user_id": 'u"1', "version": "v1", "arm": "v1-candidate", "mode": "aggregate",
                    "merge": None,
                    "fallback": None,
                    "score_kind": "inner_product", "interest_weights": None,
                    "items": [{"item_id": "back\\slash", "score": 2.5},
                              {"item_id": 'quo"te', "score": -1.25},
                              {"item_id": "ünï", "score": 0.5}]}
    q = Query("u", 3, mode="per_interest", include_interests=True, merge="quota")
    interests = np.array([[1, 0, 0], [0, 2, 0]], np.float32)      # [K, D]
    body = json.loads(render(weird, q, ids, scores, None, np.array([1, 0, 1]),
                             np.array([0.25, 0.75], np.float32), interests))
    assert body["mode"] == "per_interest" and body["merge"] == "quota"
    assert body["interest_weights"] == [0.25, 0.75]
    assert [it["interest"] for it in body["items"]] == [1, 0, 1]
    assert [it["interest_scores"] for it in body["items"]] == [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    body = json.loads(render(weird, Query("u", 5), ids[:0], scores[:0], "cold_start"))
    assert body["items"] == [] and body["fallback"] == "cold_start"
    assert body["score_kind"] == "popularity"


def test_a_mixed_micro_batch_answers_each_query_as_alone(either, items, small_world):
    """Aggregate and per-interest, several n, exclusion on and off, cold and personalized
    users in one batch: each answer equals the same query run alone, and brute force."""
    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False), Metrics(), None)
    hists = [[ds.item_ids[int(i)] for i in ds.sequences[u][::-1]] for u in range(6)]
    hists[4] = ["unknown-item"]                                   # a cold start
    queries = [Query("a", 7), Query("b", 20, mode="per_interest", include_interests=True),
               Query("c", 3, exclude_seen=False), Query("d", 12, mode="per_interest"),
               Query("e", 5), Query("f", 1)]
    together = rec.answer(either, queries, hists, None)
    for q, h, got in zip(queries, hists, together):
        alone = json.loads(rec.answer(either, [q], [h], None)[0].body)
        body = json.loads(got.body)
        # the same items; scores equal up to float rounding (batched BLAS sums in another order)
        assert [it["item_id"] for it in body["items"]] == [it["item_id"] for it in alone["items"]]
        np.testing.assert_allclose([it["score"] for it in body["items"]],
                                   [it["score"] for it in alone["items"]], rtol=1e-5, atol=1e-5)
        assert {k: v for k, v in body.items() if k not in ("items", "interest_weights")} == \
            {k: v for k, v in alone.items() if k not in ("items", "interest_weights")}
        assert len(body["items"]) == q.n
        if q.user_id == "e":
            assert body["fallback"] == "cold_start"
            assert [it["item_id"] for it in body["items"]] == \
                [ds.item_ids[int(i)] for i in either.popular[:5]]
            continue
        known = [either.item_index[x] for x in h]
        win = np.zeros((1, either.n), np.int64)
        win[0, : min(either.n, len(known))] = known[: either.n]
        interests, uv, weights = either.session.run(None, {"item_ids": win})
        vecs = interests[0] if q.mode == "per_interest" else uv        # [Q, D]
        scores = (vecs @ items.T).max(0)
        order = [i + 1 for i in np.argsort(-scores, kind="stable")
                 if not (q.exclude_seen and i + 1 in set(known))][: q.n]
        assert [it["item_id"] for it in body["items"]] == [ds.item_ids[i] for i in order]
        np.testing.assert_allclose([it["score"] for it in body["items"]],
                                   scores[np.array(order) - 1], rtol=1e-4, atol=1e-4)
        assert body["fallback"] is None and body["score_kind"] == "inner_product"
        assert set(got.timings) == {"window", "encode", "search", "filter", "answer"}


@pytest.mark.parametrize("how", ["max", "weighted", "quota"])
def test_per_interest_answers_are_the_merge_of_exact_searches(either, items, small_world, how):
    """A batch mixing merges (and n) answers each query with `service.merge` over each
    interest's exact list, the Eq. 7 weights taken from the encoder."""
    from service.merge import merge

    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False), Metrics(), None)
    hists = [[ds.item_ids[int(i)] for i in ds.sequences[u][::-1]] for u in range(4)]
    queries = [Query("a", 9, mode="per_interest", merge=how), Query("b", 4, mode="per_interest"),
               Query("c", 15, mode="per_interest", merge=how), Query("d", 6)]
    for q, h, got in zip(queries, hists, rec.answer(either, queries, hists, None)):
        if q.mode != "per_interest" or q.merge != how:
            continue
        known = [either.item_index[x] for x in h]
        win = np.zeros((1, either.n), np.int64)
        win[0, : min(either.n, len(known))] = known[: either.n]
        interests, _, weights = either.session.run(None, {"item_ids": win})
        per = interests[0] @ items.T                                   # [K, M]
        ids = np.argsort(-per, axis=1, kind="stable")                  # [K, M] 0-based
        want = merge(how, np.take_along_axis(per, ids, 1)[None], ids[None] + 1, weights,
                     np.array([known]), q.n)
        body = json.loads(got.body)
        assert [it["item_id"] for it in body["items"]] == \
            [ds.item_ids[int(i)] for i in want.ids[0, : q.n]]
        assert [it["interest"] for it in body["items"]] == want.source[0, : q.n].tolist()
        # each item reports its raw score under the interest that found it (weighted: no prior)
        np.testing.assert_allclose([it["score"] for it in body["items"]],
                                   per[want.source[0, : q.n], want.ids[0, : q.n] - 1],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["fallback", "error"])
def test_only_the_users_whose_history_failed_fall_back(engine, small_world, policy):
    """A cluster master down: its users' histories are missing, the others' are not."""
    from service.errors import HistoryUnavailable

    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False,
                               on_history_unavailable=policy), Metrics(), None)
    hists = [[ds.item_ids[int(i)] for i in ds.sequences[u][::-1]] for u in range(4)]
    down = np.array([False, True, False, True])
    got = rec.answer(engine, [Query(u, 5) for u in "abcd"], hists, down)
    for j in (0, 2):
        body = json.loads(got[j].body)
        alone = json.loads(rec.answer(engine, [Query("abcd"[j], 5)], [hists[j]], None)[0].body)
        assert body["fallback"] is None
        assert [x["item_id"] for x in body["items"]] == [x["item_id"] for x in alone["items"]]
    for j in (1, 3):
        if policy == "error":
            assert isinstance(got[j], HistoryUnavailable)
        else:
            assert json.loads(got[j].body)["fallback"] == "history_unavailable"


@pytest.mark.parametrize("mode", ["aggregate", "per_interest"])
@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("case", ["personalized", "cold_start", "history_unavailable",
                                  "catalog_exhausted"])
def test_every_answer_render_builds_is_a_valid_recommendation(engine, small_world, mode,
                                                              include, case):
    """`render` builds the JSON by hand for speed; the route declares `Recommendation`."""
    from service.schemas import Recommendation

    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False, history_keep=1000), Metrics(),
                      None)
    hist = [ds.item_ids[int(i)] for i in ds.sequences[3][::-1]]
    if case == "cold_start":
        hist = ["never-seen"]
    elif case == "catalog_exhausted":
        hist = ds.item_ids[1:-2]                            # every item but two seen
    q = Query('u "\u00e9"\n', 10, mode=mode, include_interests=include)
    down = np.array([case == "history_unavailable"])
    (got,) = rec.answer(engine, [q], [hist], down)
    body = Recommendation.model_validate_json(got.body)
    assert body.user_id == q.user_id and body.mode == mode
    assert body.merge == ("max" if mode == "per_interest" else None)
    assert body.fallback == (case if case in ("cold_start", "history_unavailable") else None)
    assert len(body.items) == (2 if case == "catalog_exhausted" else 10)
    if case in ("personalized", "catalog_exhausted"):
        assert body.score_kind == "inner_product"
        assert (body.interest_weights is not None) == include
        assert all((it.interest is not None) == (mode == "per_interest") for it in body.items)
    else:
        assert body.score_kind == "popularity"


def test_a_narrow_first_search_widens_the_rows_left_short(engine, items, small_world):
    """An aggregate batch searches 2 n first; a user whose top is crowded by seen items is
    searched again at its exact width: every answer equals brute force over the whole history."""
    from service import recommender as rec_mod
    from service.stages import encode
    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False), Metrics(), None)
    base = [ds.item_ids[int(i)] for i in ds.sequences[1][::-1]][: engine.n]
    w = window(engine, [base])
    user = encode(engine, w.window).user_vector[0]
    ranked = [ds.item_ids[int(i) + 1] for i in np.argsort(-(items @ user), kind="stable")]
    crowded = base + [x for x in ranked[:60] if x not in base]     # the top, seen (and older)
    plain = [ds.item_ids[int(i)] for i in ds.sequences[2][::-1]] * 2
    hists = [crowded, plain]
    widths = []
    search = rec_mod.search
    rec_mod.search = lambda eng, e, per, k: widths.append(k) or search(eng, e, per, k)
    try:
        got = rec.answer(engine, [Query("a", 5), Query("b", 5)], hists, None)
    finally:
        rec_mod.search = search
    assert widths[0] == 2 * 5 and widths[1] > 10 and len(widths) == 2    # narrow, then one wide
    for h, a in zip(hists, got):
        wv = window(engine, [h])
        v = encode(engine, wv.window).user_vector[0]
        seen = set(wv.seen[0][wv.seen[0] > 0].tolist())
        want = [i + 1 for i in np.argsort(-(items @ v), kind="stable") if i + 1 not in seen][:5]
        assert [x["item_id"] for x in json.loads(a.body)["items"]] == \
            [ds.item_ids[i] for i in want]


@pytest.mark.parametrize("merge", ["max", "weighted"])
def test_narrow_merged_answers_equal_the_full_width_ones(engine, small_world, merge, monkeypatch):
    """Per-interest rows of a narrow first search are kept only when their n-th key proves them
    exact, else searched again: every answer equals the one searched at full width."""
    from service import recommender as rec_mod
    ds = small_world["ds"]
    hists = [[ds.item_ids[int(i)] for i in ds.sequences[u][::-1]] * 3 for u in range(12)]
    qs = [Query(f"u{u}", 4, mode="per_interest" if u % 3 else "aggregate", merge=merge)
          for u in range(12)]
    rec = Recommender(Settings(bundle="unused", batching=False), Metrics(), None)
    widths = []
    search = rec_mod.search
    monkeypatch.setattr(rec_mod, "search",
                        lambda eng, e, per, k: widths.append(k) or search(eng, e, per, k))
    narrow = rec.answer(engine, qs, hists, None)
    assert widths[0] == 8 and max(widths) > 8                  # narrow first, then widened
    monkeypatch.setattr(rec_mod, "NARROW_FACTOR", 10_000)      # every search at full width
    full = rec.answer(engine, qs, hists, None)
    for a, b in zip(narrow, full):
        # the same items in the same order; scores to float rounding (a batch of 8+ vectors is
        # one BLAS product, a smaller one a scan per vector: the sums run in other orders)
        x, y = json.loads(a.body), json.loads(b.body)
        sx, sy = ([i.pop("score") for i in d["items"]] for d in (x, y))
        assert x == y
        np.testing.assert_allclose(sx, sy, rtol=1e-5)


@pytest.mark.parametrize("served", [Search("aggregate"), Search("per_interest", "quota")])
def test_resolve_search_is_the_request_then_the_settings_then_the_bundle(served):
    """Every combination against the rule written out: a named mode wins, a merge alone means
    per_interest, then the settings' defaults, where they say `bundle` the manifest's."""
    for mode in (None, *MODES):
        for merge_ in (None, *MERGES):
            for dm in ("bundle", *MODES):
                for dg in ("bundle", *MERGES):
                    got = resolve_search(mode, merge_, served, dm, dg)
                    want_mode = mode or ("per_interest" if merge_ else
                                         served.mode if dm == "bundle" else dm)
                    if want_mode == "aggregate":
                        assert got == ("aggregate", None)
                        continue
                    want_merge = merge_ or (dg if dg != "bundle" else served.merge or "max")
                    assert got == ("per_interest", want_merge), (mode, merge_, dm, dg)


def test_a_query_is_resolved_when_made():
    assert Query("u", 3).merge is None
    assert Query("u", 3, mode="per_interest").merge == "max"
    assert Query("u", 3, mode="aggregate", merge="quota").merge is None
    assert Query("u", 3, mode="per_interest", merge="quota").merge == "quota"


@pytest.mark.parametrize("vectors", [1, 1 << 20])
def test_either_faiss_path_is_exact_search(small_world, items, vectors):
    """`faiss_blas_vectors`: a batch scored as one matrix product (1) or one scan per query
    vector (never BLAS) answers as brute force does."""
    import faiss
    before = faiss.cvar.distance_compute_blas_threshold
    try:
        eng = load_engine(small_world["root"], providers="cpu", faiss_gpu="off",
                          warm_batch=1, blas_vectors=vectors)
        q = np.random.default_rng(3).standard_normal((9, items.shape[1])).astype(np.float32)
        scores, ids = knn(eng, q, 15)
        # faiss compares its threshold with the queries' floats
        assert faiss.cvar.distance_compute_blas_threshold == vectors * items.shape[1]
    finally:
        faiss.cvar.distance_compute_blas_threshold = before
    full = q @ items.T                                                 # [9, M]
    want = np.argsort(-full, axis=1, kind="stable")[:, :15] + 1         # [9, 15] ids
    np.testing.assert_allclose(scores, np.take_along_axis(full, want - 1, 1), rtol=1e-5, atol=1e-5)
    assert (ids == want).mean() > 0.99                                 # ties aside


def test_blas_runs_on_one_thread_between_dense_searches():
    """numpy's OpenBLAS spins its workers between calls unless held to one thread: CPU time
    over wall time of products a few milliseconds apart stays well under one core."""
    import time

    from service.engine import limit_blas_threads
    assert any("openblas" in p.lower() for p in limit_blas_threads())
    rng = np.random.default_rng(0)
    a = rng.random((16, 128), dtype=np.float32)
    b = rng.random((3417, 128), dtype=np.float32)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(200):
        a @ b.T
        time.sleep(0.002)
    assert (time.process_time() - cpu) / (time.perf_counter() - wall) < 0.8


@pytest.mark.parametrize("C", [3417, 3416, 240])        # a partial last block; one argpartition
@pytest.mark.parametrize("k", [1, 100])
def test_the_dense_top_k_is_a_full_sort(C, k):
    """The blocked selection against sorting whole rows, with masked (-inf) entries, a row with
    fewer finite scores than k (its tail -1), and rows whose best items share one block."""
    from service.stages import TOP_BLOCK, _dense_top
    rng = np.random.default_rng(C + k)
    flat = rng.standard_normal((24, C)).astype(np.float32)
    flat[:, 0] = -np.inf
    flat[np.arange(24)[:, None], rng.integers(1, C, (24, 30))] = -np.inf
    flat[1, 3:] = -np.inf                                           # two finite scores
    flat[2, 8:8 + 3 * TOP_BLOCK] += 10                              # the best items packed together
    if C >= 3416 and k == 100:
        assert C // TOP_BLOCK >= 2 * k                             # the blocked path runs
    scores, ids = _dense_top(flat, k)
    for r in range(24):
        order = np.argsort(-flat[r], kind="stable")[:k]
        finite = np.isfinite(flat[r, order])
        np.testing.assert_array_equal(scores[r], flat[r, order])
        np.testing.assert_array_equal(ids[r], np.where(finite, order, -1))


def test_a_lone_query_vector_is_searched_by_faiss_even_over_a_dense_table(either, small_world,
                                                                          monkeypatch):
    """One aggregate row (one query vector) scans with faiss, where the dense product and
    selection cost twice as much; two rows, or one per-interest row (K vectors), go dense."""
    import service.recommender as rec_mod
    from service.stages import DENSE_MIN_VECTORS, dense_search
    assert DENSE_MIN_VECTORS == 2
    calls = []
    monkeypatch.setattr(rec_mod, "dense_search",
                        lambda *a, **kw: calls.append(len(a[2])) or dense_search(*a, **kw))
    ds = small_world["ds"]
    rec = Recommender(Settings(bundle="unused", batching=False), Metrics(), None)
    hists = [[ds.item_ids[int(i)] for i in ds.sequences[u][::-1]] for u in range(2)]
    for queries in ([Query("a", 5)], [Query("a", 5), Query("b", 5)],
                    [Query("a", 5, mode="per_interest")]):
        got = rec.answer(either, queries, hists[: len(queries)], None)
        assert all(json.loads(a.body)["fallback"] is None for a in got)
    assert calls == ([2, 1] if either.table is not None else [])


@pytest.mark.parametrize("merges, quota", [
    ([None], False), ([None, "max", "weighted"], False), ([None, "quota"], True),
    (["quota", "quota"], True)])
def test_a_quota_merge_searches_at_full_width_from_the_first_search(merges, quota):
    from service.recommender import NARROW_FACTOR, Personal
    from service.stages import AGGREGATE, PER_INTEREST, Windows

    P, n = len(merges), 10
    known = np.full(P, 50)                                        # long histories: exact > narrow
    seen = np.arange(1, P * 50 + 1).reshape(P, 50)
    win = Windows(seen[:, :20], seen, known, 0)
    queries = [Query(f"u{i}", n, mode=AGGREGATE if m is None else PER_INTEREST, merge=m)
               for i, m in enumerate(merges)]
    req = Personal.of(queries, np.arange(P), win)
    assert req.exact.tolist() == [n + 50] * P
    assert req.first == (n + 50 if quota else NARROW_FACTOR * n)
    assert req.per_interest.tolist() == [m is not None for m in merges]
