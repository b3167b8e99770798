"""What the inspector page shows for one user: the clicks the service reads, each interest's
Eq. 7 weight and its own top items, the aggregate's top items and every merge's answer, each
item with its title and (merged) the interest that found it. The same stages as the request
path (`service.stages`, `service.merge`), one user at a time, off the hot path.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from index_builder.bundle import MERGES

from .engine import Engine
from .history import HistoryStore
from .merge import Top, merge, top_n
from .stages import COLD_START, HISTORY_UNAVAILABLE, encode, history, knn, window

NO_HISTORY = "no_history"
INSPECT_API = "/admin/inspect"          # the page's data route (the guard's token rule names it)


def _shown(engine: Engine, titles: dict[str, str], ids: np.ndarray, scores: np.ndarray,
           source: np.ndarray | None = None) -> list[dict[str, Any]]:
    out = []
    for j, (i, s) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True)):
        item = engine.bundle.item_ids()[i]
        row: dict[str, Any] = {"item_id": item, "title": titles.get(item), "score": float(s)}
        if source is not None:
            row["interest"] = int(source[j])
        out.append(row)
    return out


def _top(engine: Engine, titles: dict[str, str], top: Top, merged: bool = False
         ) -> list[dict[str, Any]]:
    have = int(top.count[0])
    return _shown(engine, titles, top.ids[0, :have], top.scores[0, :have],
                  top.source[0, :have] if merged else None)


def _clicks(engine: Engine, titles: dict[str, str], hist: list[str]) -> list[dict[str, Any]]:
    """The history newest first, each click marked known and in the encoder's window."""
    rows, used = [], 0
    for item in hist:
        known = item in engine.item_index
        used += known
        rows.append({"item_id": item, "title": titles.get(item), "known": known,
                     "in_window": known and used <= engine.n})
    return rows


async def inspect(engine: Engine, store: HistoryStore | None, user_id: str, n: int
                  ) -> dict[str, Any]:
    """The inspection of `user_id` at `n` items a list (schemas.Inspection's fields)."""
    titles = engine.bundle.titles()
    hists, unavailable = await history(store, [user_id], strict=False)
    hist = hists[0]
    win = window(engine, [hist])
    known = int(win.known[0])
    fallback = (HISTORY_UNAVAILABLE if unavailable is not None and unavailable[0] else
                NO_HISTORY if not hist else COLD_START if known == 0 else None)
    K = int(engine.bundle.manifest["model"]["K"])
    popular = engine.popular[:n]
    out: dict[str, Any] = {
        "user_id": user_id, "version": engine.version, "K": K, "n": n, "fallback": fallback,
        "history": _clicks(engine, titles, hist), "interests": [], "aggregate": [], "merges": {},
        "popular": _shown(engine, titles, popular, engine.popularity[popular].astype(float))}
    if fallback is not None:
        return out
    e = encode(engine, win.window)                                     # [1, K, D], [1, D], [1, K]
    queries = np.concatenate([e.user_vector, e.interests[0]])          # [1 + K, D]
    scores, ids = knn(engine, queries, n + known)                      # [1 + K, k]
    exclude = win.seen                                                 # [1, H]
    per_scores, per_ids = scores[None, 1:], ids[None, 1:]              # [1, K, k]
    out["aggregate"] = _top(engine, titles, top_n(scores[None, :1], ids[None, :1], exclude, n))
    out["interests"] = [
        {"k": k, "weight": float(e.weights[0, k]),
         "items": _top(engine, titles, top_n(per_scores[:, k:k + 1], per_ids[:, k:k + 1],
                                              exclude, n))}
        for k in range(K)]
    out["merges"] = {how: _top(engine, titles, merge(how, per_scores, per_ids, e.weights,
                                                     exclude, n), merged=True)
                     for how in MERGES}
    return out
