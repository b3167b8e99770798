"""Crisp interests cut from a user's own clicks: the reference that SINE's interests are read
against.

Each user's clicks are split into K groups by spherical k-means on the trained item embeddings
(farthest-point start from the most recent click, then `ITERS` Lloyd steps), and each group
becomes an interest as Eq. 5 makes one when P_{k|t} is one-hot and P_{t|k} uniform: LN3 of the
mean of its clicks. Nothing is trained. The groups are as distinct as the model's item
embeddings let one user's clicks be, so they answer two questions about a trained SINE:

- can its item embeddings give distinct interests at all (the groups' pairwise cosine, beside
  that of interests one click each: the mean over pairs of a user's clicks), and do such interests
  retrieve as well as SINE's own (`PartitionInterests`, searched and merged as the service does);
- where items carry labels, do a user's clicks fall into label-pure groups (NMI within each
  user), beside the same for SINE's Eq. 3 assignment and for chance (the groups permuted within
  the user, which keeps their sizes); and over the whole catalogue, do the item rows cluster by
  label (k-means with L centres) where the prototypes do not (each item's nearest prototype).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.dataset import Dataset, Split
from ..training.interests import pairwise_cosine, spherical_kmeans
from .evaluate import nearest_prototype, nmi

ITERS = 10


def group_clicks(U: torch.Tensor, mask: torch.Tensor, K: int, iters: int = ITERS) -> torch.Tensor:
    """Spherical k-means within each user (`training.interests.spherical_kmeans` clusters one
    [M, D] table): U [B, n, D] unit rows, mask [B, n] -> one-hot groups [B, n, K] (pads all 0).
    Starts from the most recent click (slot 0) and adds, K - 1 times, the click least similar
    to every centre so far; a user with fewer than K distinct clicks leaves groups empty."""
    B = U.shape[0]
    rows = torch.arange(B, device=U.device)
    centres = [U[:, 0]]                                                # K of [B, D]
    for _ in range(K - 1):
        near = torch.stack([(U * c.unsqueeze(1)).sum(-1) for c in centres], -1).amax(-1)  # [B, n]
        centres.append(U[rows, near.masked_fill(~mask, 2.0).argmin(1)])
    C = torch.stack(centres, 1)                                        # [B, K, D]
    for _ in range(iters):
        groups = F.one_hot((U @ C.transpose(1, 2)).argmax(-1), K).to(U.dtype)   # [B, n, K]
        groups = groups * mask.unsqueeze(-1)
        # an emptied group keeps its centre (a zero sum would make it NaN)
        total = groups.transpose(1, 2) @ U                             # [B, K, D]
        C = torch.where(groups.sum(1, keepdim=True).transpose(1, 2) > 0, F.normalize(total, dim=-1), C)
    groups = F.one_hot((U @ C.transpose(1, 2)).argmax(-1), K).to(U.dtype)
    return groups * mask.unsqueeze(-1)                                 # [B, n, K]


@torch.no_grad()
def partition(model, rows: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows [B, n] -> (interests [B, K, D], each group's share of the clicks [B, K], the groups
    [B, n, K]). An empty group repeats the largest one, with share 0."""
    X, mask = model.embed(rows)                                        # [B, n, D], [B, n]
    groups = group_clicks(F.normalize(X, dim=-1), mask, K)             # [B, n, K]
    count = groups.sum(1)                                              # [B, K]
    phi = model.ln3((groups.transpose(1, 2) @ X) / count.clamp_min(1).unsqueeze(-1))  # [B, K, D]
    largest = phi[torch.arange(len(rows)), count.argmax(1)]            # [B, D]
    phi = torch.where((count > 0).unsqueeze(-1), phi, largest.unsqueeze(1))
    share = count / count.sum(1, keepdim=True).clamp_min(1)            # [B, K]
    return phi, share, groups


class PartitionInterests(nn.Module):
    """A SINE whose K interests are the k-means groups of the user's clicks, weighted by their
    share of the clicks; the aggregate stays SINE's Eq. 8 vector. Drop-in for `evaluate_merge`."""

    def __init__(self, model, K: int | None = None):
        super().__init__()
        self.model, self.H = model, model.H
        self.K = K or model.config.K
        self.config = model.config

    def forward(self, item_ids: torch.Tensor):
        _, v, _ = self.model(item_ids)                                 # [B, D]
        phi, share, _ = partition(self.model, item_ids, self.K)        # [B, K, D], [B, K]
        return phi, v, share.clamp_min(1e-6)                           # the merges take log e


