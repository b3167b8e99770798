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

from index_builder.bundle import AGGREGATE, MODES, Mode

from ..data import Dataset, Split

KS = (10, 50, 100)


def exclusions(ds: Dataset, which: str) -> list[np.ndarray]:
    """Per user, the items interacted with before the `which` target."""
    cut = 2 if which == "valid" else 1
    return [s[:-cut] for s in ds.sequences]


def masked(scores: torch.Tensor, exclude: list[np.ndarray], keep: torch.Tensor | None = None
           ) -> torch.Tensor:
    """A copy of scores [U, M + 1] with padding and each user's `exclude` ids at -inf; the
    column `keep` [U] of each row (the target) is never excluded."""
    out = scores.clone()
    out[:, 0] = -torch.inf
    if exclude:
        rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
        cols = np.concatenate(exclude) if len(rows) else np.zeros(0, dtype=np.int64)
        out[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = -torch.inf
    if keep is not None:
        out.scatter_(1, keep.unsqueeze(1), scores.gather(1, keep.unsqueeze(1)))
    return out


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, exclude: list[np.ndarray]) -> torch.Tensor:
    """scores [U, M + 1] (column 0 = padding), targets [U] -> 0-based rank of each target."""
    t_score = scores.gather(1, targets.unsqueeze(1))                   # [U, 1]
    return (masked(scores, exclude) > t_score).sum(1)                  # [U]


