"""Stage 5's merges against brute force on seeded lists: `top_n` (the best score per id),
`weighted` (score + log e_k), `quota` (each interest's share of n), their shares, and the
service answering each merge over HTTP-free micro-batches."""
import numpy as np
import pytest

import service.merge
from index_builder.bundle import MERGES
from service.merge import merge, quota, shares, top_n


def brute_top(scores, ids, exclude, n):
    """One row at a time, in plain Python: best score per id, minus -1 and exclusions."""
    out = []
    for s_row, i_row, ex in zip(scores, ids, exclude):
        best: dict[int, tuple[float, int]] = {}
        for q, (sq, iq) in enumerate(zip(s_row, i_row)):
            for s, i in zip(sq.tolist(), iq.tolist()):
                if i < 0 or i in set(ex.tolist()) - {0}:
                    continue
                if i not in best or s > best[i][0]:
                    best[i] = (s, q)
        out.append(sorted(best.items(), key=lambda kv: -kv[1][0])[:n])
    return out


@pytest.mark.parametrize("Q", [1, 4])
@pytest.mark.parametrize("H", [8, 600])          # short histories compared whole, long ones sorted
def test_top_n_equals_brute_force_on_seeded_lists(Q, H):
    rng = np.random.default_rng(Q)
    P, k, M = 16, 30, 60
    scores = -np.sort(-rng.standard_normal((P, Q, k)).astype(np.float32), axis=2)
    ids = rng.integers(1, M + 1, size=(P, Q, k))
    if Q == 1:                                                    # one list holds an id once
        ids = np.stack([rng.permutation(M)[:k] + 1 for _ in range(P)])[:, None]
    ids[:, :, -3:] = -1                                           # the index ran short
    exclude = np.where(rng.random((P, H)) < 0.7 * 8 / H, rng.integers(1, M + 1, (P, H)), 0)
    top = top_n(scores, ids, exclude, 20)
    for p, want in enumerate(brute_top(scores, ids, exclude, 20)):
        c = int(top.count[p])
        assert c == len(want)
        assert list(top.ids[p, :c]) == [i for i, _ in want]
        np.testing.assert_allclose(top.scores[p, :c], [s for _, (s, _) in want])
        assert list(top.source[p, :c]) == [q for _, (_, q) in want]


def test_top_n_counts_what_is_left_after_exclusion():
    scores = np.array([[[0.9, 0.8, 0.7, 0.6]]], np.float32)
    ids = np.array([[[4, 2, 9, -1]]])
    top = top_n(scores, ids, np.array([[2, 0]]), 3)
    assert int(top.count[0]) == 2 and list(top.ids[0, :2]) == [4, 9]
    top = top_n(scores, ids, np.zeros((1, 0), np.int64), 3)
    assert int(top.count[0]) == 3 and list(top.ids[0]) == [4, 2, 9]


def seeded_lists(P=12, K=4, k=40, M=90, seed=0):
    rng = np.random.default_rng(seed)
    scores = -np.sort(-rng.standard_normal((P, K, k)).astype(np.float32), axis=2)
    ids = np.stack([np.stack([rng.permutation(M)[:k] + 1 for _ in range(K)]) for _ in range(P)])
    weights = rng.dirichlet(np.ones(K), size=P).astype(np.float32)
    exclude = np.where(rng.random((P, 6)) < 0.7, rng.integers(1, M + 1, (P, 6)), 0)
    return scores, ids, weights, exclude


def test_weighted_ranks_by_score_plus_log_weight():
    scores, ids, weights, exclude = seeded_lists()
    got = merge("weighted", scores, ids, weights, exclude, 25)
    key = scores + np.log(weights)[:, :, None]
    for p, want in enumerate(brute_top(key, ids, exclude, 25)):
        c = int(got.count[p])
        assert list(got.ids[p, :c]) == [i for i, _ in want]
        assert list(got.source[p, :c]) == [q for _, (_, q) in want]
        # the raw score of the interest that ranked it, not the key
        raw = {(int(i), q): float(s) for q in range(4) for s, i in zip(scores[p, q], ids[p, q])}
        np.testing.assert_allclose(got.scores[p, :c], [raw[(i, q)] for i, (_, q) in want])


