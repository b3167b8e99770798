"""The interest-aware terms of Eq. 11: each against its formula written out, off at weight 0,
giving gradient to the interests, the configs refusing bad values, a run logging the terms, and
the offline per-interest evaluation equal to the service's merges over exact scores."""
import numpy as np
import pytest
import torch

from model_export import data
from model_export.configs import SINEConfig, TrainConfig
from model_export.data import split
from model_export.models.sine import SINE, LogUniformSampler
from model_export.training import train
from model_export.training.interests import interest_terms, pairwise_cosine, target_interest
from model_export.training.workflow import model_config


@pytest.fixture(scope="module")
def world():
    ds = data.synthetic(n_users=150, n_items=60, n_categories=5, length=(6, 14), seed=3)
    torch.manual_seed(0)
    model = SINE(SINEConfig(n_items=ds.n_items, D=16, K=3, L=8))
    sp = split(ds, model.config.n)
    x = torch.from_numpy(sp.train_inputs[:32]).long()
    y = torch.from_numpy(sp.train_targets[:32]).long()
    return ds, model, sp, x, y


def test_pairwise_cosine_is_the_mean_over_pairs():
    phi = torch.randn(5, 4, 8)
    u = phi / phi.norm(dim=-1, keepdim=True)
    want = [np.mean([float(u[b, i] @ u[b, j]) for i in range(4) for j in range(4) if i != j])
            for b in range(5)]
    np.testing.assert_allclose(pairwise_cosine(phi).numpy(), want, rtol=1e-5)
    assert torch.equal(pairwise_cosine(torch.randn(3, 1, 8)), torch.zeros(3))
    same = torch.randn(2, 1, 8).expand(2, 3, 8)
    np.testing.assert_allclose(pairwise_cosine(same).numpy(), 1.0, rtol=1e-5)


def test_the_target_interest_is_the_best_match():
    phi, h = torch.randn(6, 3, 8), torch.randn(6, 8)
    want = [int(np.argmax([float(phi[b, k] @ h[b]) for k in range(3)])) for b in range(6)]
    assert target_interest(phi, h, "argmax", 1.0).tolist() == want
    torch.manual_seed(1)                     # a sharp softmax samples the argmax
    assert target_interest(phi, h, "sample", 1e4).tolist() == want


def test_terms_are_off_at_weight_zero(world):
    _, model, _, x, y = world
    phi, _, e = model(x)
    assert interest_terms(model, phi, e, y, TrainConfig(), None, torch.Generator()) == {}


def test_each_term_is_its_formula(world):
    _, model, _, x, y = world
    phi, _, e = model(x)
    H = model.H.weight[1:]                                             # [M, D]
    cfg = TrainConfig(interest_weight=2.0, interest_loss="logsumexp", cos_penalty=0.3,
                      weight_kl=0.5, weight_kl_T=0.5)
    got = interest_terms(model, phi, e, y, cfg, None, torch.Generator())
    logits = torch.logsumexp(phi @ H.t(), dim=1)                       # [B, M]
    want_lse = 2.0 * torch.nn.functional.cross_entropy(logits, y - 1)
    torch.testing.assert_close(got["interest"], want_lse)
    torch.testing.assert_close(got["cosine"], 0.3 * pairwise_cosine(phi).mean())
    cos = torch.nn.functional.cosine_similarity(phi, model.H(y).unsqueeze(1), dim=-1)   # [B, K]
    t = torch.softmax(cos / 0.5, dim=1)
    kl = (t * (t.log() - e.log())).sum(1).mean()
    torch.testing.assert_close(got["weight_kl"], 0.5 * 0.25 * kl)
    argmax = interest_terms(model, phi, e, y, TrainConfig(interest_weight=1.0), None,
                            torch.Generator())["interest"]
    k = (phi @ model.H(y).unsqueeze(-1)).squeeze(-1).argmax(1)        # [B]
    q = phi[torch.arange(len(y)), k]
    torch.testing.assert_close(argmax, torch.nn.functional.cross_entropy(q @ H.t(), y - 1))


@pytest.mark.parametrize("how", ["argmax", "sample", "logsumexp"])
def test_the_item_term_trains_the_interests_under_a_sampled_softmax(world, how):
    ds, model, _, x, y = world
    model.zero_grad()
    phi, _, e = model(x)
    sampler = LogUniformSampler(ds.n_items, 20)
    cfg = TrainConfig(interest_weight=1.0, interest_loss=how)
    term = interest_terms(model, phi, e, y, cfg, sampler, torch.Generator().manual_seed(0))
    assert torch.isfinite(term["interest"]) and term["interest"] > 0
    term["interest"].backward()
    assert model.Wk1.grad is not None and model.Wk1.grad.abs().sum() > 0   # Eq. 4 learns from it


