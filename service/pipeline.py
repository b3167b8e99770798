"""The request path as typed stages over whole batches: history -> window -> encode -> search ->
filter -> answer.

The requests that arrive in one turn of the event loop form a micro-batch (`Batcher`, at most
`batch_max_size`): one pipelined Redis round trip for all their histories, one encoder run, one
faiss search, and a filter that works on `[B, k]` arrays (the seen-id mask, -1, the top n). Each
answer's JSON is built straight from those arrays. Without batching every request is a batch
of one through the same code.

Every stage is a function of arrays, testable without HTTP: `Engine.windows`, `compute`,
`top_n`, `top_up` and `render`; `Recommender.run` strings them together.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Generic, Literal, TypeVar

import numpy as np
import orjson

from .engine import Engine, Windows
from .errors import HistoryUnavailable, ServiceError
from .history import HistoryError, HistoryStore
from .metrics import Metrics
from .settings import Settings

Mode = Literal["aggregate", "per_interest"]
COLD_START, HISTORY_UNAVAILABLE = "cold_start", "history_unavailable"
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Query:
    user_id: str
    n: int
    exclude_seen: bool = True
    mode: Mode = "aggregate"
    include_interests: bool = False


@dataclass(slots=True)
class Answer:
    body: bytes                                    # the JSON answer
    timings: dict[str, float]                      # stage -> seconds, for Server-Timing

    def server_timing(self) -> str:
        return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in self.timings.items())


# -- the batch policy --------------------------------------------------------------------------

@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    since: float


class Batcher(Generic[T, R]):
    """Runs `run(items, waited)` over the items submitted while the event loop turns.

    The first submission to an idle batcher schedules a drain for the next turn of the loop, so
    every request whose handler runs in this turn joins it; while a batch runs (its Redis read
    awaits), the next one gathers. At most `max_size` items a batch, first come first served;
    `max_wait_s` > 0 holds a batch smaller than `max_size` that long for company. `run` returns
    one result per item, or the exception for that item; an exception of `run` itself goes to
    every item of the batch. Items whose caller has gone (cancelled) are skipped.

    Under load (a queue left when a batch ends), the next batch first waits `gather_turns` turns
    of the loop, during which the previous answers are written and the requests that arrived
    meanwhile are parsed and join it.

    Items submitted as `bulk` (the users of a large `/recommend/batch` call) wait in a queue of
    their own and fill what room a batch has after the others, at most `max_bulk` of them: a
    single request waits for at most the batch running when it came, never behind a bulk
    caller's whole list, and that batch holds at most `max_bulk` users of bulk work.
    """

    def __init__(self, run: Callable[[list[T], list[float]], Awaitable[list[R | BaseException]]],
                 max_size: int, max_wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, gather_turns: int = 4,
                 max_bulk: int | None = None):
        self.run, self.max_size, self.max_wait = run, max_size, max_wait_s
        self.max_bulk = max_size if max_bulk is None else max_bulk
        self.gather_turns = gather_turns
        self.on_batch = on_batch or (lambda size: None)
        self.queue: deque[_Waiting[T, R]] = deque()
        self.bulk: deque[_Waiting[T, R]] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.queue) + len(self.bulk)

    async def submit(self, items: list[T], bulk: bool = False) -> list[R]:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = [loop.create_future() for _ in items]
        (self.bulk if bulk else self.queue).extend(
            _Waiting(x, f, now) for x, f in zip(items, futures))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        try:
            first = True
            while len(self):
                if self.max_wait and len(self) < self.max_size:
                    await asyncio.sleep(self.max_wait)
                elif not first and len(self) < self.max_size:
                    # under load: let the requests that came in while the last batch computed
                    # reach submit() (a request takes turns of the loop from its socket to here)
                    # and join; at 32 connections this took batches from 4 to 30 requests and
                    # throughput up by half (benchmarks/results/service.md). An idle batcher
                    # starts at once.
                    for _ in range(self.gather_turns):
                        await asyncio.sleep(0)
                first = False
                take = min(len(self.queue), self.max_size)
                rest = min(len(self.bulk), self.max_size - take, self.max_bulk)
                batch = [w for w in chain((self.queue.popleft() for _ in range(take)),
                                          (self.bulk.popleft() for _ in range(rest)))
                         if not w.future.done()]
                if not batch:
                    continue
                start = time.perf_counter()
                self.on_batch(len(batch))
                try:
                    results = await self.run([w.item for w in batch],
                                             [start - w.since for w in batch])
                except Exception as e:
                    results = [e] * len(batch)
                for w, r in zip(batch, results):
                    if w.future.done():
                        continue
                    if isinstance(r, BaseException):
                        w.future.set_exception(r)
                    else:
                        w.future.set_result(r)
        finally:
            self._task = None


# -- stages 3-4: encode and search -------------------------------------------------------------

@dataclass(slots=True)
class Computed:
    interests: np.ndarray              # [P, K, D]
    user_vector: np.ndarray            # [P, D]
    weights: np.ndarray                # [P, K]
    aggregate: np.ndarray              # [A] rows searched with their user vector
    per_interest: np.ndarray           # [I] rows searched with each of their K interests
    scores: tuple[np.ndarray, np.ndarray]   # [A, 1, k], [I, K, k], best first
    ids: tuple[np.ndarray, np.ndarray]      # the same shapes: internal ids, -1 where short
    timings: dict[str, float] = field(default_factory=dict)


def compute(engine: Engine, windows: np.ndarray, per_interest: np.ndarray, k: int) -> Computed:
    """One encoder run over `windows` [P, n] and one faiss search for the top `k` of every query
    vector: the user vector of each row, or each of its K interests where `per_interest` [P]."""
    t0 = time.perf_counter()
    interests, uv, weights = engine.encode(windows)                   # [P, K, D], [P, D], [P, K]
    t1 = time.perf_counter()
    P, K, D = interests.shape
    agg, per = np.flatnonzero(~per_interest), np.flatnonzero(per_interest)
    queries = uv if not len(per) else np.concatenate([uv[agg], interests[per].reshape(-1, D)])
    scores, ids = engine.search(queries, k)                           # [A + I K, k]
    t2 = time.perf_counter()
    A, k = len(agg), scores.shape[1]
    return Computed(interests, uv, weights, agg, per,
                    (scores[:A, None], scores[A:].reshape(len(per), K, k)),
                    (ids[:A, None], ids[A:].reshape(len(per), K, k)),
                    {"encode": t1 - t0, "search": t2 - t1})


# -- stage 5: filter ---------------------------------------------------------------------------

@dataclass(slots=True)
class Top:
    ids: np.ndarray                    # [P, n] internal ids, best first; valid where < count
    scores: np.ndarray                 # [P, n] float32
    source: np.ndarray                 # [P, n] which query vector (interest) found each one
    count: np.ndarray                  # [P] valid entries per row


def top_n(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, n: int) -> Top:
    """Per row: drop -1 and the ids in `exclude`, merge the Q lists by best score (an id found by
    several query vectors keeps its best), and keep the first n.

    scores, ids [P, Q, k] as faiss returns them (each list sorted, best first); exclude [P, H]
    internal ids (0 = none). All rows at once, in numpy."""
    P, Q, k = ids.shape
    flat_ids = ids.reshape(P, Q * k)                                  # [P, C]
    flat_scores = scores.reshape(P, Q * k)
    bad = flat_ids < 0
    if exclude.size and Q * k * exclude.shape[1] <= 65_536:          # a short history: compare all
        bad |= (flat_ids[:, :, None] == exclude[:, None, :]).any(-1)  # [P, C, H] -> [P, C]
    elif exclude.size:
        stride = int(max(flat_ids.max(initial=0), exclude.max(initial=0))) + 2
        off = np.arange(P, dtype=np.int64)[:, None] * stride          # rows never collide
        bad |= np.isin(flat_ids + off, exclude + off)
    if Q == 1:                                                        # already best first
        pick = np.argsort(bad, axis=1, kind="stable")[:, :n]          # [P, n] good ones, in order
        return Top(np.take_along_axis(flat_ids, pick, 1), np.take_along_axis(flat_scores, pick, 1),
                   np.zeros_like(pick), np.minimum(k - bad.sum(1), n))
    order = np.argsort(np.where(bad, -np.inf, -flat_scores), axis=1, kind="stable")
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


def top_up(engine: Engine, row_ids: np.ndarray, exclude: np.ndarray, need: int,
           queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ANN index returned fewer than asked: the `need` most popular items not yet answered or
    excluded, with their exact scores under `queries` [Q, D] (best query vector)."""
    extra = engine.popular_ids(need, np.concatenate([row_ids, exclude.ravel()]))
    per = engine.vectors(extra) @ queries.T                           # [e, Q]
    return extra, per.max(axis=1).astype(np.float32), per.argmax(axis=1)


