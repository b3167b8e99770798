import math

import numpy as np
import pytest
import torch

from model_export.evaluation.evaluate import metrics_from_ranks, nmi, rank_targets


def brute_force_rank(scores: np.ndarray, target: int, exclude: set[int]) -> int:
    ranked = [j for j in np.argsort(-scores, kind="stable") if j != 0 and (j == target or j not in exclude)]
    # ties count against the target: it goes after every item with an equal score
    t = scores[target]
    return sum(1 for j in ranked if scores[j] > t)


def test_rank_targets_matches_brute_force_with_exclusion():
    rng = np.random.default_rng(0)
    U, M = 40, 30
    scores = rng.normal(size=(U, M + 1)).astype(np.float32)
    scores[:, 5] = scores[:, 6]                                     # some ties
    targets = rng.integers(1, M + 1, size=U)
    exclude = [rng.choice(np.arange(1, M + 1), size=rng.integers(0, 10), replace=False) for _ in range(U)]
    exclude[0] = np.append(exclude[0], targets[0])                  # a repeat: target stays rankable
    ranks = rank_targets(torch.from_numpy(scores), torch.from_numpy(targets), exclude).numpy()
    for u in range(U):
        assert ranks[u] == brute_force_rank(scores[u], targets[u], set(exclude[u].tolist()) - {targets[u]})


def test_padding_column_is_never_ranked():
    scores = torch.tensor([[100.0, 1.0, 2.0]])
    assert rank_targets(scores, torch.tensor([2]), [np.array([], dtype=np.int64)]).tolist() == [0]


def test_metrics_from_ranks_hr_and_ndcg():
    m = metrics_from_ranks(np.array([0, 1, 9, 10, 60]), ks=(10, 50))
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["HR@50"] == pytest.approx(4 / 5)