def metrics_from_ranks(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out


def evaluate_scores(score_fn: Callable[[np.ndarray], torch.Tensor], inputs: np.ndarray,
                    targets: np.ndarray, exclude: list[np.ndarray] | None, batch_size: int = 1024,
                    ks=KS, ranks_out: list[np.ndarray] | None = None) -> dict[str, float]:
    """Rank every user's target among all items; `score_fn(rows) -> [b, M + 1]`. The 0-based
    ranks [U] are appended to `ranks_out` when given (for paired comparisons of two models on
    the same users)."""
    ranks = []
    for i in range(0, len(targets), batch_size):
        sl = slice(i, i + batch_size)
        scores = score_fn(inputs[sl])
        ex = exclude[sl] if exclude is not None else []
        ranks.append(rank_targets(scores, torch.from_numpy(targets[sl]), ex).numpy())
    every = np.concatenate(ranks) if ranks else np.zeros(0)           # [U]
    if ranks_out is not None:
        ranks_out.append(every)
    return metrics_from_ranks(every, ks)




def scorer(model, mode: Mode = AGGREGATE) -> Callable[[np.ndarray], torch.Tensor]:
    """rows [b, n] -> scores [b, M + 1] as the service ranks: `aggregate` scores v . H_j;
    `per_interest` searches with each of the K interests and merges by best score, which for an
    exact search is max_k phi_k . H_j."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    table = model.H.weight                                             # [M + 1, D]
    dev = table.device

    @torch.no_grad()
    def score(rows: np.ndarray) -> torch.Tensor:
        phi, v, _ = model(torch.from_numpy(rows).long().to(dev))      # [b, K, D], [b, D]
        if mode == AGGREGATE:
            return (v @ table.t()).cpu()                               # [b, M + 1]
        return (phi @ table.t()).amax(1).cpu()                         # [b, K, M + 1] -> [b, M + 1]
    return score


@torch.no_grad()
def evaluate_merge(model, ds: Dataset, sp: Split, how: str, which: str = "test",
                   batch_size: int = 256, ks=KS,
                   hits_out: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """HR and NDCG@k of `mode=per_interest` as the service answers it: each interest's exact top
    max(ks) (history excluded, the target never), merged by the service's own code
    (`service.merge.merge`, `how` one of its MERGES) into a list of k for each k (a quota list
    of 10 is not the head of one of 100). `hits_out`, when given, gets each user's hit at each k
    ({k: [U] bool})."""
    from service.merge import merge

    model.eval()
    inputs, targets = _split_rows(sp, which)
    ex = exclusions(ds, which)
    table = model.H.weight                                             # [M + 1, D]
    top = min(max(ks), ds.n_items)
    ranks: dict[int, list[np.ndarray]] = {k: [] for k in ks}       # k where the list misses
    for i in range(0, len(targets), batch_size):
        sl = slice(i, i + batch_size)
        phi, _, e = model(torch.from_numpy(inputs[sl]).long().to(table.device))   # [b, K, D], [b, K]
        b, K, _ = phi.shape
        t = torch.from_numpy(targets[sl]).long()                       # [b]
        scores = (phi @ table.t()).cpu()                               # [b, K, M + 1]
        flat = masked(scores.reshape(b * K, -1), [x for x in ex[sl] for _ in range(K)],
                      keep=t.repeat_interleave(K))                     # [b K, M + 1]
        best = torch.topk(flat, top, dim=1)                            # [b K, top]
        s = best.values.reshape(b, K, top).numpy()                     # [b, K, top]
        ids = best.indices.reshape(b, K, top).numpy()
        w, none = e.cpu().numpy(), np.zeros((b, 0), dtype=np.int64)
        for k in ks:
            at = merge(how, s, ids, w, none, k).ids[:, :k] == targets[sl][:, None]   # [b, k]
            ranks[k].append(np.where(at.any(1), at.argmax(1), k))
    out: dict[str, float] = {}
    for k in ks:
        at_k = np.concatenate(ranks[k]) if ranks[k] else np.zeros(0)   # [U], k = a miss
        out.update(metrics_from_ranks(at_k, (k,)))
        if hits_out is not None:
            hits_out[k] = at_k < k
    return out


def _split_rows(sp: Split, which: str) -> tuple[np.ndarray, np.ndarray]:
    return (sp.valid_inputs, sp.valid_targets) if which == "valid" else \
        (sp.test_inputs, sp.test_targets)


@torch.no_grad()
def evaluate_model(model, ds: Dataset, sp: Split, which: str = "test", exclude_history: bool = True,
                   batch_size: int = 1024, mode: Mode = AGGREGATE,
                   ranks_out: list[np.ndarray] | None = None) -> dict[str, float]:
    model.eval()
    inputs, targets = _split_rows(sp, which)
    ex = exclusions(ds, which) if exclude_history else None
    bs = batch_size if mode == AGGREGATE else max(1, batch_size // model.config.K)
    return evaluate_scores(scorer(model, mode), inputs, targets, ex, bs, ranks_out=ranks_out)


def evaluate_popularity(ds: Dataset, sp: Split, which: str = "test",
                        exclude_history: bool = True) -> dict[str, float]:
    """Most popular training items first: the floor any sequential model must clear."""
    inputs, targets = _split_rows(sp, which)
    ex = exclusions(ds, which) if exclude_history else None
    return evaluate_scores(popularity_scorer(sp), inputs, targets, ex)


def popularity_scorer(sp: Split) -> Callable[[np.ndarray], torch.Tensor]:
    pop = torch.from_numpy(sp.train_counts.astype(np.float32))        # [M + 1]
    return lambda rows: pop.expand(len(rows), -1)


# ---------------------------------------------------------------------------------------------
# beyond accuracy: what the top-N lists hold

def top_lists(score_fn: Callable[[np.ndarray], torch.Tensor], inputs: np.ndarray,
              exclude: list[np.ndarray], N: int, batch_size: int = 512) -> np.ndarray:
    """Each row's top N internal ids [U, N], best first, history excluded (the service's list)."""
    out = []
    for i in range(0, len(inputs), batch_size):
        sl = slice(i, i + batch_size)
        out.append(torch.topk(masked(score_fn(inputs[sl]), exclude[sl]), N, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, N), dtype=np.int64)


def list_metrics(lists: np.ndarray, targets: np.ndarray, ds: Dataset, sp: Split) -> dict[str, float]:
    """lists [U, N] -> HR@N, catalog coverage@N (share of the M items in some list), intra-list
    diversity@N (share of pairs in a list with different labels: genre / category) and
    novelty@N (mean self-information -log2 of an item's share of training users' clicks)."""
    U, N = lists.shape
    out = {f"HR@{N}": float((lists == targets[:, None]).any(1).mean()),
           f"coverage@{N}": float(len(np.unique(lists)) / ds.n_items)}
    if ds.labels:
        names = sorted(set(ds.labels.values()))
        code = {x: i for i, x in enumerate(names)}
        lab = np.zeros(ds.n_items + 1, dtype=np.int64)                 # 0: unlabelled
        for i, x in ds.labels.items():
            lab[i] = code[x] + 1
        L = lab[lists]                                                 # [U, N]
        counts = np.zeros((U, len(names) + 1), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(U), N), L.ravel()), 1)
        counts = counts[:, 1:]                                         # [U, labels]
        labelled = counts.sum(1)                                       # [U]
        same = (counts * (counts - 1)).sum(1)                          # ordered same-label pairs
        pairs = labelled * (labelled - 1)
        ok = pairs > 0
        out[f"diversity@{N}"] = float((1.0 - same[ok] / pairs[ok]).mean()) if ok.any() else 0.0
        out[f"labels@{N}"] = float((counts > 0).sum(1).mean())        # distinct labels per list
    share = (sp.train_counts + 1.0) / (sp.train_counts.sum() + ds.n_items)   # smoothed, [M + 1]
    out[f"novelty@{N}"] = float((-np.log2(share[lists])).mean())
    return out


@torch.no_grad()
def beyond_accuracy(model, ds: Dataset, sp: Split, N: int = 50, mode: Mode = AGGREGATE,
                    which: str = "test") -> dict[str, float]:
    """`list_metrics` of the model's top-N test lists (`model=None`: popularity)."""
    inputs, targets = _split_rows(sp, which)
    if model is None:
        fn, bs = popularity_scorer(sp), 512
    else:
        model.eval()
        fn, bs = scorer(model, mode), max(1, 512 // model.config.K)
    return list_metrics(top_lists(fn, inputs, exclusions(ds, which), N, bs), targets, ds, sp)


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


# ---------------------------------------------------------------------------------------------
# interest diagnostics: are the K interests distinct, and do they find planted ones?

def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis)