# -- stage 6: the answer -----------------------------------------------------------------------

def render(engine: Engine, q: Query, ids: np.ndarray, scores: np.ndarray,
           fallback: str | None = None, source: np.ndarray | None = None,
           weights: np.ndarray | None = None, interests: np.ndarray | None = None) -> bytes:
    """The JSON answer of one query from its arrays: ids [n], scores [n] float32, source [n]
    (the interest of each item, per_interest only), weights [K], interests [K, D].

    Items are joined in C (the prefixes are precomputed per item, the scores serialized by
    orjson as one array); only `per_interest` answers format a field per item."""
    if len(ids):
        score = orjson.dumps(scores.astype(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
        parts = [engine.item_json[ids].tolist(), score[1:-1].split(b",")]
        if q.mode == "per_interest" and source is not None:
            parts.append([b',"interest":%d' % r for r in source.tolist()])
            if q.include_interests and interests is not None:
                per_k = engine.vectors(ids) @ interests.T             # [n, K]
                rows = orjson.dumps(per_k.astype(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
                parts.append([b',"interest_scores":[' + r + b"]"
                              for r in rows[2:-2].split(b"],[")])
        width = len(parts) + 1                                        # the fields, then "},"
        pieces = [b"},"] * (width * len(ids))
        for j, part in enumerate(parts):
            pieces[j::width] = part
        items = b"".join(pieces)[:-1]
    else:
        items = b""
    head = b'{"user_id":%b,"version":%b,"mode":"%b","fallback":%b,"score_kind":"%b","items":[' % (
        orjson.dumps(q.user_id), orjson.dumps(engine.version), q.mode.encode(),
        b'"%b"' % fallback.encode() if fallback else b"null",
        b"popularity" if fallback else b"inner_product")
    w: bytes = (orjson.dumps(weights.astype(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
                if q.include_interests and weights is not None else b"null")
    return head + items + b'],"interest_weights":' + w + b"}"



# -- the whole path ----------------------------------------------------------------------------

class Recommender:
    def __init__(self, settings: Settings, metrics: Metrics, store: HistoryStore | None):
        self.s, self.m, self.store = settings, metrics, store
        self.batcher: Batcher[tuple[Engine, Query], Answer] | None = (
            Batcher(self.run, settings.batch_max_size, settings.batch_max_wait_ms / 1000,
                    metrics.batch_size.observe, max_bulk=settings.batch_max_bulk)
            if settings.batching else None)

    async def recommend(self, engine: Engine, queries: list[Query],
                        bulk: bool = False) -> list[Answer]:
        """Answers in the order asked; a ServiceError (strict history mode) is raised. `bulk`
        queries (a batch call's) yield to the others in a micro-batch."""
        jobs = [(engine, q) for q in queries]
        if self.batcher is not None:
            return await self.batcher.submit(jobs, bulk)
        answers = []
        for a in await self.run(jobs, [0.0] * len(jobs)):
            if isinstance(a, BaseException):
                raise a
            answers.append(a)
        return answers

    # stage 1: history
    async def histories(self, user_ids: list[str]) -> tuple[list[list[str]], np.ndarray | None]:
        """Histories newest first ([] = none), and which of them are unavailable ([U] bool;
        None: all read). On a cluster a down master costs only its own users' histories."""
        if self.store is None:
            return [[] for _ in user_ids], None
        try:
            got = await self.store.get_many(user_ids)
        except HistoryError as e:
            if self.s.on_history_unavailable == "error":
                raise HistoryUnavailable(f"The history store is unavailable ({e}).",
                                         {"Retry-After": "1"}) from e
            return [[] for _ in user_ids], np.ones(len(user_ids), bool)
        down = [h is None for h in got]
        if not any(down):
            return got, None  # type: ignore[return-value]
        return [h or [] for h in got], np.array(down)

    async def run(self, jobs: list[tuple[Engine, Query]],
                  waited: list[float]) -> list[Answer | BaseException]:
        """One micro-batch: one Redis round trip, then per engine (two only across a reload) one
        window, encoder run, search and filter over all its personalized queries."""
        t0 = time.perf_counter()
        try:
            hists, unavailable = await self.histories([q.user_id for _, q in jobs])
        except ServiceError as e:
            return [e] * len(jobs)
        t_hist = time.perf_counter() - t0
        out: list[Answer | BaseException]
        if all(eng is jobs[0][0] for eng, _ in jobs):
            out = self.answer(jobs[0][0], [q for _, q in jobs], hists, unavailable)
        else:
            out = [None] * len(jobs)  # type: ignore[list-item]
            groups: dict[int, list[int]] = {}
            for i, (eng, _) in enumerate(jobs):
                groups.setdefault(id(eng), []).append(i)
            for idx in groups.values():
                part = self.answer(jobs[idx[0]][0], [jobs[i][1] for i in idx],
                                   [hists[i] for i in idx],
                                   None if unavailable is None else unavailable[idx])
                for i, a in zip(idx, part):
                    out[i] = a
        stage = self.m.stage_child
        for a, w in zip(out, waited):
            if not isinstance(a, Answer):
                continue
            a.timings = {"queue": w, "history": t_hist, **a.timings}
            for name, dt in a.timings.items():
                stage(name).observe(dt)
        return out

    def answer(self, engine: Engine, queries: list[Query], hists: list[list[str]],
               unavailable: np.ndarray | None) -> list[Answer | BaseException]:
        """Stages 2-6 for queries that share an engine; `unavailable` [Q] marks the queries
        whose history could not be read."""
        t0 = time.perf_counter()
        win = engine.windows(hists)
        t_win = time.perf_counter() - t0
        if win.unknown:
            self.m.unknown_items.inc(win.unknown)
        out: list[Answer | BaseException] = [None] * len(queries)  # type: ignore[list-item]
        down = unavailable if unavailable is not None else np.zeros(len(queries), bool)
        personal = np.flatnonzero((win.known > 0) & ~down)
        if len(personal) < len(queries):
            t1 = time.perf_counter()
            cold = [j for j in range(len(queries)) if down[j] or win.known[j] == 0]
            for j in cold:
                reason = HISTORY_UNAVAILABLE if down[j] else COLD_START
                self.m.fallbacks.labels(reason).inc()
                if down[j] and self.s.on_history_unavailable == "error":
                    out[j] = HistoryUnavailable("The history store cannot read this user's "
                                                "history now.", {"Retry-After": "1"})
                    continue
                ids = engine.popular[: queries[j].n]
                out[j] = Answer(render(engine, queries[j], ids, engine.popularity[ids], reason),
                                {})
            t_pop = t_win + time.perf_counter() - t1
            for j in cold:
                if isinstance(out[j], Answer):
                    out[j].timings["popularity"] = t_pop  # type: ignore[union-attr]
        if len(personal):
            self._personalized(engine, [queries[j] for j in personal], win, personal, t_win, out)
        return out

    def _personalized(self, engine: Engine, qs: list[Query], win: Windows, rows: np.ndarray,
                      t_win: float, out: list[Answer | BaseException]) -> None:
        excl = np.array([q.exclude_seen for q in qs])
        exclude = np.where(excl[:, None], win.seen[rows], 0)          # [P, H]
        n_excl = np.where(excl, win.known[rows], 0)                   # [P]
        want = np.array([q.n for q in qs])
        per_interest = np.array([q.mode == "per_interest" for q in qs])
        c = compute(engine, win.window[rows], per_interest, int((want + n_excl).max()))
        t0 = time.perf_counter()
        answers: list[tuple[int, Answer]] = []
        for part, members in enumerate((c.aggregate, c.per_interest)):
            if not len(members):
                continue
            top = top_n(c.scores[part], c.ids[part], exclude[members], int(want[members].max()))
            for p, j in enumerate(members):
                q = qs[j]
                have = min(int(top.count[p]), q.n)
                ids, scores, source = top.ids[p, :have], top.scores[p, :have], top.source[p, :have]
                need = min(q.n, engine.n_items - int(n_excl[j])) - have
                if need > 0:       # an ANN index returned fewer than asked: top up exactly
                    vecs = c.interests[j] if part else c.user_vector[j: j + 1]
                    extra, s, r = top_up(engine, ids, exclude[j], need, vecs)
                    ids, scores = np.concatenate([ids, extra]), np.concatenate([scores, s])
                    source = np.concatenate([source, r])
                body = render(engine, q, ids, scores, None, source,
                              c.weights[j] if q.include_interests else None, c.interests[j])
                answers.append((int(rows[j]), Answer(body, {})))
        timings = {"encode": t_win + c.timings["encode"], "search": c.timings["search"],
                   "filter": time.perf_counter() - t0}
        for i, a in answers:
            a.timings = timings
            out[i] = a
