import math

import numpy as np
import pytest
import torch

from model_export.evaluate import metrics_from_ranks, nmi, rank_targets


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