@torch.no_grad()
def interest_diagnostics(model, ds: Dataset, sp: Split, batch_size: int = 1024) -> dict:
    """On the test inputs of a SINE: the mean pairwise cosine of a user's K interests, the
    entropy of the aggregation weights e (Eq. 7) over log K (1 = uniform, 0 = one interest),
    the effective number of interests exp(H(e)), the entropy of each click's Eq. 3 assignment
    P_{k|t} over log K (near 1: the interests can differ only through Eq. 4), prototype
    usage (how many of the L prototypes any user activates, and the effective number exp(H)
    of their usage), and, where the data has item labels, the NMI between each history
    click's label and the prototype its Eq. 3 assignment picks (on planted data: did SINE
    recover the planted interests?)."""
    model.eval()
    K, L = model.config.K, model.config.L
    cos_sum, e_ent, e_max, n_users = 0.0, [], [], 0
    a_ent: list[np.ndarray] = []                                       # H(P_{k|t}) per click
    usage = np.zeros(L, dtype=np.int64)
    clicks_label: list[str] = []
    clicks_proto: list[int] = []
    for i in range(0, len(sp.test_inputs), batch_size):
        rows = torch.from_numpy(sp.test_inputs[i:i + batch_size]).long()
        phi, _, e = model(rows)                                        # [b, K, D], [b, K]
        _, mask, _, idx, _, _, P_kt = model.assign(rows)               # idx [b, K], P_kt [b, n, K]
        if K > 1:
            u = torch.nn.functional.normalize(phi, dim=-1)
            G = u @ u.transpose(1, 2)                                  # [b, K, K]
            cos_sum += float(((G.sum((1, 2)) - K) / (K * (K - 1))).sum())
        e_np = e.numpy()
        e_ent.append(_entropy(e_np) / (np.log(K) if K > 1 else 1.0))
        e_max.append(e_np.max(1))
        np.add.at(usage, idx.flatten().numpy(), 1)
        n_users += len(rows)
        a_ent.append(_entropy(P_kt.numpy()[mask.numpy()]) / (np.log(K) if K > 1 else 1.0))
        if ds.labels:
            pick = idx.gather(1, P_kt.argmax(-1))                      # [b, n] prototype per click
            m = mask.numpy()
            ids, protos = rows.numpy()[m], pick.numpy()[m]
            for item, proto in zip(ids, protos):
                lab = ds.labels.get(int(item))
                if lab is not None:
                    clicks_label.append(lab)
                    clicks_proto.append(int(proto))
    share = usage[usage > 0] / usage.sum()
    ent = np.concatenate(e_ent)
    out = {"K": K, "L": L, "users": n_users,
           "interest_cosine": cos_sum / n_users if K > 1 else None,
           "weight_entropy": float(ent.mean()),
           "effective_interests": float(np.exp(ent * (np.log(K) if K > 1 else 0.0)).mean()),
           "max_weight": float(np.concatenate(e_max).mean()),
           "assignment_entropy": float(np.concatenate(a_ent).mean()) if a_ent else None,
           "prototypes_used": int((usage > 0).sum()),
           "prototypes_effective": float(np.exp(_entropy(share)))}
    if clicks_label:
        out["assignment_nmi"] = nmi(clicks_proto, clicks_label)
        out["label_kind"] = ds.label_kind
    return out