def test_nmi_extremes_and_a_hand_computed_value():
    assert nmi([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert nmi([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0, abs=1e-12)
    # a = [0,0,0,1], b = [x,x,y,y]: I = 0.2158, H(a) = 0.5623, H(b) = 0.6931 (nats)
    assert nmi([0, 0, 0, 1], ["x", "x", "y", "y"]) == pytest.approx(0.34371, abs=1e-4)


# -- per-interest retrieval, list figures, interest diagnostics --------------------------------

def _sine_and_data(K=3):
    from model_export import data
    from model_export.data import split
    from model_export.models.sine import SINE, SINEConfig

    ds = data.synthetic(n_users=120, n_items=80, n_categories=6, length=(6, 15), seed=5)
    torch.manual_seed(0)
    return SINE(SINEConfig(n_items=ds.n_items, D=16, K=K, L=8)).eval(), ds, split(ds)


def test_per_interest_lists_are_the_services_merge_of_exact_searches():
    from model_export.evaluation.evaluate import exclusions, scorer, top_lists
    from service.merge import top_n

    model, ds, sp = _sine_and_data()
    N = 10
    ex = exclusions(ds, "test")
    got = top_lists(scorer(model, "per_interest"), sp.test_inputs, ex, N)
    with torch.no_grad():
        phi, _, _ = model(torch.from_numpy(sp.test_inputs))           # [U, K, D]
    table = model.H.weight[1:].detach().numpy()                                 # [M, D]
    per = phi.numpy() @ table.T                                        # [U, K, M]
    k = N + max(len(e) for e in ex)                                    # over-fetch past the history
    ids = np.argsort(-per, axis=2, kind="stable")[:, :, :k]            # [U, K, k], 0-based
    scores = np.take_along_axis(per, ids, 2)
    H = max(len(e) for e in ex)
    exclude = np.zeros((len(ex), H), dtype=np.int64)
    for u, e in enumerate(ex):
        exclude[u, :len(e)] = e
    want = top_n(scores.astype(np.float32), ids + 1, exclude, N)
    assert (want.count == N).all()
    np.testing.assert_array_equal(got, want.ids)


def test_per_interest_ranks_by_the_best_interest():
    from model_export.evaluation.evaluate import evaluate_model, evaluate_scores, exclusions

    model, ds, sp = _sine_and_data()
    with torch.no_grad():
        phi, _, _ = model(torch.from_numpy(sp.test_inputs))
    best = (phi @ model.H.weight.detach().t()).amax(1)                        # [U, M + 1]
    want = evaluate_scores(lambda rows: best[:len(rows)] if len(rows) == len(best) else None,
                           sp.test_inputs, sp.test_targets, exclusions(ds, "test"),
                           batch_size=len(best))
    assert evaluate_model(model, ds, sp, mode="per_interest") == pytest.approx(want)
    with pytest.raises(ValueError, match="mode must be"):
        evaluate_model(model, ds, sp, mode="best")


def test_list_metrics_by_hand():
    from model_export.data import Dataset, Split
    from model_export.evaluation.evaluate import list_metrics

    ds = Dataset("toy", [np.array([1, 2, 3])], ["u"], ["<pad>", "a", "b", "c", "d"],
                 labels={1: "x", 2: "x", 3: "y", 4: "z"})
    counts = np.array([0, 6, 2, 1, 1])                                 # training clicks, [M + 1]
    sp = Split(*(np.zeros((1, 1)),) * 6, counts)
    lists = np.array([[1, 2, 3], [1, 3, 4]])                           # [U = 2, N = 3]
    m = list_metrics(lists, np.array([3, 2]), ds, sp)
    assert m["HR@3"] == 0.5                                            # user 0 hit, user 1 not
    assert m["coverage@3"] == 1.0                                      # all 4 items in some list
    # pairs with different labels: list 0 {x, x, y}: 2 of 3; list 1 {x, y, z}: 3 of 3
    assert m["diversity@3"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["labels@3"] == pytest.approx(2.5)
    share = (counts + 1) / (counts.sum() + 4)
    assert m["novelty@3"] == pytest.approx(float(-np.log2(share[lists]).mean()))


def test_popularity_lists_cover_only_the_top():
    from model_export.evaluation.evaluate import beyond_accuracy

    _, ds, sp = _sine_and_data()
    m = beyond_accuracy(None, ds, sp, N=5)
    longest = max(len(s) for s in ds.sequences)
    assert m["coverage@5"] <= (5 + longest) / ds.n_items               # top items, past the history


def test_interest_diagnostics():
    from model_export.evaluation.evaluate import interest_diagnostics

    model, ds, sp = _sine_and_data(K=3)
    d = interest_diagnostics(model, ds, sp)
    with torch.no_grad():
        _, idx = model.activate(*model.embed(torch.from_numpy(sp.test_inputs)))
        phi, _, e = model(torch.from_numpy(sp.test_inputs))
    assert d["prototypes_used"] == len(set(idx.flatten().tolist()))
    u = torch.nn.functional.normalize(phi, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    cos = float(torch.stack([(u[:, a] * u[:, b]).sum(-1) for a, b in pairs]).mean())
    assert d["interest_cosine"] == pytest.approx(cos, abs=1e-5)
    ent = float((-(e * e.log()).sum(1) / math.log(3)).mean())
    assert d["weight_entropy"] == pytest.approx(ent, abs=1e-5)
    assert 1.0 <= d["effective_interests"] <= 3.0 and 0 <= d["assignment_nmi"] <= 1
    assert d["label_kind"] == "planted"

    one, ds1, sp1 = _sine_and_data(K=1)
    d1 = interest_diagnostics(one, ds1, sp1)
    assert d1["interest_cosine"] is None and d1["weight_entropy"] == pytest.approx(0.0)
    assert d1["effective_interests"] == pytest.approx(1.0)


def test_planted_interests_are_kept_per_user():
    from model_export import data

    ds = data.synthetic_mix(n_users=60, n_items=200, seed=2)
    assert ds.name == "synthetic-mix" and len(ds.user_labels) == ds.n_users
    for s, planted in zip(ds.sequences, ds.user_labels):
        assert 3 <= len(planted) <= 4
        assert {ds.labels[int(i)] for i in s} <= set(planted)          # every click from them
