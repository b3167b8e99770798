"""The request path, strung together: a micro-batch of queries through the stages of
`service.stages`, with the cold-start and unavailable-history fallbacks and every stage timed.

The requests that arrive in one turn of the event loop form a micro-batch (`Batcher`, at most
`batch_max_size`): one Redis round trip for all their histories, one encoder run, one faiss
search, and a filter over `[B, k]` arrays. Without batching every request is a batch of one
through the same code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from index_builder.bundle import AGGREGATE, PER_INTEREST, Merge

from .arms import Arms
from .batcher import Batcher
from .engine import Engine
from .errors import HistoryUnavailable, ServiceError
from .history import HistoryStore
from .merge import BEST_KEY, Top, log_weights, merge, top_n
from .metrics import Metrics
from .settings import Settings
from .stages import (
    COLD_START,
    DENSE_MIN_VECTORS,
    HISTORY_UNAVAILABLE,
    Answer,
    Computed,
    Hits,
    Query,
    Windows,
    dense_search,
    encode,
    history,
    render,
    search,
    top_up,
    window,
)

Job = tuple[Engine, Query]
NARROW_FACTOR = 2      # a batch's first search: 2 n wide, whatever the histories


@dataclass(slots=True)
class Personal:
    """The personalized queries of one engine in a micro-batch, their numbers worked out once:
    P queries, each searched `first` wide at first; `exact` is the width that answers a row
    exactly whatever its scores (n + the seen ids it drops)."""
    queries: list[Query]
    rows: np.ndarray                   # [P] places in the micro-batch
    want: np.ndarray                   # [P] n
    n_excl: np.ndarray                 # [P] seen ids dropped (0 where exclude_seen is false)
    exclude: np.ndarray                # [P, H] internal ids to drop, 0 = none
    merges: np.ndarray                 # [P] str: the merge of per_interest rows ('' else)
    exact: np.ndarray                  # [P] n + n_excl
    first: int                         # the first search's width

    @classmethod
    def of(cls, queries: list[Query], rows: np.ndarray, win: Windows) -> Personal:
        """`queries` at `rows` of the micro-batch (and of `win`). Without a quota merge the
        first search is NARROW_FACTOR x n wide where that is narrower than exact."""
        keep = np.fromiter((q.exclude_seen for q in queries), bool, len(queries))
        n_excl = np.where(keep, win.known[rows], 0)                   # [P]
        want = np.fromiter((q.n for q in queries), np.int64, len(queries))
        names = [q.merge or "" for q in queries]
        merges = np.array(names)
        exact = want + n_excl
        full = int(exact.max())
        # in Python: a string isin costs about 30 us a micro-batch, at 1 row or 32
        quota = any(m and m not in BEST_KEY for m in names)
        narrow = int(NARROW_FACTOR * want.max())
        return cls(queries, rows, want, n_excl, np.where(keep[:, None], win.seen[rows], 0),
                   merges, exact, full if quota or full <= narrow else narrow)

    @property
    def per_interest(self) -> np.ndarray:
        """[P] bool: searched with each interest."""
        per: np.ndarray = self.merges != ""
        return per

    def take(self, pos: np.ndarray) -> Personal:
        """The queries at `pos` [R], searched at their exact width."""
        return Personal([self.queries[j] for j in pos.tolist()], self.rows[pos], self.want[pos],
                        self.n_excl[pos], self.exclude[pos], self.merges[pos], self.exact[pos],
                        int(self.exact[pos].max()))


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
        out = self._answer_jobs(jobs, hists, unavailable)
        # the answers of one search share their stage times (one dict): observed once each,
        # `count` times; the wait for the batch is each request's own
        shared: dict[int, tuple[dict[str, float], int, str | None]] = {}
        for (eng, _), a, w in zip(jobs, out, waited):
            if isinstance(a, Answer):
                arm = eng.arm if self.per_arm else None
                t, count, _ = shared.get(id(a.timings), (a.timings, 0, arm))
                shared[id(t)] = (t, count + 1, arm)
                self.m.observe_stages({"queue": w}, 1, arm)
                a.timings = {"queue": w, "history": t_hist, **t}
        for t, count, arm in shared.values():
            self.m.observe_stages({"history": t_hist, **t}, count, arm)
        return out

    def _answer_jobs(self, jobs: list[Job], hists: list[list[str]],
                     unavailable: np.ndarray | None) -> list[Answer | BaseException]:
        """Stages 2-6 of a micro-batch, per engine (two only across a reload)."""
        groups: dict[int, list[int]] = {}
        for i, (eng, _) in enumerate(jobs):
            groups.setdefault(id(eng), []).append(i)
        if len(groups) == 1:
            return self.answer(jobs[0][0], [q for _, q in jobs], hists, unavailable)
        by_job: dict[int, Answer | BaseException] = {}
        for idx in groups.values():
            part = self.answer(jobs[idx[0]][0], [jobs[i][1] for i in idx],
                               [hists[i] for i in idx],
                               None if unavailable is None else unavailable[idx])
            by_job.update(zip(idx, part))
        return [by_job[i] for i in range(len(jobs))]

    def answer(self, engine: Engine, queries: list[Query], hists: list[list[str]],
               unavailable: np.ndarray | None) -> list[Answer | BaseException]:
        """Stages 2-6 for queries that share an engine; `unavailable` [Q] marks the queries
        whose history could not be read."""
        t0 = time.perf_counter()
        win = window(engine, hists)
        t_win = time.perf_counter() - t0
        if win.unknown:
            self.m.unknown_items.inc(win.unknown)
        out: dict[int, Answer | BaseException] = {}
        down = unavailable if unavailable is not None else np.zeros(len(queries), bool)
        personal = np.flatnonzero((win.known > 0) & ~down)
        if len(personal) < len(queries):
            out |= self._fallbacks(engine, queries, win, down, t_win)
        if len(personal):
            req = Personal.of([queries[j] for j in personal], personal, win)
            for row, a in self._personalized(engine, req, win, t_win):
                out[row] = a
        return [out[j] for j in range(len(queries))]

    def _fallbacks(self, engine: Engine, queries: list[Query], win: Windows, down: np.ndarray,
                   t_win: float) -> dict[int, Answer | BaseException]:
        """Popular items for the queries without a usable history (or, strict, a 503)."""
        t1 = time.perf_counter()
        out: dict[int, Answer | BaseException] = {}
        answered = []
        for j in np.flatnonzero(down | (win.known == 0)).tolist():
            reason = HISTORY_UNAVAILABLE if down[j] else COLD_START
            self.m.fallbacks.labels(reason).inc()
            if down[j] and self.strict:
                out[j] = HistoryUnavailable("The history store cannot read this user's "
                                            "history now.", {"Retry-After": "1"})
                continue
            ids = engine.popular[: queries[j].n]
            a = out[j] = Answer(render(engine, queries[j], ids, engine.popularity[ids], reason),
                                {}, ids, reason)
            answered.append(a)
        t_pop = time.perf_counter() - t1
        for a in answered:
            a.timings.update(window=t_win, popularity=t_pop)
        return out

    def _personalized(self, engine: Engine, req: Personal, win: Windows, t_win: float
                      ) -> list[tuple[int, Answer]]:
        """Stages 3-6 for the queries with a known history: a first search `req.first` wide,
        then the rows it could not prove exact searched again at their exact width."""
        e = encode(engine, win.window[req.rows])
        vectors = len(req.rows) + (e.interests.shape[1] - 1) * int(req.per_interest.sum())
        c = (search(engine, e, req.per_interest, req.first)
             if engine.table is None or vectors < DENSE_MIN_VECTORS else
             dense_search(engine, e, req.per_interest, req.exclude, int(req.want.max()),
                          req.merges))
        t0 = time.perf_counter()
        rendered = [0.0]                                              # stage 6's share of the loop
        answers, redo = self._filter_all(engine, req, c, rendered)
        searched = c.seconds
        if redo:
            pos = np.array(redo)                                      # rows of req, and of e
            sub = req.take(pos)
            wide = search(engine, e.take(pos), sub.per_interest, sub.first)
            searched += wide.seconds
            answers += self._filter_all(engine, sub, wide, rendered)[0]
        timings = {"window": t_win, "encode": e.seconds, "search": searched,
                   "filter": time.perf_counter() - t0 - rendered[0] - searched + c.seconds,
                   "answer": rendered[0]}
        for _, a in answers:
            a.timings = timings
        return answers

    def _filter_all(self, engine: Engine, req: Personal, c: Computed, rendered: list[float]
                    ) -> tuple[list[tuple[int, Answer]], list[int]]:
        """Stages 5-6 for every query of a search, one mode and merge at a time: the answers,
        and the queries a narrow search left unproven (`req` positions, to search again)."""
        answers: list[tuple[int, Answer]] = []
        redo: list[int] = []
        agg = c.hits[AGGREGATE]
        if len(agg.rows):
            answers += self._filter(engine, req, c, agg, None, rendered, redo)
        for per in (c.hits[PER_INTEREST], c.merged):
            if per is None:
                continue
            how = req.merges[per.rows]
            for name in np.unique(how).tolist():
                pos = np.flatnonzero(how == name)
                hits = Hits(per.rows[pos], per.scores[pos], per.ids[pos], per.filtered,
                            None if per.source is None else per.source[pos])
                answers += self._filter(engine, req, c, hits, name, rendered, redo)
        return answers, redo

    @staticmethod
    def _filter(engine: Engine, req: Personal, c: Computed, hits: Hits, how: Merge | None,
                rendered: list[float], redo: list[int]) -> list[tuple[int, Answer]]:
        """Stages 5-6 for the queries of one search (`how`: their merge, None: aggregate). A
        query that a search narrower than its exact width left unproven is not answered but
        put in `redo`."""
        members = hits.rows                                           # [m] positions in req
        # exclusions a dense search applied already; nothing it answers is narrow
        exclude = req.exclude[members][:, :0] if hits.filtered else req.exclude[members]
        if hits.source is not None:                                   # merged by the search
            ids = hits.ids[:, 0]                                      # [m, k] best first
            top = Top(ids, hits.scores[:, 0], hits.source[:, 0], (ids >= 0).sum(1))
        elif how is None:
            top = top_n(hits.scores, hits.ids, exclude, int(req.want[members].max()))
        else:
            top = merge(how, hits.scores, hits.ids, c.weights[members], exclude,
                        req.want[members])
        narrow = (req.first < req.exact[members]) & (not hits.filtered)   # [m]
        # a narrow search proves a merged row exact when its n-th key is at least every
        # interest's last searched key: whatever lies beyond keys no higher
        shift = np.zeros((len(members), 1), np.float32)
        bound = None
        if how is not None and narrow.any():
            if how == "weighted":
                shift = log_weights(c.weights[members])[:, :, 0]       # [m, K]
            last = np.where(hits.ids[:, :, -1] >= 0, hits.scores[:, :, -1], -np.inf)   # [m, K]
            bound = (last + shift).max(axis=1)                         # [m]
        answers = []
        for p, j in enumerate(members.tolist()):
            q = req.queries[j]
            have = min(int(top.count[p]), q.n)
            ids, scores, source = top.ids[p, :have], top.scores[p, :have], top.source[p, :have]
            need = min(q.n, engine.n_items - int(req.n_excl[j])) - have
            if narrow[p]:
                unproven = need > 0
                if bound is not None and not unproven and have:
                    nth = float(scores[-1]) + (float(shift[p, source[-1]])
                                               if how == "weighted" else 0.0)
                    unproven = nth < bound[p]
                if unproven:
                    redo.append(j)
                    continue
            if need > 0:           # an ANN index returned fewer than asked: top up exactly
                vecs = c.interests[j] if how else c.user_vector[j: j + 1]
                extra, s, r = top_up(engine, ids, req.exclude[j], need, vecs)
                ids, scores = np.concatenate([ids, extra]), np.concatenate([scores, s])
                source = np.concatenate([source, r])
            t_r = time.perf_counter()
            body = render(engine, q, ids, scores, None, source,
                          c.weights[j] if q.include_interests else None, c.interests[j])
            rendered[0] += time.perf_counter() - t_r
            answers.append((int(req.rows[j]), Answer(body, {}, ids)))
        return answers
