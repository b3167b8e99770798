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
"""
from __future__ import annotations

import torch

from ..configs import TrainConfig
from ..models.sine import LogUniformSampler, unit


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
