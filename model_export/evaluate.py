"""Paper-protocol evaluation and the concept analyses.

Leave-one-out, full ranking over all M items; the items the user interacted with before the target
are excluded (paper §4.1: "all the items that the user has not interacted with" are the
negatives); the target itself is never excluded, so a repeat click can still be a hit. HR@k and
NDCG@k (one target: 1/log2(rank + 2) for a 0-based rank < k) averaged over users. Ties count
against the target (rank = number of items scored strictly higher).

Concept analyses (§4.3): NMI between each item's nearest prototype (cosine) and its genre or
category, and the items closest to a few prototypes.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from .data import Dataset, Split

KS = (10, 50, 100)


def exclusions(ds: Dataset, which: str) -> list[np.ndarray]:
    """Per user, the items interacted with before the `which` target."""
    cut = 2 if which == "valid" else 1
    return [s[:-cut] for s in ds.sequences]


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, exclude: list[np.ndarray]) -> torch.Tensor:
    """scores [U, M + 1] (column 0 = padding), targets [U] -> 0-based rank of each target."""
    scores = scores.clone()
    t_score = scores.gather(1, targets.unsqueeze(1))                   # [U, 1]
    scores[:, 0] = -torch.inf
    if exclude:
        rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
        cols = np.concatenate(exclude) if len(rows) else np.zeros(0, dtype=np.int64)
        scores[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = -torch.inf
    return (scores > t_score).sum(1)                                   # [U]


def metrics_from_ranks(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out


def evaluate_scores(score_fn: Callable[[np.ndarray], torch.Tensor], inputs: np.ndarray,
                    targets: np.ndarray, exclude: list[np.ndarray] | None, batch_size: int = 1024,
                    ks=KS) -> dict[str, float]:
    """Rank every user's target among all items; `score_fn(rows) -> [b, M + 1]`."""
    ranks = []
    for i in range(0, len(targets), batch_size):
        sl = slice(i, i + batch_size)
        scores = score_fn(inputs[sl])
        ex = exclude[sl] if exclude is not None else []
        ranks.append(rank_targets(scores, torch.from_numpy(targets[sl]), ex).numpy())
    return metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), ks)


@torch.no_grad()
def evaluate_model(model, ds: Dataset, sp: Split, which: str = "test", exclude_history: bool = True,
                   batch_size: int = 1024) -> dict[str, float]:
    model.eval()
    table = model.H.weight                                             # [M + 1, D]
    dev = table.device

    def score(rows: np.ndarray) -> torch.Tensor:
        _, v, _ = model(torch.from_numpy(rows).long().to(dev))        # [b, D]
        return (v @ table.t()).cpu()                                   # [b, M + 1]

    inputs, targets = (sp.valid_inputs, sp.valid_targets) if which == "valid" else \
        (sp.test_inputs, sp.test_targets)
    ex = exclusions(ds, which) if exclude_history else None
    return evaluate_scores(score, inputs, targets, ex, batch_size)


def evaluate_popularity(ds: Dataset, sp: Split, which: str = "test",
                        exclude_history: bool = True) -> dict[str, float]:
    """Most popular training items first: the floor any sequential model must clear."""
    pop = torch.from_numpy(sp.train_counts.astype(np.float32))        # [M + 1]
    inputs, targets = (sp.valid_inputs, sp.valid_targets) if which == "valid" else \
        (sp.test_inputs, sp.test_targets)
    ex = exclusions(ds, which) if exclude_history else None
    return evaluate_scores(lambda rows: pop.expand(len(rows), -1), inputs, targets, ex)


# ---------------------------------------------------------------------------------------------
# concept analyses

def nmi(a: list, b: list) -> float:
    """Normalized mutual information, arithmetic-mean normalisation (scikit-learn's default)."""
    n = len(a)
    if n == 0:
        return 0.0
    ca, cb, cab = Counter(a), Counter(b), Counter(zip(a, b))

    def H(c):
        return -sum(v / n * math.log(v / n) for v in c.values())
    mi = sum(v / n * math.log(v * n / (ca[x] * cb[y])) for (x, y), v in cab.items())
    ha, hb = H(ca), H(cb)
    if ha == 0.0 and hb == 0.0:
        return 1.0
    denom = (ha + hb) / 2
    return float(max(mi, 0.0) / denom) if denom > 0 else 0.0


@torch.no_grad()
def nearest_prototype(model) -> np.ndarray:
    """[M + 1] index of the most cosine-similar prototype for each item (row 0 unused)."""
    Hn = torch.nn.functional.normalize(model.H.weight, dim=-1)         # [M + 1, D]
    Cn = torch.nn.functional.normalize(model.C, dim=-1)                # [L, D]
    return (Hn @ Cn.t()).argmax(1).numpy()                             # [M + 1]


@torch.no_grad()
def concept_analysis(model, ds: Dataset, sp: Split, n_concepts: int = 4, top: int = 8) -> dict:
    """NMI of nearest prototype vs label, and the `top` items closest to the most used prototypes."""
    model.eval()
    near = nearest_prototype(model)
    items = [i for i in range(1, ds.n_items + 1) if i in ds.labels]
    out: dict = {"label_kind": ds.label_kind, "labelled_items": len(items)}
    if items:
        out["nmi"] = nmi([int(near[i]) for i in items], [ds.labels[i] for i in items])
        out["n_labels"] = len(set(ds.labels[i] for i in items))
    # which prototypes users activate (Eq. 2) on their test inputs
    idx_counts: Counter = Counter()
    for i in range(0, len(sp.test_inputs), 2048):
        _, idx = model.activate(*model.embed(torch.from_numpy(sp.test_inputs[i:i + 2048]).long()))
        idx_counts.update(idx.flatten().tolist())
    out["prototypes_used"] = len(idx_counts)
    Hn = torch.nn.functional.normalize(model.H.weight[1:], dim=-1)
    Cn = torch.nn.functional.normalize(model.C, dim=-1)
    cases = []
    for proto, used in idx_counts.most_common(n_concepts):
        sims = Hn @ Cn[proto]
        best = torch.topk(sims, min(top, len(sims))).indices.tolist()
        cases.append({"prototype": proto, "activated_for_users": used,
                      "items": [{"item": ds.item_ids[j + 1],
                                 "title": ds.titles.get(j + 1, ds.item_ids[j + 1]),
                                 "label": ds.labels.get(j + 1, "")} for j in best]})
    out["case_study"] = cases
    return out
