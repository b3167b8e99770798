"""The request path: history -> encode -> search -> filter, each a small timed stage.

Encode and search run per micro-batch: the requests that reach the encoder in the same turn of
the event loop (up to `batch_max_size`) share one ONNX Runtime run and one faiss search. Without
batching a request computes alone.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine
from .errors import HistoryUnavailable
from .history import HistoryError, HistoryStore
from .metrics import Metrics
from .settings import Settings

COLD_START, HISTORY_UNAVAILABLE = "cold_start", "history_unavailable"


@dataclass
class Query:
    user_id: str
    n: int
    exclude_seen: bool = True
    mode: str = "aggregate"            # or "per_interest"
    include_interests: bool = False


@dataclass
class Job:
    engine: Engine
    window: np.ndarray                 # [n] int64
    k: int                             # how many to fetch per search vector
    per_interest: bool


@dataclass
class Encoded:
    interests: np.ndarray              # [K, D]
    user_vector: np.ndarray            # [D]
    weights: np.ndarray                # [K]
    scores: np.ndarray                 # [Q, k]  Q = 1 (aggregate) or K (per interest)
    ids: np.ndarray                    # [Q, k]
    timings: dict[str, float] = field(default_factory=dict)


def compute(jobs: list[Job]) -> list[Encoded]:
    """One encoder run and one faiss search for jobs that share an engine."""
    out: list[Encoded | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(id(j.engine), []).append(i)
    for idx in groups.values():
        eng = jobs[idx[0]].engine
        t0 = time.perf_counter()
        windows = np.stack([jobs[i].window for i in idx])                     # [B, n]
        interests, uv, weights = eng.encode(windows)                          # [B, K, D], [B, D], [B, K]
        t1 = time.perf_counter()
        rows, spans = [], []
        for b, i in enumerate(idx):
            q = interests[b] if jobs[i].per_interest else uv[b: b + 1]        # [Q, D]
            spans.append((len(rows), len(rows) + len(q)))
            rows.extend(q)
        k = max(jobs[i].k for i in idx)
        scores, ids = eng.search(np.stack(rows), k)                           # [sum Q, k]
        t2 = time.perf_counter()
        timing = {"encode": t1 - t0, "search": t2 - t1}
        for b, i in enumerate(idx):
            s, e = spans[b]
            out[i] = Encoded(interests[b], uv[b], weights[b], scores[s:e], ids[s:e], timing)
    return out  # type: ignore[return-value]


class MicroBatcher:
    """Collects the jobs submitted while the event loop turns, and computes them as one batch.

    The batch runs on the event loop's own thread: handing it to a worker thread costs a GIL
    hand-over per batch (up to the 5 ms switch interval while the loop is busy), which measured
    slower than computing in place (benchmarks/results/service.md).
    """

    def __init__(self, max_size: int, max_wait_s: float, metrics: Metrics):
        self.max_size, self.max_wait = max_size, max_wait_s
        self.metrics = metrics
        self.queue: deque[tuple[Job, asyncio.Future, float]] = deque()
        self._task: asyncio.Task | None = None

    async def submit(self, job: Job) -> tuple[Encoded, float]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.append((job, fut, time.perf_counter()))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self.queue:
            # let every request that is ready in this turn of the loop join the batch
            await asyncio.sleep(self.max_wait if len(self.queue) < self.max_size else 0)
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.max_size))]
            start = time.perf_counter()
            self.metrics.batch_size.observe(len(batch))
            try:
                results = compute([b[0] for b in batch])
            except Exception as e:          # surfaced to each waiting request
                for _, f, _ in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f, t_in), r in zip(batch, results):
                if not f.done():
                    f.set_result((r, start - t_in))


class Recommender:
    def __init__(self, settings: Settings, metrics: Metrics, store: HistoryStore | None):
        self.s, self.m, self.store = settings, metrics, store
        self.batcher = (MicroBatcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000,
                                     metrics) if settings.batching else None)

    # stage 1: history
    async def histories(self, user_ids: list[str], timings: dict) -> tuple[list, str | None]:
        """Histories newest first (None = no key), or the reason they are unavailable."""
        if self.store is None:
            return [None] * len(user_ids), None
        with self.m.time_stage("history", timings):
            try:
                if len(user_ids) == 1:
                    return [await self.store.get(user_ids[0])], None
                return await self.store.get_many(user_ids), None
            except HistoryError as e:
                if self.s.on_history_unavailable == "error":
                    raise HistoryUnavailable(f"The history store is unavailable ({e}).",
                                             {"Retry-After": "1"}) from e
                return [None] * len(user_ids), HISTORY_UNAVAILABLE

    async def recommend(self, engine: Engine, q: Query, history: list[str] | None,
                        unavailable: str | None, timings: dict) -> dict:
        window, seen, unknown = engine.window(history or [])
        if unknown:
            self.m.unknown_items.inc(unknown)
        fallback = unavailable or (COLD_START if not seen else None)
        exclude = set(seen) if q.exclude_seen else set()
        if fallback:
            self.m.fallbacks.labels(fallback).inc()
            with self.m.time_stage("popularity", timings):
                items = self.popular(engine, q.n, exclude)
            return self._answer(engine, q, fallback, items, None)
        per_interest = q.mode == "per_interest"
        job = Job(engine, window, q.n + len(exclude), per_interest)
        if self.batcher is not None:
            enc, waited = await self.batcher.submit(job)
            timings["queue"] = waited
            self.m.stage.labels("queue").observe(waited)
        else:
            enc = compute([job])[0]
        for st, dt in enc.timings.items():
            timings[st] = dt
            self.m.stage.labels(st).observe(dt)
        with self.m.time_stage("filter", timings):
            items = self._filter(engine, q, enc, exclude)
        return self._answer(engine, q, None, items,
                            enc.weights if q.include_interests else None)

    # stage 4: filter -- drop -1 and seen ids, merge interests, trim, top up if the index ran short
    def _filter(self, engine: Engine, q: Query, enc: Encoded, exclude: set[int]) -> list[dict]:
        best: dict[int, tuple[float, int]] = {}
        single = enc.ids.shape[0] == 1       # aggregate: one sorted list, stop at n
        for r in range(enc.ids.shape[0]):
            for s, i in zip(enc.scores[r].tolist(), enc.ids[r].tolist()):
                if i < 0 or i in exclude:
                    continue
                if i not in best or s > best[i][0]:
                    best[i] = (s, r)
                if single and len(best) >= q.n:
                    break
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[: q.n]
        ids = [i for i, _ in ranked]
        scores = [v[0] for _, v in ranked]
        interest = [v[1] for _, v in ranked]
        need = min(q.n, engine.n_items - len(exclude)) - len(ids)
        if need > 0:           # an ANN index returned fewer than asked: exact scores for the rest
            extra = engine.popular_ids(need, set(ids) | exclude)
            vecs = engine.vectors(extra)                                      # [e, D]
            per = vecs @ (enc.interests.T if q.mode == "per_interest"
                          else enc.user_vector[:, None])                      # [e, Q]
            ids += extra
            scores += per.max(axis=1).tolist()
            interest += per.argmax(axis=1).tolist()
        items = [{"item_id": engine.item_ids[i], "score": s} for i, s in zip(ids, scores)]
        if q.mode == "per_interest" and q.include_interests and ids:
            per_k = engine.vectors(ids) @ enc.interests.T                     # [n, K]
            for it, r, row in zip(items, interest, per_k.tolist()):
                it["interest"] = r
                it["interest_scores"] = row
        elif q.mode == "per_interest":
            for it, r in zip(items, interest):
                it["interest"] = r
        return items

    @staticmethod
    def popular(engine: Engine, n: int, exclude: set[int]) -> list[dict]:
        """Answer items from training popularity; the score is the click count."""
        return [{"item_id": engine.item_ids[i], "score": float(engine.popularity[i])}
                for i in engine.popular_ids(n, exclude)]

    @staticmethod
    def _answer(engine: Engine, q: Query, fallback: str | None, items: list[dict],
                weights: np.ndarray | None) -> dict:
        return {"user_id": q.user_id, "version": engine.version, "mode": q.mode,
                "fallback": fallback, "items": items,
                "interest_weights": weights.tolist() if weights is not None else None}
