"""The request path, strung together: a micro-batch of queries through the stages of
`service.stages`, with the cold-start and unavailable-history fallbacks and every stage timed.

The requests that arrive in one turn of the event loop form a micro-batch (`Batcher`, at most
`batch_max_size`): one Redis round trip for all their histories, one encoder run, one faiss
search, and a filter over `[B, k]` arrays. Without batching every request is a batch of one
through the same code.
"""
from __future__ import annotations

import time

import numpy as np

from .arms import Arms
from .batcher import Batcher
from .engine import Engine
from .errors import HistoryUnavailable, ServiceError
from .history import HistoryStore
from .merge import log_weights, merge, top_n
from .metrics import Metrics
from .settings import Settings
from .stages import (
    COLD_START,
    HISTORY_UNAVAILABLE,
    Answer,
    Computed,
    Encoded,
    Query,
    Windows,
    encode,
    history,
    render,
    search,
    top_up,
    window,
)

Job = tuple[Engine, Query]
NARROW_FACTOR = 2      # a batch's first search: 2 n wide, whatever the histories
NARROWABLE = ("max", "weighted")     # the merges a narrow search can prove exact (not quota)


class Recommender:
    """The request path: micro-batches of queries through the stages, with the fallbacks."""
    def __init__(self, settings: Settings, metrics: Metrics, store: HistoryStore | None,
                 arms: Arms | None = None):
        self.s, self.m, self.store, self.arms = settings, metrics, store, arms
        self.strict = settings.on_history_unavailable == "error"
        self.batcher: Batcher[Job, Answer] | None = (
            Batcher(self.run, settings.batch_max_size, settings.batch_max_wait_ms / 1000,
                    metrics.batch_size.observe, max_bulk=settings.batch_max_bulk)
            if settings.batching else None)

    @property
    def per_arm(self) -> bool:
        """Arms or a shadow are set: answers and stage times are counted by arm too."""
        return self.arms is not None and self.arms.layout.active_any

    async def recommend(self, engine: Engine | list[Engine], queries: list[Query],
                        bulk: bool = False) -> list[Answer]:
        """Answers in the order asked, each query by its engine (one for all, or one each: the
        user's arm); a ServiceError (strict history mode) is raised. `bulk` queries (a large
        batch call's) yield to the others in a micro-batch."""
        engines = engine if isinstance(engine, list) else [engine] * len(queries)
        jobs = list(zip(engines, queries, strict=True))
        if self.batcher is not None:
            return await self.batcher.submit(jobs, bulk)
        answers = []
        for a in await self.run(jobs, [0.0] * len(jobs)):
            if isinstance(a, BaseException):
                raise a
            answers.append(a)
        return answers

    async def run(self, jobs: list[Job], waited: list[float]) -> list[Answer | BaseException]:
        """One micro-batch: one Redis round trip, then per engine (two only across a reload) one
        window, encoder run, search and filter over all its personalized queries."""
        t0 = time.perf_counter()
        try:
            hists, unavailable = await history(self.store, [q.user_id for _, q in jobs],
                                               self.strict)
        except ServiceError as e:
            return [e] * len(jobs)
        t_hist = time.perf_counter() - t0
        out: list[Answer | BaseException | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, (eng, _) in enumerate(jobs):
            groups.setdefault(id(eng), []).append(i)
        for idx in groups.values():
            part = self.answer(jobs[idx[0]][0], [jobs[i][1] for i in idx],
                               [hists[i] for i in idx],
                               None if unavailable is None else unavailable[idx])
            for i, answered in zip(idx, part):
                out[i] = answered
        stage = self.m.stage_child
        for (eng, _), a, w in zip(jobs, out, waited):
            if isinstance(a, Answer):
                a.timings = {"queue": w, "history": t_hist, **a.timings}
                for name, dt in a.timings.items():
                    stage(name).observe(dt)
                if self.per_arm:
                    for name, dt in a.timings.items():
                        self.m.arm_stage_child(eng.arm, name).observe(dt)
        return out  # type: ignore[return-value]   # every slot is filled

    def answer(self, engine: Engine, queries: list[Query], hists: list[list[str]],
               unavailable: np.ndarray | None) -> list[Answer | BaseException]:
        """Stages 2-6 for queries that share an engine; `unavailable` [Q] marks the queries
        whose history could not be read."""
        t0 = time.perf_counter()
        win = window(engine, hists)
        t_win = time.perf_counter() - t0
        if win.unknown:
            self.m.unknown_items.inc(win.unknown)
        out: list[Answer | BaseException | None] = [None] * len(queries)
        down = unavailable if unavailable is not None else np.zeros(len(queries), bool)
        personal = np.flatnonzero((win.known > 0) & ~down)
        if len(personal) < len(queries):
            self._fallbacks(engine, queries, win, down, t_win, out)
        if len(personal):
            self._personalized(engine, [queries[j] for j in personal], win, personal, t_win, out)
        return out  # type: ignore[return-value]   # every slot is filled

    def _fallbacks(self, engine: Engine, queries: list[Query], win: Windows, down: np.ndarray,
                   t_win: float, out: list[Answer | BaseException | None]) -> None:
        """Popular items for the queries without a usable history (or, strict, a 503)."""
        t1 = time.perf_counter()
        cold = [j for j in range(len(queries)) if down[j] or win.known[j] == 0]
        answered = []
        for j in cold:
            reason = HISTORY_UNAVAILABLE if down[j] else COLD_START
            self.m.fallbacks.labels(reason).inc()
            if down[j] and self.strict:
                out[j] = HistoryUnavailable("The history store cannot read this user's "
                                            "history now.", {"Retry-After": "1"})
                continue
            ids = engine.popular[: queries[j].n]
            a = Answer(render(engine, queries[j], ids, engine.popularity[ids], reason), {}, ids,
                       reason)
            out[j] = a
            answered.append(a)
        t_pop = time.perf_counter() - t1
        for a in answered:
            a.timings.update(window=t_win, popularity=t_pop)

    def _personalized(self, engine: Engine, qs: list[Query], win: Windows, rows: np.ndarray,
                      t_win: float, out: list[Answer | BaseException | None]) -> None:
        excl = np.array([q.exclude_seen for q in qs])
        exclude = np.where(excl[:, None], win.seen[rows], 0)          # [P, H]
        n_excl = np.where(excl, win.known[rows], 0)                   # [P]
        want = np.array([q.n for q in qs])
        per_interest = np.array([q.mode == "per_interest" for q in qs])
        e = encode(engine, win.window[rows])
        # every row's exact width is n + its excluded count; a batch without quota merges
        # searches NARROW_FACTOR x n first and widens only the rows whose answer that cannot
        # prove exact (`redo`, see `_filter`)
        full = int((want + n_excl).max())
        narrow = int(NARROW_FACTOR * want.max())
        quota = any(q.mode == "per_interest" and q.merge not in NARROWABLE for q in qs)
        k1 = full if quota or full <= narrow else narrow
        c = search(engine, e, per_interest, k1)
        t0 = time.perf_counter()
        rendered = [0.0]                                              # stage 6's share of the loop
        redo: list[int] = []
        answers = self._filter_all(engine, qs, c, exclude, n_excl, want, rows, rendered,
                                   redo if k1 < full else None, k1)
        searched = c.timings["search"]
        if redo:
            sub = np.array(redo)
            wide = search(engine, Encoded(e.interests[sub], e.user_vector[sub], e.weights[sub], 0.0),
                          per_interest[sub], full)
            searched += wide.timings["search"]
            answers += self._filter_all(engine, [qs[j] for j in redo], wide, exclude[sub],
                                        n_excl[sub], want[sub], rows[sub], rendered, None, full)
        timings = {"window": t_win, "encode": e.seconds, "search": searched,
                   "filter": time.perf_counter() - t0 - rendered[0] - searched + c.timings["search"],
                   "answer": rendered[0]}
        for i, a in answers:
            a.timings = timings
            out[i] = a

    def _filter_all(self, engine: Engine, qs: list[Query], c: Computed, exclude: np.ndarray,
                    n_excl: np.ndarray, want: np.ndarray, rows: np.ndarray,
                    rendered: list[float], redo: list[int] | None, searched: int
                    ) -> list[tuple[int, Answer]]:
        """Stages 5-6 for every query of a search: the aggregate ones, then each merge's."""
        answers: list[tuple[int, Answer]] = []
        if len(c.aggregate):
            answers += self._filter(engine, qs, c, 0, np.arange(len(c.aggregate)), exclude,
                                    n_excl, want, rows, rendered=rendered, redo=redo,
                                    searched=searched)
        how = np.array([qs[j].merge for j in c.per_interest])
        for name in np.unique(how):                                   # one merge at a time
            answers += self._filter(engine, qs, c, 1, np.flatnonzero(how == name), exclude,
                                    n_excl, want, rows, str(name), rendered, redo, searched)
        return answers

    @staticmethod
    def _filter(engine: Engine, qs: list[Query], c: Computed, part: int, pos: np.ndarray,
                exclude: np.ndarray, n_excl: np.ndarray, want: np.ndarray,
                rows: np.ndarray, how: str = "max", rendered: list[float] | None = None,
                redo: list[int] | None = None, searched: int = 0) -> list[tuple[int, Answer]]:
        """Stages 5-6 for the queries of one search mode (`part` 0: aggregate, 1: per interest,
        merged `how`) at positions `pos` of that mode's search results. With `redo`, a query
        left short by a search `searched` wide, narrower than its exact width, is not answered
        but put there, to be searched again at its exact width."""
        members = (c.aggregate, c.per_interest)[part][pos]
        n = int(want[members].max())
        top = (top_n(c.scores[0][pos], c.ids[0][pos], exclude[members], n) if part == 0 else
               merge(how, c.scores[1][pos], c.ids[1][pos], c.weights[members], exclude[members],
                     want[members]))
        # a narrow search proves a merged row exact when its n-th key is at least every
        # interest's last searched key: whatever lies beyond keys no higher (None: not merged)
        bound, shift = None, np.zeros((len(members), 1), np.float32)
        if part == 1 and redo is not None:
            if how == "weighted":
                shift = log_weights(c.weights[members])[:, :, 0]       # [P, K]
            last = np.where(c.ids[1][pos][:, :, -1] >= 0, c.scores[1][pos][:, :, -1], -np.inf)
            bound = (last + shift).max(axis=1)                         # [P]
        answers = []
        for p, j in enumerate(members):
            q = qs[j]
            have = min(int(top.count[p]), q.n)
            ids, scores, source = top.ids[p, :have], top.scores[p, :have], top.source[p, :have]
            need = min(q.n, engine.n_items - int(n_excl[j])) - have
            if redo is not None and searched < q.n + int(n_excl[j]):
                unproven = need > 0
                if bound is not None and not unproven and have:
                    nth = float(scores[-1]) + (float(shift[p, source[-1]])
                                               if how == "weighted" else 0.0)
                    unproven = nth < bound[p]
                if unproven:
                    redo.append(int(j))
                    continue
            if need > 0:           # an ANN index returned fewer than asked: top up exactly
                vecs = c.interests[j] if part else c.user_vector[j: j + 1]
                extra, s, r = top_up(engine, ids, exclude[j], need, vecs)
                ids, scores = np.concatenate([ids, extra]), np.concatenate([scores, s])
                source = np.concatenate([source, r])
            t_r = time.perf_counter()
            body = render(engine, q, ids, scores, None, source,
                          c.weights[j] if q.include_interests else None, c.interests[j])
            if rendered is not None:
                rendered[0] += time.perf_counter() - t_r
            answers.append((int(rows[j]), Answer(body, {}, ids)))
        return answers
