import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_export.evaluation.partition import (
    PartitionInterests,
    group_clicks,
    mean_pair_cosine,
    partition,
    partition_diagnostics,
    within_user_nmi,
)


def planted_model(n_categories=4, D=16, K=3, seed=0):
    """A SINE on seeded planted data whose item rows point along their category's direction
    (plus a little noise): a user's clicks then fall into label-pure groups."""
    from model_export import data
    from model_export.data import split
    from model_export.models.sine import SINE, SINEConfig

    ds = data.synthetic(n_users=80, n_items=60, n_categories=n_categories, length=(8, 14),
                        interests_per_user=(3, 3), stay=0.5, seed=seed)
    torch.manual_seed(seed)
    model = SINE(SINEConfig(n_items=ds.n_items, D=D, K=K, L=8)).eval()
    cats = sorted(set(ds.labels.values()))
    axis = torch.eye(D)[: len(cats)]                                   # one direction a category
    with torch.no_grad():
        for j, lab in ds.labels.items():
            model.H.weight[j] = 3.0 * axis[cats.index(lab)] + 0.05 * torch.randn(D)
    return model, ds, split(ds)


def test_kmeans_groups_clicks_by_direction_and_leaves_pads_out():
    rng = np.random.default_rng(1)
    dirs = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    which = rng.integers(0, 3, size=(5, 10))
    which[:, :3] = [0, 1, 2]                                           # all three in every row
    U = F.normalize(dirs[torch.from_numpy(which)] + 0.01 * torch.randn(5, 10, 8), dim=-1)
    mask = torch.ones(5, 10, dtype=torch.bool)
    mask[:, 8:] = False                                                # two pads a row
    groups = group_clicks(U, mask, 3)                              # [5, 10, 3]
    assert groups[:, 8:].sum() == 0
    assert torch.all(groups[:, :8].sum(-1) == 1)
    g = groups.argmax(-1).numpy()
    for r in range(5):                                                 # same direction <=> same group
        for a, b in itertools.combinations(range(8), 2):
            assert (g[r, a] == g[r, b]) == (which[r, a] == which[r, b])


def test_fewer_distinct_clicks_than_groups_gives_empty_groups_not_nans():
    model, ds, sp = planted_model()
    rows = torch.zeros(2, model.config.n, dtype=torch.long)
    rows[0, :3] = torch.tensor([5, 5, 5])                              # one item, three times
    rows[1, :1] = 7                                                    # one click
    phi, share, groups = partition(model, rows, 3)
    assert torch.isfinite(phi).all()
    assert share.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert (share > 0).sum(1).tolist() == [1, 1]
    for r in range(2):                                                 # empty groups repeat the used one
        used = int(share[r].argmax())
        assert torch.allclose(phi[r], phi[r, used].expand_as(phi[r]))


def test_mean_pair_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6, 4, 5, generator=g)
    valid = torch.rand(6, 4, generator=g) > 0.3
    valid[0] = torch.tensor([True, False, False, False])               # one vector: no pairs
    got = mean_pair_cosine(v, valid)
    for b in range(6):
        ks = [k for k in range(4) if valid[b, k]]
        pairs = [(i, j) for i in ks for j in ks if i != j]
        if not pairs:
            assert torch.isnan(got[b])
            continue
        want = np.mean([float(F.cosine_similarity(v[b, i], v[b, j], dim=0)) for i, j in pairs])
        assert float(got[b]) == pytest.approx(want, abs=1e-5)


def test_within_user_nmi_is_one_for_pure_groups_and_skips_unlabelled_clicks():
    labels = np.array([["a", "a", "b", "b", None], ["x", "y", "x", "y", "x"]], dtype=object)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=bool)
    pure = np.array([[0, 0, 1, 1, 1], [2, 3, 2, 3, 9]])                 # relabelled, still pure
    assert within_user_nmi(pure, labels, mask) == pytest.approx(1.0)
    mixed = np.array([[0, 1, 0, 1, 0], [0, 0, 1, 1, 0]])                # independent of the labels
    assert within_user_nmi(mixed, labels, mask) == pytest.approx(0.0)


def test_diagnostics_on_planted_embeddings_find_the_categories():
    model, ds, sp = planted_model()
    d = partition_diagnostics(model, ds, sp)
    assert d["K"] == 3 and d["users"] == len(sp.test_inputs)
    assert d["within_user_nmi_partition"] > d["within_user_nmi_chance"] + 0.4
    assert d["partition_cosine"] < d["click_cosine"]                   # groups span the categories
    assert 0.0 <= d["within_user_nmi_sine"] <= 1.0
    assert d["item_kmeans_nmi"] > 0.8         # rows planted by category (L = 8 splits some of the 4)
    assert 0.0 <= d["prototype_nmi"] <= 1.0

    # where a window shows all 3 planted categories, the 3 groups are exactly those categories
    rows = torch.from_numpy(sp.test_inputs).long()
    groups = partition(model, rows, 3)[2].argmax(-1).numpy()          # [U, n]
    mask = (rows > 0).numpy()
    labels = np.vectorize(lambda j: ds.labels.get(int(j)), otypes=[object])(rows.numpy())
    three = np.array([len(set(labels[u][mask[u]])) == 3 for u in range(len(rows))])
    assert three.sum() >= 20
    assert within_user_nmi(groups[three], labels[three], mask[three]) == pytest.approx(1.0)


def test_partition_interests_search_through_the_services_merges():
    from model_export.evaluation.evaluate import evaluate_merge

    model, ds, sp = planted_model()
    wrapped = PartitionInterests(model, K=3)
    rows = torch.from_numpy(sp.test_inputs[:10]).long()
    phi, v, e = wrapped(rows)
    assert phi.shape == (10, 3, model.config.D) and e.shape == (10, 3)
    assert torch.allclose(v, model(rows)[1])                           # the aggregate stays SINE's
    assert torch.allclose(e.sum(1), torch.ones(10), atol=1e-4)
    for how in ("max", "weighted", "quota"):
        r = evaluate_merge(wrapped, ds, sp, how, ks=(10, 20))
        assert 0.0 <= r["HR@10"] <= r["HR@20"] <= 1.0
