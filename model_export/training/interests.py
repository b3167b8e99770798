"""Terms that make SINE's K interests distinct and used, added to Eq. 11 with their weights.

SINE trains the aggregate v alone (Eq. 8-9): nothing asks an interest phi_k to predict an item,
so the K interests may all be copies of v. Each term below is off at weight 0 (`TrainConfig`):

- **item term** (`interest_weight`, beta): the target scored by the interests themselves, Eq. 9
  with phi_k* in place of v, where k* = argmax_k <phi_k, h_target> (`argmax`, ComiRec's and
  REMI's choice) or k* ~ softmax(T <phi_k, h_target>) (`sample`, BaM's); or every item scored by
  logsumexp_k <phi_k, h_j> (`logsumexp`), the soft form of the service's best-interest merge.
  Added to Eq. 9 on v, not instead of it (the paper's ablation found label-aware training alone
  worse);
- **cosine penalty** (`cos_penalty`, alpha): the mean pairwise cosine of a user's K interests
  (the authors' code has this term, not the paper);
- **weight supervision** (`weight_kl`, gamma): KL(t || e) from t = softmax(cos(phi_k, h_target) /
  T), held constant, to the Eq. 7 weights e, so that e says which interest the next click is in
  (TiMiRec's distillation, times T^2 as there).

Beside the terms, one step between epochs (`prototype_refresh`): the L prototypes C are set to
the spherical k-means centres of the item rows where Eq. 3 compares them with C, LN1(H W3)
(`refresh_prototypes`). Trained, C does not follow the clusters the item rows form (on the
planted control, k-means on H finds the planted categories, NMI 0.98, while each item's nearest
prototype finds 0.38), so Eq. 3 has no prototype per category to assign a click to.
"""
from __future__ import annotations

import torch

from ..configs import TrainConfig
from ..models.sine import LogUniformSampler, unit


def spherical_kmeans(rows: torch.Tensor, L: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """rows [M, D] -> L unit centres [L, D]: k-means on the unit sphere from a k-means++ start
    (each next centre drawn with probability in proportion to its row's cosine distance from
    the nearest centre so far, with `seed`); a centre left without rows keeps its place."""
    g = torch.Generator().manual_seed(seed)
    U = unit(rows)                                                     # [M, D]
    first = int(torch.randint(len(U), (1,), generator=g))
    picks = [first]
    near = U @ U[first]                                                # [M] best cosine so far
    for _ in range(L - 1):
        far = (1.0 - near).clamp_min(0.0).cpu().double()               # [M]
        j = int(torch.multinomial(far, 1, generator=g)) if far.sum() > 0 else \
            int(torch.randint(len(U), (1,), generator=g))
        picks.append(j)
        near = torch.maximum(near, U @ U[j])
    C = U[picks]                                                       # [L, D]
    for _ in range(iters):
        assign = (U @ C.t()).argmax(1)                                 # [M]
        total = torch.zeros_like(C).index_add_(0, assign, U)           # [L, D]
        C = torch.where(total.norm(dim=1, keepdim=True) > 0, unit(total), C)
    return C


@torch.no_grad()
def refresh_prototypes(model, seed: int = 0) -> None:
    """C <- the k-means centres of the item rows as Eq. 3 sees them, LN1(H W3) (no padding row),
    scaled to C's mean row norm, so that Eq. 2's scores and gates keep their range."""
    L = model.C.shape[0]
    if L > model.config.n_items:
        raise ValueError(f"prototype_refresh needs L <= M, got L={L}, M={model.config.n_items}")
    q = model.ln1(model.item_table() @ model.W3)                       # [M, D]
    centres = spherical_kmeans(q, L, seed=seed)                        # [L, D]
    model.C.copy_(centres * model.C.norm(dim=1).mean())


def pairwise_cosine(phi: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the K (K - 1) ordered pairs of each user's interests: phi [B, K, D] -> [B]."""
    K = phi.shape[1]
    if K == 1:
        return phi.new_zeros(phi.shape[0])
    u = unit(phi)                                                      # [B, K, D]
    G = u @ u.transpose(1, 2)                                          # [B, K, K]
    return (G.sum((1, 2)) - G.diagonal(dim1=1, dim2=2).sum(1)) / (K * (K - 1))   # [B]


def target_interest(phi: torch.Tensor, h: torch.Tensor, how: str, T: float) -> torch.Tensor:
    """The interest each target belongs to, phi [B, K, D], h [B, D] -> k* [B] (no gradient)."""
    with torch.no_grad():
        s = (phi @ h.unsqueeze(-1)).squeeze(-1)                        # [B, K]
        if how == "argmax":
            return s.argmax(1)
        return torch.multinomial(torch.softmax(T * s, dim=1), 1).squeeze(1)   # [B]


def interest_terms(model, phi: torch.Tensor, e: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                   sampler: LogUniformSampler | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The weighted terms that are on, each a scalar: phi [B, K, D], e [B, K], y [B] targets."""
    out: dict[str, torch.Tensor] = {}
    if not (cfg.interest_weight or cfg.cos_penalty or cfg.weight_kl):
        return out                            # the default: nothing added to a step
    h = model.H(y)                                                     # [B, D] the targets
    if cfg.interest_weight > 0:
        if cfg.interest_loss == "logsumexp":
            q = phi                                                    # [B, K, D]
        else:
            k = target_interest(phi, h, cfg.interest_loss, cfg.interest_T)   # [B]
            q = phi[torch.arange(len(y), device=phi.device), k]        # [B, D]
        like = (model.full_softmax_loss(q, y) if sampler is None
                else model.sampled_softmax_loss(q, y, sampler, gen))
        out["interest"] = cfg.interest_weight * like
    if cfg.cos_penalty > 0:
        out["cosine"] = cfg.cos_penalty * pairwise_cosine(phi).mean()
    if cfg.weight_kl > 0 and phi.shape[1] > 1:
        T = cfg.weight_kl_T
        with torch.no_grad():
            cos = (unit(phi) @ unit(h).unsqueeze(-1)).squeeze(-1)      # [B, K]
            t = torch.softmax(cos / T, dim=1)                          # [B, K]
        kl = (t * (torch.log(t.clamp_min(1e-12)) - torch.log(e.clamp_min(1e-12)))).sum(1)   # [B]
        out["weight_kl"] = cfg.weight_kl * T * T * kl.mean()
    return out