@pytest.mark.parametrize("bad, match", [
    ({"interest_loss": "mean"}, "interest_loss"), ({"interest_weight": -1}, "interest_weight"),
    ({"cos_penalty": -0.1}, "cos_penalty"), ({"weight_kl_T": 0}, "weight_kl_T"),
    ({"interest_T": -2}, "interest_T")])
def test_bad_term_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_a_run_logs_each_term_that_is_on(world, tmp_path):
    ds = world[0]
    cfg = TrainConfig(batch_size=32, max_epochs=1, threads=2, interest_weight=0.5,
                      cos_penalty=0.2, weight_kl=0.1)
    res = train(ds, model_config(ds, D=16, K=3, L=8), cfg, tmp_path, progress=False, log=print)
    row = res.history[0]
    assert {"term_interest", "term_cosine", "term_weight_kl"} <= set(row)
    assert all(np.isfinite(row[k]) for k in ("term_interest", "term_cosine", "term_weight_kl"))


@pytest.mark.parametrize("how", ["max", "weighted"])
def test_offline_merges_equal_full_ranking_of_their_scores(world, how):
    """`max` ranks by max_k phi_k . h_j, `weighted` by max_k (phi_k . h_j + log e_k): as full
    rankings over every item, they must give the merged lists' metrics."""
    from model_export.evaluation.evaluate import evaluate_merge, evaluate_scores, exclusions

    ds, model, sp, _, _ = world
    model.eval()

    @torch.no_grad()
    def score(rows):
        phi, _, e = model(torch.from_numpy(rows).long())
        s = phi @ model.H.weight.t()                                   # [b, K, M + 1]
        if how == "weighted":
            s = s + e.log().unsqueeze(-1)
        return s.amax(1)

    want = evaluate_scores(score, sp.test_inputs, sp.test_targets, exclusions(ds, "test"))
    got = evaluate_merge(model, ds, sp, how)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_spherical_kmeans_finds_separated_directions():
    from model_export.training.interests import spherical_kmeans

    g = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)   # [5, D]
    which = torch.arange(200) % 5
    rows = 2.0 * (dirs[which] + 0.02 * torch.randn(200, 16, generator=g))           # [200, D]
    C = spherical_kmeans(rows, 5, seed=1)                              # [5, D]
    assert torch.allclose(C.norm(dim=1), torch.ones(5), atol=1e-5)
    # every planted direction has a centre on it, so no two centres share one
    assert (dirs @ C.t()).amax(1).min() > 0.99


def test_refresh_gives_each_item_cluster_its_prototype_where_eq3_compares_them():
    from model_export.evaluation.evaluate import nmi
    from model_export.training.interests import refresh_prototypes

    torch.manual_seed(0)
    model = SINE(SINEConfig(n_items=40, D=16, K=2, L=4))
    dirs = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    label = torch.arange(40) % 4
    norm_before = model.C.norm(dim=1).mean()
    with torch.no_grad():
        model.H.weight[1:] = dirs[label] + 0.02 * torch.randn(40, 16)
    refresh_prototypes(model)
    assert torch.allclose(model.C.norm(dim=1), norm_before.expand(4), atol=1e-5)
    with torch.no_grad():                                              # Eq. 3's cosine, all L
        q = torch.nn.functional.normalize(model.ln1(model.item_table() @ model.W3), dim=-1)
        p = torch.nn.functional.normalize(model.ln2(model.C), dim=-1)
    near = (q @ p.t()).argmax(1)                                       # [M]
    assert nmi(near.tolist(), label.tolist()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="L <= M"):
        refresh_prototypes(SINE(SINEConfig(n_items=3, D=8, K=2, L=4)))


def test_a_run_refreshes_the_prototypes_before_each_later_epoch(world, tmp_path):
    from model_export.training.checkpoints import load_checkpoint
    from model_export.training.interests import spherical_kmeans

    ds = world[0]
    mcfg = model_config(ds, D=16, K=3, L=8)
    # lr 0: nothing but the refresh moves a weight, so the run's C is the k-means of its start
    cfg = TrainConfig(batch_size=32, max_epochs=2, lr=0.0, threads=1, seed=9, prototype_refresh=True)
    lines: list[str] = []
    train(ds, mcfg, cfg, tmp_path, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("prototypes refreshed by k-means" in ln for ln in lines)
    from model_export.training.checkpoints import model_from_checkpoint

    m = model_from_checkpoint(load_checkpoint(tmp_path / "last.pt"))
    with torch.no_grad():
        q = m.ln1(m.item_table() @ m.W3)
        want = spherical_kmeans(q, 8, seed=10) * m.C.norm(dim=1).mean()
    assert torch.allclose(m.C, want, atol=1e-5)
