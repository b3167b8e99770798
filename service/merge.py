"""Stage 5, the filter: each row's candidate lists cut to its top n, the seen ids and faiss's -1
dropped, and for `mode=per_interest` the K lists merged into one.

Merges (`Merge`, chosen per request; `BEST_KEY` names those that rank an item by its best key
over the interests, which a narrow search can prove exact and a dense search can take as one
maximum over the K score rows, `key_shift`):
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

import numpy as np

from index_builder.bundle import MERGES, Merge

BEST_KEY: tuple[Merge, ...] = ("max", "weighted")
# the quota merge marks seen ids in a [P, max id + 1] table up to this many cells (4 MB of bools),
# else compares each interest's list against the picks so far ([P, k, n] per step)
SEEN_CELLS = 1 << 22


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


def key_shift(how: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What each row's merge adds to an interest's scores to rank by: how [P] (`BEST_KEY`
    names), weights [P, K] -> [P, K, 1] (0 for max, log e_k for weighted)."""
    out: np.ndarray = np.where((how == "weighted")[:, None, None], log_weights(weights),
                               np.float32(0))
    return out


def shares(weights: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Places per interest: n e_k rounded by largest remainders, weights [P, K] -> [P, K] ints
    summing to n (one n, or each row's [P])."""
    ns = np.broadcast_to(np.asarray(n, dtype=np.int64), weights.shape[:1])
    w = np.clip(weights, 0.0, None)
    exact = w * ns[:, None] / np.clip(w.sum(1, keepdims=True), 1e-12, None)
    base = np.floor(exact).astype(np.int64)                           # [P, K]
    short = ns - base.sum(1)                                          # [P] places still to give
    order = np.argsort(-(exact - base), axis=1, kind="stable")        # largest remainder first
    bonus = np.arange(weights.shape[1])[None, :] < short[:, None]     # [P, K] in that order
    np.put_along_axis(base, order, np.take_along_axis(base, order, 1) + bonus, 1)
    out: np.ndarray = base
    return out


def quota(scores: np.ndarray, ids: np.ndarray, weights: np.ndarray, exclude: np.ndarray,
          n: int | np.ndarray) -> Top:
    """The quota merge (module docstring): scores, ids [P, K, k], weights [P, K]; `n` one list
    length, or each row's [P] (a row's shares depend on its own n). K vectorized steps, one
    per interest in decreasing weight, then one fill for the rows left short."""
    P, K, k = ids.shape
    ns = np.broadcast_to(np.asarray(n, dtype=np.int64), (P,))
    W = int(ns.max(initial=0))
    room = shares(weights, ns)                                        # [P, K]
    out_ids = np.full((P, W), -1, dtype=np.int64)                     # the picks so far
    out_scores = np.full((P, W), -np.inf, dtype=np.float32)
    out_source = np.zeros((P, W), dtype=np.int64)
    count = np.zeros(P, dtype=np.int64)
    rows = np.arange(P)
    size = int(max(ids.max(initial=0), exclude.max(initial=0))) + 1
    # ids below `size`: a row's excluded and picked ids marked in one table, looked up per step
    # ([P, k] gathers), where the table is small; else each step compares against the picks
    seen = np.zeros((P, size), dtype=bool) if P * size <= SEEN_CELLS else None
    if seen is not None:
        seen[rows[:, None], exclude] = True                           # 0-padding marks id 0: none
    else:
        bad = unwanted(ids.reshape(P, K * k), exclude).reshape(P, K, k)
    for kk in np.argsort(-weights, axis=1, kind="stable").T:          # [P]: each row's next interest
        cand = ids[rows, kk]                                          # [P, k]
        if seen is not None:                                          # -1 reads the last column:
            ok = (cand >= 0) & ~seen[rows[:, None], cand]             # [P, k], masked by cand >= 0
        else:
            ok = ~bad[rows, kk] & ~(cand[:, :, None] == out_ids[:, None, :]).any(-1)   # [P, k]
        rank = np.cumsum(ok, axis=1)                                  # [P, k]
        pick = ok & (rank <= room[rows, kk][:, None])
        r, c = np.nonzero(pick)
        at = count[r] + rank[r, c] - 1
        out_ids[r, at], out_scores[r, at], out_source[r, at] = cand[r, c], scores[r, kk[r], c], kk[r]
        if seen is not None:
            seen[r, cand[r, c]] = True
        count += pick.sum(1)
    short = np.flatnonzero(count < ns)
    if len(short):                            # places left over: the best remaining candidates
        taken = np.concatenate([exclude[short], np.where(out_ids[short] < 0, 0, out_ids[short])], 1)
        fill = top_n(scores[short], ids[short], taken, W)
        need = np.minimum(ns[short] - count[short], fill.count)       # [S]
        r, j = np.nonzero(np.arange(W)[None, :] < need[:, None])
        at, rr = count[short][r] + j, short[r]
        out_ids[rr, at], out_scores[rr, at], out_source[rr, at] = \
            fill.ids[r, j], fill.scores[r, j], fill.source[r, j]
        count[short] += need
    order = np.argsort(-out_scores, axis=1, kind="stable")            # [P, W] best first
    return Top(np.take_along_axis(out_ids, order, 1), np.take_along_axis(out_scores, order, 1),
               np.take_along_axis(out_source, order, 1), count)


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
