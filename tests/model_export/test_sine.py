import math

import pytest
import torch
import torch.nn.functional as F

from model_export.models.sine import SINE, LogUniformSampler, SINEConfig


def small(**kw) -> SINE:
    torch.manual_seed(0)
    return SINE(SINEConfig(n_items=50, D=16, n=6, K=3, L=8, **kw)).eval()


def batch(B=5, n=6, M=50, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, M + 1, (B, n), generator=g)
    lengths = torch.tensor([1, 2, n, 3, n][:B] + [n] * max(0, B - 5))
    return x.masked_fill(torch.arange(n)[None] >= lengths[:, None], 0)   # pads at the end


def test_shapes_and_weights_sum_to_one():
    m = small()
    phi, v, e = m(batch())
    assert phi.shape == (5, 3, 16) and v.shape == (5, 16) and e.shape == (5, 3)
    assert torch.allclose(e.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(v, (e.unsqueeze(-1) * phi).sum(1), atol=1e-6)   # Eq. 8


@pytest.mark.parametrize("kw", [{}, {"literal": True}, {"aggregation": "mean"}, {"share_w3": True},
                                {"activation": "votes"}])
def test_what_pad_slots_hold_does_not_change_any_output(kw):
    """Pad slots carry the padding row of H and their positional embeddings: neither may leak."""
    m = small(**kw)
    x = batch(B=4, seed=1)
    x[:, 3:] = 0                                   # every row has at most 3 real items
    before = [t.clone() for t in m(x)]
    with torch.no_grad():
        m.H.weight[0].normal_(std=3.0)
        m.P[3:].normal_(std=3.0)
    for a, b in zip(before, m(x)):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():                          # a real slot's position does matter
        m.P[0].normal_(std=3.0)
    assert not torch.allclose(before[1], m(x)[1], atol=1e-4)


def test_padding_embedding_row_is_ignored_even_if_nonzero():
    m = small()
    x = batch()
    before = [t.clone() for t in m(x)]
    with torch.no_grad():
        m.H.weight[0].normal_()
    for a, b in zip(before, m(x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_outputs_do_not_depend_on_batch_neighbours():
    m = small()
    x = batch(B=8, seed=3)
    full = m(x)
    for i in range(len(x)):
        alone = m(x[i:i + 1])
        for a, b in zip(full, alone):
            assert torch.allclose(a[i:i + 1], b, atol=1e-5)


def test_all_padding_row_is_finite_and_length_one_row_works():
    m = small()
    x = torch.zeros(2, 6, dtype=torch.long)
    x[1, 0] = 7
    for t in m(x):
        assert torch.isfinite(t).all()


def test_k_must_not_exceed_l_and_aggregation_is_checked():
    with pytest.raises(ValueError, match="K <= L"):
        SINEConfig(n_items=10, K=9, L=4)
    with pytest.raises(ValueError, match="aggregation"):
        SINEConfig(n_items=10, aggregation="max")
    with pytest.raises(ValueError, match="activation must be one of attention, votes"):
        SINEConfig(n_items=10, activation="mean")


@pytest.mark.parametrize("kw", [{"tau": 1.0}, {"tau_assign": 1.0}, {"literal": True},
                                {"aggregation": "mean"}, {"share_w3": True}, {"activation": "votes"}])
def test_every_knob_changes_the_user_vector(kw):
    x = batch()
    base = small()(x)[1]
    other = small(**kw)(x)[1]
    assert not torch.allclose(base, other, atol=1e-4), kw


def test_topk_selects_the_best_prototypes_and_gates_them():
    m = small()
    x = batch()
    X, mask = m.embed(x)
    s_top, idx = m.activate(X, mask)
    a = torch.softmax((torch.tanh(X @ m.W1) @ m.W2).masked_fill(~mask, -1e9), 1)
    s = (a.unsqueeze(-1) * X).sum(1) @ m.C.t()                          # Eq. 1-2 by hand
    ref_v, ref_i = s.sort(1, descending=True)
    assert torch.equal(idx, ref_i[:, :3]) and torch.allclose(s_top, ref_v[:, :3], atol=1e-6)


def test_votes_activate_the_prototypes_eq3_assigns_most_clicks_to_and_keep_eq2s_gate():
    m = small(activation="votes", tau_assign=0.01)     # near-hard votes: a count of nearest clicks
    x = batch(B=5, seed=4)
    X, mask = m.embed(x)
    s_top, idx = m.activate(X, mask)
    q, p = F.normalize(m.ln1(X @ m.W3), dim=-1), F.normalize(m.ln2(m.C), dim=-1)
    near = (q @ p.t()).argmax(-1)                                       # [B, n] Eq. 3 over all L
    a = torch.softmax((torch.tanh(X @ m.W1) @ m.W2).masked_fill(~mask, -1e9), 1)
    s = (a.unsqueeze(-1) * X).sum(1) @ m.C.t()                          # Eq. 2's scores
    for b in range(len(x)):
        counts = torch.bincount(near[b][mask[b]], minlength=m.config.L)   # [L]
        picked = set(idx[b].tolist())
        assert len(picked) == 3
        # every prototype left out has at most the votes of every one picked
        assert counts[list(picked)].min() >= counts[[j for j in range(8) if j not in picked]].max()
        assert torch.allclose(s_top[b], s[b, idx[b]], atol=1e-6)


def test_covariance_loss_matches_the_definition():
    m = small()
    C = m.C.detach().double()
    Cc = C - C.mean(1, keepdim=True)
    M = Cc @ Cc.t() / C.shape[1]                                       # L x L, Eq. 10
    ref = 0.5 * ((M ** 2).sum() - (M.diagonal() ** 2).sum())
    assert math.isclose(m.covariance_loss().item(), float(ref), rel_tol=1e-4)
    with torch.no_grad():                                             # orthogonal, centred rows: 0
        m.C.zero_()
        for i in range(8):
            m.C[i, 2 * i], m.C[i, 2 * i + 1] = 1.0, -1.0
    assert abs(m.covariance_loss().item()) < 1e-7


def test_full_softmax_is_cross_entropy_over_all_items():
    m = small()
    v = torch.randn(4, 16)
    y = torch.tensor([1, 5, 50, 7])
    ref = F.cross_entropy(v @ m.H.weight[1:].t(), y - 1)
    assert torch.allclose(m.full_softmax_loss(v, y), ref)


def test_log_uniform_sampler_unique_ids_and_expected_counts():
    s = LogUniformSampler(1000, 100)
    ids, log_q = s.sample(torch.Generator().manual_seed(0))
    assert len(set(ids.tolist())) == 100 and ids.min() >= 1 and ids.max() <= 1000
    # expected counts of all ids sum to the number of distinct draws
    q_all = s.log_q(torch.arange(1, 1001)).double().exp()
    assert abs(float(q_all.sum()) - 100) < 0.5
    assert (q_all[:-1] >= q_all[1:]).all(), "popular (low) ids are proposed more often"
    # empirical inclusion frequency follows the expected count
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(1001)
    for _ in range(300):
        hits[s.sample(g)[0]] += 1
    assert abs(float(hits[1]) / 300 - float(q_all[0])) < 0.1
    assert abs(float(hits[1:501].sum() / 300) - float(q_all[:500].sum())) < 2


def test_sampled_softmax_approaches_full_softmax_with_all_items():
    m = small()
    v = torch.randn(8, 16)
    y = torch.randint(1, 51, (8,))
    s = LogUniformSampler(50, 50)            # every item sampled: q = 1, log q = 0
    sampled = m.sampled_softmax_loss(v, y, s, torch.Generator().manual_seed(0))
    assert torch.allclose(sampled, m.full_softmax_loss(v, y), atol=1e-4)


def test_gradients_reach_every_parameter():
    m = small().train()
    _, v, _ = m(batch())
    (m.full_softmax_loss(v, torch.tensor([1, 2, 3, 4, 5])) + 0.5 * m.covariance_loss()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def prefix_window(x: torch.Tensor, i: int) -> torch.Tensor:
    """The window of the clicks up to the i-th most recent: x[:, i:], padded at the end."""
    out = torch.zeros_like(x)
    out[:, :x.shape[1] - i] = x[:, i:]
    return out


@pytest.mark.parametrize("kw", [{}, {"literal": True}, {"aggregation": "mean"},
                                {"aggregation": "latest"}, {"activation": "votes"},
                                {"share_w3": True}, {"residual": True}])
def test_every_prefix_equals_the_window_that_holds_it_alone(kw):
    """Dense targets: prefix i of forward_prefixes is exactly what serving computes for the
    window of the clicks up to slot i (brute force, one window per prefix)."""
    m = small(**kw)
    x = batch(B=5, seed=4)
    with torch.no_grad():
        phi, v, e = m.forward_prefixes(x)                              # [B, n, K, D], [B, n, D], [B, n, K]
        assert phi.shape == (5, 6, 3, 16) and v.shape == (5, 6, 16) and e.shape == (5, 6, 3)
        for i in range(x.shape[1]):
            xi = prefix_window(x, i)
            real = xi[:, 0] > 0                                        # prefixes that hold a click
            p1, v1, e1 = m(xi)
            torch.testing.assert_close(v[real, i], v1[real], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(phi[real, i], p1[real], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(e[real, i], e1[real], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregation, residual", [("adaptive", False), ("latest", False),
                                                   ("adaptive", True)])
def test_a_backbone_is_causal_and_its_first_prefix_is_the_window(aggregation, residual):
    m = small(blocks=2, heads=2, aggregation=aggregation, residual=residual)
    x = batch(B=5, seed=5)
    x[:, :4] = torch.randint(1, 51, (5, 4))                            # 4 real clicks at least
    with torch.no_grad():
        phi, v, e = m.forward_prefixes(x)
        p0, v0, e0 = m(x)
        torch.testing.assert_close(v[:, 0], v0, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(phi[:, 0], p0, atol=2e-6, rtol=1e-5)
        y = x.clone()
        y[:, 1] = (y[:, 1] % 50) + 1                                   # change the 2nd most recent click
        moved = (m.forward_prefixes(y)[1] - v).abs().amax(-1)          # [B, n]
    assert torch.all(moved[:, 2:] == 0)                                # older prefixes never see it
    assert torch.all(moved[:, :2] > 0)                                 # the ones that hold it move


def test_the_residual_adds_the_latest_state_to_every_interest():
    """Deviation 10: phi_k - LN5(x_latest) is the plain model's interest, for every k."""
    x = batch(B=4, seed=7)
    torch.manual_seed(0)
    m = small(blocks=1, residual=True).eval()
    plain = SINE(SINEConfig(**{**vars(m.config), "residual": False})).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ln5.")})
    with torch.no_grad():
        phi, v, e = m(x)
        X, _ = m.embed(x)
        shift = m.ln5(X[:, 0]).unsqueeze(1)                            # [B, 1, D]
        torch.testing.assert_close(phi - shift, plain(x)[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(v, (e.unsqueeze(-1) * phi).sum(1))
    assert set(m.state_dict()) - set(plain.state_dict()) == {"ln5.weight", "ln5.bias"}


def test_a_backbone_changes_what_the_interests_pool_and_its_config_is_checked():
    x = batch(B=4, seed=6)
    with torch.no_grad():
        plain, deep = small()(x)[1], small(blocks=1)(x)[1]
    assert not torch.allclose(plain, deep, atol=1e-3)
    with pytest.raises(ValueError, match="multiple of heads"):
        SINEConfig(n_items=10, D=16, heads=3, blocks=1)
    with pytest.raises(ValueError, match="dropout"):
        SINEConfig(n_items=10, D=16, blocks=1, dropout=1.0)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        SINEConfig(n_items=10, aggregation="sum")
