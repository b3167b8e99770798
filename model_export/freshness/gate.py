"""The refresh cycle's gate: the held-out clicks, the histories a request would see, and a
bundle scored on them exactly as the service answers (its engine and stages)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from index_builder.bundle import PER_INTEREST

from .. import data


def holdout(clicks: list[tuple[str, str, float, str]], since: float
            ) -> tuple[list[tuple[str, str, float]], dict[str, str]]:
    """(training clicks, {user: held-out item}): each user active since `since` gives up their
    last click to the gate."""
    last: dict[str, tuple[float, str, str]] = {}
    for u, i, ts, eid in clicks:
        if ts >= since and (u not in last or (ts, eid) > (last[u][0], last[u][2])):
            last[u] = (ts, i, eid)
    held = {(u, eid) for u, (_, _, eid) in last.items()}       # event ids are per user
    train = [(u, i, ts) for u, i, ts, eid in clicks if (u, eid) not in held]
    return train, {u: i for u, (_, i, _) in last.items()}


def histories(base: data.Dataset, clicks: list[tuple[str, str, float]],
              users: dict[str, str] | list[str]) -> dict[str, list[str]]:
    """Each user's clicks oldest first, as a request would see them: the base sequence, then
    the new clicks in time order (users with too few clicks for training included)."""
    want = set(users)
    mine = data.in_time_order(c for c in clicks if c[0] in want)
    out = {u: [base.item_ids[int(j)] for j in s] for u, s in zip(base.user_ids, base.sequences)
           if u in want}
    for u in want:
        out[u] = out.get(u, []) + mine.get(u, [])
    return out


def score_bundle(path: Path | str, histories: dict[str, list[str]], targets: dict[str, str],
                 k: int = 50, batch: int = 256) -> dict[str, Any]:
    """HR@k and NDCG@k of a bundle on held-out clicks, answered as the service answers a request
    that names no mode: its engine encodes each user's newest clicks (oldest first in
    `histories`), searches the index with the bundle's default search (manifest `serving`)
    and drops every item of the history. A target the bundle does not know is a miss."""
    from service.engine import load_engine
    from service.merge import merge, top_n
    from service.stages import DEFAULT_MERGE, compute, window

    eng = load_engine(path, providers="cpu", faiss_gpu="off", warm_batch=1)
    mode, how = eng.bundle.serving
    per = mode == PER_INTEREST
    users = [u for u in targets if histories.get(u)]
    hits, ndcg = 0, 0.0
    for s in range(0, len(users), batch):
        part = users[s: s + batch]
        win = window(eng, [histories[u][::-1] for u in part])           # newest first
        known = win.known > 0
        rows = np.flatnonzero(known)
        if not len(rows):
            continue
        c = compute(eng, win.window[rows], np.full(len(rows), per),
                    int(k + win.known[rows].max()))
        found = c.hits[mode]                                           # every row, [P, Q, k]
        top = (merge(how or DEFAULT_MERGE, found.scores, found.ids, c.weights, win.seen[rows], k)
               if per else top_n(found.scores, found.ids, win.seen[rows], k))
        for p, r in enumerate(rows):
            want = eng.item_index.get(targets[part[r]])
            got = top.ids[p, : int(top.count[p])].tolist()
            if want is not None and want in got:
                rank = got.index(want)
                hits += 1
                ndcg += 1.0 / np.log2(rank + 2)
    n = max(len(users), 1)
    return {f"HR@{k}": hits / n, f"NDCG@{k}": ndcg / n, "users": len(users),
            "search": mode + (f"/{how}" if per else "")}