def test_max_is_top_n():
    scores, ids, weights, exclude = seeded_lists(seed=3)
    a, b = merge("max", scores, ids, weights, exclude, 30), top_n(scores, ids, exclude, 30)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.source, b.source)


@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_shares_sum_to_n_by_largest_remainder(n):
    w = np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    s = shares(w, n)
    assert (s.sum(1) == n).all() and (s >= 0).all()
    assert (np.abs(s - w * n) < 1).all()                      # never a whole place off
    assert s[2, 0] == n


def brute_quota(scores, ids, weights, exclude, n):
    """The quota merge one row at a time, in plain Python."""
    out = []
    for s_row, i_row, w, ex in zip(scores, ids, weights, exclude):
        bad = set(ex.tolist()) - {0}
        want = [int(x) for x in shares(w[None], n)[0]]
        taken, got = set(), []
        for q in sorted(range(len(w)), key=lambda q: -w[q]):
            for s, i in zip(s_row[q].tolist(), i_row[q].tolist()):
                if want[q] == 0:
                    break
                if i >= 0 and i not in bad and i not in taken:
                    taken.add(i)
                    got.append((s, i, q))
                    want[q] -= 1
        rest = sorted(((s, i, q) for q in range(len(w)) for s, i in zip(s_row[q].tolist(),
                                                                         i_row[q].tolist())),
                      key=lambda t: -t[0])
        for s, i, q in rest:
            if len(got) == n:
                break
            if i >= 0 and i not in bad and i not in taken:
                taken.add(i)
                got.append((s, i, q))
        out.append(sorted(got, key=lambda t: -t[0]))
    return out


@pytest.mark.parametrize("table", [True, False], ids=["seen-table", "compare"])
@pytest.mark.parametrize("k", [40, 6])                       # 6: interests run short, others fill
def test_quota_equals_brute_force(k, table, monkeypatch):
    """Both ways of knowing what a row has seen: the id table, and (ids too many for a table)
    each list compared against the picks so far."""
    if not table:
        monkeypatch.setattr(service.merge, "SEEN_CELLS", 0)
    scores, ids, weights, exclude = seeded_lists(k=k, seed=k)
    ids[:, :, -2:] = -1
    got = quota(scores, ids, weights, exclude, 20)
    for p, want in enumerate(brute_quota(scores, ids, weights, exclude, 20)):
        c = int(got.count[p])
        assert c == len(want)
        assert list(got.ids[p, :c]) == [i for _, i, _ in want]
        assert list(got.source[p, :c]) == [q for _, _, q in want]
        assert len(set(got.ids[p, :c].tolist())) == c         # no id twice
        assert not set(got.ids[p, :c].tolist()) & (set(exclude[p].tolist()) - {0})


def test_quota_gives_each_interest_its_share_when_lists_are_long():
    scores, ids, weights, exclude = seeded_lists(k=40, seed=11)
    exclude[:] = 0
    ids = np.arange(4 * 40).reshape(1, 4, 40).repeat(12, 0) + 1   # disjoint lists
    got = quota(scores, ids, weights, exclude, 20)
    for p in range(12):
        counts = np.bincount(got.source[p, :20], minlength=4)
        np.testing.assert_array_equal(counts, shares(weights[p: p + 1], 20)[0])


def test_quota_shares_follow_each_rows_own_n():
    scores, ids, weights, exclude = seeded_lists(P=2, seed=2)
    both = quota(scores, ids, weights, exclude, np.array([5, 20]))
    alone = quota(scores[:1], ids[:1], weights[:1], exclude[:1], 5)
    assert list(both.count) == [5, 20]
    np.testing.assert_array_equal(both.ids[0, :5], alone.ids[0, :5])


def test_an_unknown_merge_is_refused():
    scores, ids, weights, exclude = seeded_lists(P=1)
    with pytest.raises(ValueError, match="merge must be one of"):
        merge("median", scores, ids, weights, exclude, 5)
    assert MERGES == ("max", "weighted", "quota")
