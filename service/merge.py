"""Stage 5, the filter: each row's candidate lists cut to its top n, the seen ids and faiss's -1
dropped, and for `mode=per_interest` the K lists merged into one.

Merges (`Merge`, chosen per request):
- `max`: an item's best score under any interest ranks it (a raw maximum: one interest of
  large norm may fill the list);
- `weighted`: ranked by score + log e_k, the interest's Eq. 7 weight as a prior over interests
  (the item still reports its raw score);
- `quota`: interest k fills round(n e_k) places (largest remainders) with its own best items, in
  decreasing order of e; places an interest cannot fill go to the best remaining candidates;
  the list is then sorted by score.

numpy only (no faiss, no ONNX Runtime), so that the offline evaluation merges with this code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Merge = Literal["max", "weighted", "quota"]
MERGES: tuple[str, ...] = ("max", "weighted", "quota")


@dataclass(slots=True)
class Top:
    """The filtered top n of each row, best first, with the interest that found each item."""
    ids: np.ndarray                    # [P, n] internal ids, best first; valid where < count
    scores: np.ndarray                 # [P, n] float32
    source: np.ndarray                 # [P, n] which query vector (interest) found each one
    count: np.ndarray                  # [P] valid entries per row


def unwanted(ids: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """ids [P, C] -> [P, C] true where -1 (faiss found fewer) or in the row's `exclude` [P, H]
    (internal ids, 0 = none)."""
    P, C = ids.shape
    bad = ids < 0
    if exclude.size and C * exclude.shape[1] <= 65_536:               # a short history: compare all
        bad |= (ids[:, :, None] == exclude[:, None, :]).any(-1)       # [P, C, H] -> [P, C]
    elif exclude.size:
        stride = int(max(ids.max(initial=0), exclude.max(initial=0))) + 2
        off = np.arange(P, dtype=np.int64)[:, None] * stride          # rows never collide
        bad |= np.isin(ids + off, exclude + off)
    return bad


def top_n(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, n: int,
          key: np.ndarray | None = None) -> Top:
    """Per row: drop -1 and the ids in `exclude`, merge the Q lists by best `key` (default: the
    score; an id found by several query vectors keeps its best), and keep the first n.

    scores, ids [P, Q, k] as faiss returns them (each list sorted, best first); exclude [P, H]
    internal ids (0 = none); key [P, Q, k] or None. All rows at once, in numpy."""
    P, Q, k = ids.shape
    flat_ids = ids.reshape(P, Q * k)                                  # [P, C]
    flat_scores = scores.reshape(P, Q * k)
    bad = unwanted(flat_ids, exclude)
    if Q == 1:                                                        # already best first
        pick = np.argsort(bad, axis=1, kind="stable")[:, :n]          # [P, n] good ones, in order
        return Top(np.take_along_axis(flat_ids, pick, 1), np.take_along_axis(flat_scores, pick, 1),
                   np.zeros_like(pick), np.minimum(k - bad.sum(1), n))
    flat_key = flat_scores if key is None else key.reshape(P, Q * k)
    order = np.argsort(np.where(bad, -np.inf, -flat_key), axis=1, kind="stable")
    ranked = np.take_along_axis(flat_ids, order, 1)                   # [P, C] best first
    bad = np.take_along_axis(bad, order, 1)
    by_id = np.argsort(ranked, axis=1, kind="stable")                 # equal ids side by side,
    same = np.take_along_axis(ranked, by_id, 1)                       # the best of them first
    dup = np.zeros_like(bad)
    dup[:, 1:] = same[:, 1:] == same[:, :-1]
    np.put_along_axis(bad, by_id, np.take_along_axis(bad, by_id, 1) | dup, 1)
    pick = np.argsort(bad, axis=1, kind="stable")[:, :n]              # [P, n] good ones, in order
    cols = np.take_along_axis(order, pick, 1)                         # [P, n] candidate columns
    count = np.minimum((~bad).sum(1), n)
    return Top(np.take_along_axis(flat_ids, cols, 1), np.take_along_axis(flat_scores, cols, 1),
               cols // k, count)


def log_weights(weights: np.ndarray) -> np.ndarray:
    """weights [P, K] -> log e [P, K, 1], floored so that a zero weight stays finite."""
    out: np.ndarray = np.log(np.clip(weights, 1e-12, None)).astype(np.float32)
    return out[:, :, None]


def shares(weights: np.ndarray, n: int) -> np.ndarray:
    """Places per interest: n e_k rounded by largest remainders, weights [P, K] -> [P, K] ints
    summing to n."""
    exact = np.clip(weights, 0.0, None) * n / np.clip(weights.sum(1, keepdims=True), 1e-12, None)
    base = np.floor(exact).astype(np.int64)                           # [P, K]
    short = n - base.sum(1)                                           # [P] places still to give
    order = np.argsort(-(exact - base), axis=1, kind="stable")        # largest remainder first
    bonus = np.arange(weights.shape[1])[None, :] < short[:, None]     # [P, K] in that order
    np.put_along_axis(base, order, np.take_along_axis(base, order, 1) + bonus, 1)
    out: np.ndarray = base
    return out


def quota(scores: np.ndarray, ids: np.ndarray, weights: np.ndarray, exclude: np.ndarray,
          n: int | np.ndarray) -> Top:
    """The quota merge (module docstring): scores, ids [P, K, k], weights [P, K]; `n` one list
    length, or each row's [P] (a row's shares depend on its own n)."""
    P, K, k = ids.shape
    ns = np.broadcast_to(np.asarray(n, dtype=np.int64), (P,))
    bad = unwanted(ids.reshape(P, K * k), exclude).reshape(P, K, k)
    width = int(ns.max(initial=0))
    out_ids = np.zeros((P, width), dtype=ids.dtype)
    out_scores = np.zeros((P, width), dtype=np.float32)
    out_source = np.zeros((P, width), dtype=np.int64)
    count = np.zeros(P, dtype=np.int64)
    for p in range(P):
        n = int(ns[p])
        quotas = shares(weights[p: p + 1], n)[0]                      # [K]
        taken: set[int] = set()
        got: list[tuple[float, int, int]] = []                        # (score, id, interest)
        for kk in np.argsort(-weights[p], kind="stable"):
            room = int(quotas[kk])
            for j in range(k):
                if room == 0:
                    break
                i = int(ids[p, kk, j])
                if not bad[p, kk, j] and i not in taken:
                    taken.add(i)
                    got.append((float(scores[p, kk, j]), i, int(kk)))
                    room -= 1
        if len(got) < n:                      # places left over: the best remaining candidates
            flat = np.argsort(-np.where(bad[p], -np.inf, scores[p]).ravel(), kind="stable")
            for c in flat:
                if len(got) == n:
                    break
                kk, j = divmod(int(c), k)
                i = int(ids[p, kk, j])
                if not bad[p, kk, j] and i not in taken:
                    taken.add(i)
                    got.append((float(scores[p, kk, j]), i, kk))
        got.sort(key=lambda t: -t[0])
        count[p] = len(got)
        for r, (s, i, kk) in enumerate(got):
            out_scores[p, r], out_ids[p, r], out_source[p, r] = s, i, kk
    return Top(out_ids, out_scores, out_source, count)


def merge(how: str, scores: np.ndarray, ids: np.ndarray, weights: np.ndarray,
          exclude: np.ndarray, n: int | np.ndarray) -> Top:
    """The per-interest lists of each row merged into its top n: scores, ids [P, K, k] (faiss's
    order), weights [P, K] (Eq. 7), exclude [P, H]; `n` one length or each row's [P]."""
    if how == "max":
        return top_n(scores, ids, exclude, int(np.max(n)))
    if how == "weighted":
        return top_n(scores, ids, exclude, int(np.max(n)), key=scores + log_weights(weights))
    if how == "quota":
        return quota(scores, ids, weights, exclude, n)
    raise ValueError(f"merge must be one of {', '.join(MERGES)}, not {how!r}")