def mean_pair_cosine(vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """vectors [B, K, D], valid [B, K] -> [B] mean cosine over a user's ordered pairs of valid
    vectors (NaN where fewer than two)."""
    u = F.normalize(vectors, dim=-1)
    pairs = valid.unsqueeze(1) & valid.unsqueeze(2)
    pairs &= ~torch.eye(vectors.shape[1], dtype=torch.bool, device=vectors.device)
    n = pairs.sum((1, 2))
    total = ((u @ u.transpose(1, 2)) * pairs).sum((1, 2))
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))


def within_user_nmi(groups: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """groups, labels [B, n] (any ids; labels None where unknown), mask [B, n] -> mean over users
    of NMI(group, label) on their own labelled clicks."""
    out = []
    for g, lab, m in zip(groups, labels, mask):
        keep = m & np.array([x is not None for x in lab])
        if keep.sum() >= 2:
            out.append(nmi(list(g[keep]), list(lab[keep])))
    return float(np.mean(out)) if out else float("nan")


@torch.no_grad()
def partition_diagnostics(model, ds: Dataset, sp: Split, K: int | None = None,
                          batch_size: int = 1024, seed: int = 0) -> dict:
    """On the test inputs: the cosine of one-click interests, the k-means groups' cosine beside SINE's
    interests', and, with item labels, the within-user NMI of the groups, of SINE's Eq. 3
    assignment and of chance."""
    model.eval()
    K = K or model.config.K
    rng = np.random.default_rng(seed)
    click, part, sine = [], [], []
    nmi_rows: dict[str, list[np.ndarray]] = {"partition": [], "sine": [], "chance": [], "labels": [], "mask": []}
    for i in range(0, len(sp.test_inputs), batch_size):
        rows = torch.from_numpy(sp.test_inputs[i:i + batch_size]).long()
        X, mask = model.embed(rows)                                    # [b, n, D], [b, n]
        click.append(mean_pair_cosine(model.ln3(X), mask))
        phi_p, share, groups = partition(model, rows, K)
        part.append(mean_pair_cosine(phi_p, share > 0))
        phi, _, _ = model(rows)                                        # [b, K_model, D]
        sine.append(pairwise_cosine(phi))                              # [b]
        if ds.labels:
            _, _, _, idx, _, _, P_kt = model.assign(rows)              # idx [b, K], P_kt [b, n, K]
            m = mask.numpy()
            g = groups.argmax(-1).numpy()                              # [b, n]
            shuffled = g.copy()
            for u in range(len(g)):
                shuffled[u, m[u]] = rng.permutation(g[u, m[u]])
            nmi_rows["partition"].append(g)
            nmi_rows["chance"].append(shuffled)
            nmi_rows["sine"].append(idx.gather(1, P_kt.argmax(-1)).numpy())
            nmi_rows["labels"].append(np.vectorize(lambda j: ds.labels.get(int(j)), otypes=[object])(rows.numpy()))
            nmi_rows["mask"].append(m)

    def mean(parts: list[torch.Tensor]) -> float | None:
        x = torch.cat(parts)
        x = x[~torch.isnan(x)]
        return float(x.mean()) if len(x) else None
    out = {"K": K, "users": len(sp.test_inputs), "click_cosine": mean(click),
           "partition_cosine": mean(part), "interest_cosine": mean(sine) if model.config.K > 1 else None}
    if ds.labels:
        labels, mask = np.concatenate(nmi_rows["labels"]), np.concatenate(nmi_rows["mask"])
        for name in ("partition", "sine", "chance"):
            out[f"within_user_nmi_{name}"] = within_user_nmi(np.concatenate(nmi_rows[name]), labels, mask)
        items = sorted(ds.labels)                                      # internal ids with a label
        L = model.config.L
        centres = spherical_kmeans(model.item_table(), L, seed=seed)   # [L, D]
        cluster = (F.normalize(model.item_table(), dim=-1) @ centres.t()).argmax(1).numpy()   # [M]
        item_labels = [ds.labels[j] for j in items]
        out["item_kmeans_nmi"] = nmi([int(cluster[j - 1]) for j in items], item_labels)
        near = nearest_prototype(model)                                # [M + 1]
        out["prototype_nmi"] = nmi([int(near[j]) for j in items], item_labels)
    return out
