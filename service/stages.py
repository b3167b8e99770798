"""The request path's stages, each in one place, over whole micro-batches:

    1 history -> 2 window -> 3 encode -> 4 search -> 5 filter -> 6 answer

Each is a function of arrays (stage 1 of the history store), testable without HTTP; each
stage's time goes to `sine_stage_duration_seconds{stage}` and the `Server-Timing` header under
the stage's name (`STAGES`, with `queue` before them: the wait for a micro-batch; an answer
from popularity has `popularity` in place of stages 3-6). `service.recommender` strings them
together; the engine (`service.engine`) only holds what a bundle loaded. The offline gate and
benchmarks call the same functions.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from itertools import chain, repeat
from typing import TYPE_CHECKING, Literal

import faiss
import numpy as np
import orjson

from index_builder.bundle import AGGREGATE, PER_INTEREST, Merge, Mode, Search

from .errors import HistoryUnavailable
from .history import HistoryError, HistoryStore
from .merge import BEST_KEY, key_shift

if TYPE_CHECKING:
    from .engine import Engine

STAGES = ("history", "window", "encode", "search", "filter", "answer")   # the names timed
COLD_START, HISTORY_UNAVAILABLE = "cold_start", "history_unavailable"
DEFAULT_MERGE: Merge = "max"           # per_interest where neither request nor bundle names one
# columns per block of the dense top k (`_dense_top`): 4 halved its time at 3,417 items, k = 100,
# against 8 and 16 (benchmarks/results/dense-top.md)
TOP_BLOCK = 4
TOP_BLOCK_ROWS = 4     # fewer rows: one pass (at 1 and 2 rows it was 1.3x and 1.06x faster)
# a batch of fewer query vectors searches the exact index with faiss even where a dense table
# exists: one vector scans in about 45 us, the dense product and selection take about 90
# (benchmarks/results/service-dense-b1.md)
DENSE_MIN_VECTORS = 2


@dataclass(frozen=True, slots=True)
class Query:
    """One user's question: who, how many, and how to search (resolved: `resolve_search`)."""
    user_id: str
    n: int
    exclude_seen: bool = True
    mode: Mode = AGGREGATE
    include_interests: bool = False
    merge: Merge | None = None         # per_interest: how the K lists become one; else None

    def __post_init__(self) -> None:
        # resolved: per_interest always names its merge, aggregate never
        if (self.merge is None) == (self.mode == PER_INTEREST):
            object.__setattr__(self, "merge", DEFAULT_MERGE if self.merge is None else None)


def resolve_search(mode: Mode | None, merge: Merge | None, served: Search,
                   default_mode: Literal["bundle", Mode] = "bundle",
                   default_merge: Literal["bundle", Merge] = "bundle") -> Search:
    """The one place a query's search is decided: what it names; a merge alone means
    per_interest; else the settings' defaults, where they say `bundle` the bundle's own
    (`served`, manifest `serving`; `max` where it names no merge)."""
    mode = mode or (PER_INTEREST if merge else
                    served.mode if default_mode == "bundle" else default_mode)
    if mode == AGGREGATE:
        return Search(AGGREGATE)
    return Search(PER_INTEREST, merge or ((served.merge or DEFAULT_MERGE)
                                          if default_merge == "bundle" else default_merge))


@dataclass(slots=True)
class Answer:
    """One query's JSON answer and its stage times."""
    body: bytes                                    # the JSON answer
    timings: dict[str, float]                      # stage -> seconds, for Server-Timing
    ids: np.ndarray | None = None                  # [n] the internal ids answered (the shadow's)
    fallback: str | None = None                    # why popular items were answered, or None

    def server_timing(self) -> str:
        return server_timing(self.timings)


def server_timing(timings: dict[str, float]) -> str:
    """The `Server-Timing` header of stage -> seconds: `history;dur=0.412, encode;dur=...`."""
    return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items())


# -- stage 1: history --------------------------------------------------------------------------

async def history(store: HistoryStore | None, user_ids: list[str], strict: bool
                  ) -> tuple[list[list[str]], np.ndarray | None]:
    """Histories newest first ([] = none), and which of them are unavailable ([U] bool; None:
    all read). On a cluster a down master costs only its own users' histories. `strict`
    (`on_history_unavailable=error`): a store that cannot answer at all is a 503."""
    if store is None:
        return [[] for _ in user_ids], None
    try:
        got = await store.get_many(user_ids)
    except HistoryError as e:
        if strict:
            raise HistoryUnavailable(f"The history store is unavailable ({e}).",
                                     {"Retry-After": "1"}) from e
        return [[] for _ in user_ids], np.ones(len(user_ids), bool)
    down = [h is None for h in got]
    if not any(down):
        return got, None  # type: ignore[return-value]
    return [h or [] for h in got], np.array(down)


# -- stage 2: window ---------------------------------------------------------------------------

@dataclass(slots=True)
class Windows:
    """A batch of histories in the encoder's layout, and what else the request path needs."""
    window: np.ndarray                 # [B, n] int64, most recent first, 0 = padding
    seen: np.ndarray                   # [B, H] int64 known history ids, newest first, 0-padded
    known: np.ndarray                  # [B] int64 count of known ids per row
    unknown: int                       # history entries outside the vocabulary (dropped)


def window(engine: Engine, histories: list[list[str]]) -> Windows:
    """Histories (newest first, external ids) -> the encoder's windows and the seen ids.

    Unknown ids are dropped; the rest keep their order, so slot 0 is the newest known click."""
    B = len(histories)
    lens = np.fromiter(map(len, histories), dtype=np.int64, count=B)
    flat = np.fromiter(map(engine.item_index.get, chain.from_iterable(histories), repeat(0)),
                       dtype=np.int64, count=int(lens.sum()))            # [sum lens], 0 = unknown
    rows = np.repeat(np.arange(B), lens)[flat > 0]                       # [known]
    ids = flat[flat > 0]
    known = np.bincount(rows, minlength=B)                               # [B]
    pos = np.arange(len(ids)) - (np.cumsum(known) - known)[rows]         # place within its row
    seen = np.zeros((B, max(engine.n, int(known.max(initial=0)))), dtype=np.int64)
    seen[rows, pos] = ids                                                # [B, H]
    return Windows(np.ascontiguousarray(seen[:, : engine.n]), seen, known,
                   int(lens.sum()) - len(ids))


# -- stage 3: encode ---------------------------------------------------------------------------

@dataclass(slots=True)
class Encoded:
    """The encoder's outputs for a batch of windows."""
    interests: np.ndarray              # [P, K, D]
    user_vector: np.ndarray            # [P, D]
    weights: np.ndarray                # [P, K]
    seconds: float

    def take(self, rows: np.ndarray) -> Encoded:
        """The outputs of `rows` [R] alone (no time of their own)."""
        return Encoded(self.interests[rows], self.user_vector[rows], self.weights[rows], 0.0)


def encode(engine: Engine, windows: np.ndarray) -> Encoded:
    """One ONNX Runtime run: [P, n] int64 -> interests, the user vector, the Eq. 7 weights."""
    t0 = time.perf_counter()
    interests, user_vector, weights = engine.session.run(
        ["interests", "user_vector", "weights"], {"item_ids": windows})   # [P, K, D], [P, D], [P, K]
    return Encoded(interests, user_vector, weights, time.perf_counter() - t0)


# -- stage 4: search ---------------------------------------------------------------------------

@dataclass(slots=True)
class Hits:
    """One mode's search results: the rows of the batch searched so, each with Q lists."""
    rows: np.ndarray                   # [m] rows of the batch
    scores: np.ndarray                 # [m, Q, k] float32, best first (Q: 1 aggregate, K per interest)
    ids: np.ndarray                    # [m, Q, k] internal ids, -1 where short
    filtered: bool = False             # the rows' exclusions already applied: exact at width n
    source: np.ndarray | None = None   # [m, 1, k] the interest that found each id, where the
    #                                    search merged the K lists itself (Q = 1)

    @property
    def width(self) -> int:
        """k, as searched."""
        return int(self.ids.shape[-1])


@dataclass(slots=True)
class Computed:
    """Stages 3-4 for a batch: the encoder's outputs and each mode's search results."""
    encoded: Encoded                   # [P] rows
    hits: dict[Mode, Hits]             # every mode, [0] rows where none searched so
    seconds: float                     # the search's time
    merged: Hits | None = None         # per_interest rows the search merged (`dense_search`)

    @property
    def interests(self) -> np.ndarray:
        return self.encoded.interests  # [P, K, D]

    @property
    def user_vector(self) -> np.ndarray:
        return self.encoded.user_vector    # [P, D]

    @property
    def weights(self) -> np.ndarray:
        return self.encoded.weights    # [P, K]


def knn(engine: Engine, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[Q, D] float32 -> scores [Q, k], internal ids [Q, k] (-1 where fewer were found)."""
    # omp_set_num_threads is per calling thread: set it in whichever thread searches; the BLAS
    # threshold is process-wide and counts floats (n x D), so it is set for this engine's D
    faiss.omp_set_num_threads(engine.faiss_threads)
    if engine.blas_vectors is not None:
        faiss.cvar.distance_compute_blas_threshold = engine.blas_vectors * engine.D
    k = max(1, min(k, engine.n_items))
    scores, ids = engine.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids


def search(engine: Engine, e: Encoded, per_interest: np.ndarray, k: int) -> Computed:
    """One faiss search for the top `k` of every query vector: the user vector of each row, or
    each of its K interests where `per_interest` [P]."""
    t0 = time.perf_counter()
    P, K, D = e.interests.shape
    agg, per = np.flatnonzero(~per_interest), np.flatnonzero(per_interest)
    queries = e.user_vector if not len(per) else np.concatenate(
        [e.user_vector[agg], e.interests[per].reshape(-1, D)])          # [A + I K, D]
    scores, ids = knn(engine, queries, k)                               # [A + I K, k]
    A, k = len(agg), scores.shape[1]
    hits = {AGGREGATE: Hits(agg, scores[:A, None], ids[:A, None]),      # [A, 1, k]
            PER_INTEREST: Hits(per, scores[A:].reshape(len(per), K, k),
                               ids[A:].reshape(len(per), K, k))}        # [I, K, k]
    return Computed(e, hits, time.perf_counter() - t0)


def dense_search(engine: Engine, e: Encoded, per_interest: np.ndarray, exclude: np.ndarray,
                 k: int, merges: np.ndarray | None = None) -> Computed:
    """Stage 4 over an exact index's table (`Engine.table`): every query vector scored against
    every item in one product, each row's `exclude` [P, H] ids (and id 0) masked, then the top
    `k` of what is left. Exact with the exclusions applied (`Hits.filtered`): k = n suffices for
    every merge, and no row is searched again. Per-interest rows whose merge ranks by the best
    key (`merges` [P], `merge.BEST_KEY`) are merged here: each item's best key over the K rows,
    one top k of those (`Computed.merged`), not K top-k lists merged after."""
    t0 = time.perf_counter()
    assert engine.table is not None
    _, K, D = e.interests.shape
    k = max(1, min(k, engine.n_items))
    best = (per_interest & np.isin(merges, BEST_KEY) if merges is not None and per_interest.any()
            else np.zeros_like(per_interest))                          # [P]
    hits = {}
    for mode, rows in ((AGGREGATE, np.flatnonzero(~per_interest)),
                       (PER_INTEREST, np.flatnonzero(per_interest & ~best))):
        Q = 1 if mode == AGGREGATE else K
        if not len(rows):                  # nothing searched so: no product, no selection
            hits[mode] = Hits(rows, np.empty((0, Q, k), np.float32), np.empty((0, Q, k), np.int64),
                              True)
            continue
        s = _dense_scores(engine, e, mode, rows, exclude)               # [m, Q, M + 1]
        m = len(rows)
        ts, ids = _dense_top(s.reshape(m * Q, s.shape[2]), k)           # [m Q, k]
        hits[mode] = Hits(rows, ts.reshape(m, Q, k), ids.reshape(m, Q, k), True)
    rows = np.flatnonzero(best)
    merged = None
    if len(rows):
        assert merges is not None                                       # `best` rows have one
        s = _dense_scores(engine, e, PER_INTEREST, rows, exclude)       # [m, K, M + 1]
        key = s + key_shift(merges[rows], e.weights[rows])              # [m, K, M + 1]
        _, ids = _dense_top(key.max(axis=1), k)                         # [m, k] by best key
        at = np.maximum(ids, 0)[:, None, :]                             # [m, 1, k]
        # the interest of each pick, over its K keys alone (an argmax across the K axis of
        # the whole [m, K, M + 1] costs more than the rest of the search)
        src = np.take_along_axis(key, np.broadcast_to(at, (len(rows), K, k)), 2).argmax(1)  # [m, k]
        raw = s[np.arange(len(rows))[:, None], src, at[:, 0]]           # [m, k] unshifted
        merged = Hits(rows, raw[:, None], ids[:, None], True, src[:, None])
    return Computed(e, hits, time.perf_counter() - t0, merged)


def _dense_scores(engine: Engine, e: Encoded, mode: Mode, rows: np.ndarray,
                  exclude: np.ndarray) -> np.ndarray:
    """rows [m] -> [m, Q, M + 1] scores of their query vectors (Q: 1 aggregate, K per interest),
    id 0 and each row's `exclude` set to -inf."""
    table_t = engine.table_t
    assert table_t is not None
    _, K, D = e.interests.shape
    m, Q = len(rows), (1 if mode == AGGREGATE else K)
    q = (e.user_vector[rows] if mode == AGGREGATE else
         e.interests[rows].reshape(m * K, D))                          # [m Q, D]
    s: np.ndarray = (q @ table_t).reshape(m, Q, table_t.shape[1])      # [m, Q, M + 1]
    s[:, :, 0] = -np.inf
    s[np.arange(m)[:, None, None], np.arange(Q)[None, :, None],
      exclude[rows][:, None, :]] = -np.inf                             # 0-padding hits column 0
    return s


def _dense_top(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, M + 1] scores -> the top k of each row, best first: scores [R, k], ids [R, k] (-1
    where only masked items were left).

    Blocks of TOP_BLOCK columns first: an item of the top k lies in a block whose maximum is
    among the k best block maxima (else k other items beat it), so the selection runs over
    those k blocks, not the whole row (argpartition is most of the dense search's time)."""
    R, C = flat.shape
    B = C // TOP_BLOCK
    if B < 2 * k or R < TOP_BLOCK_ROWS:
        return _top_of(flat, k)
    peaks = np.maximum.reduce([flat[:, i:B * TOP_BLOCK:TOP_BLOCK]
                               for i in range(TOP_BLOCK)])             # [R, B] block maxima
    best = np.argpartition(peaks, B - k, axis=1)[:, -k:]                # [R, k] blocks, unordered
    cols = (best[:, :, None] * TOP_BLOCK + np.arange(TOP_BLOCK)).reshape(R, k * TOP_BLOCK)
    if B * TOP_BLOCK < C:                                               # the columns past the last block
        tail = np.broadcast_to(np.arange(B * TOP_BLOCK, C), (R, C - B * TOP_BLOCK))
        cols = np.concatenate([cols, tail], 1)                          # [R, k b + C mod b]
    ts, at = _top_of(np.take_along_axis(flat, cols, 1), k)
    return ts, np.where(at >= 0, np.take_along_axis(cols, np.maximum(at, 0), 1), -1)


def _top_of(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`_dense_top` by one argpartition over the whole row: [R, C] -> scores, columns [R, k]."""
    top = np.argpartition(flat, flat.shape[1] - k, axis=1)[:, -k:]    # [R, k], unordered
    ts = np.take_along_axis(flat, top, 1)
    order = np.argsort(-ts, axis=1, kind="stable")
    ts, top = np.take_along_axis(ts, order, 1), np.take_along_axis(top, order, 1)
    return ts, np.where(np.isfinite(ts), top, -1)


def compute(engine: Engine, windows: np.ndarray, per_interest: np.ndarray, k: int) -> Computed:
    """Stages 3 and 4 in one call (the offline gate and benchmarks)."""
    return search(engine, encode(engine, windows), per_interest, k)


# -- stage 5: filter (the merges in service.merge) ---------------------------------------------

def top_up(engine: Engine, row_ids: np.ndarray, exclude: np.ndarray, need: int,
           queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ANN index returned fewer than asked: the `need` most popular items not yet answered or
    excluded, with their exact scores under `queries` [Q, D] (best query vector)."""
    extra = engine.popular_ids(need, np.concatenate([row_ids, exclude.ravel()]))
    per = engine.vectors(extra) @ queries.T                           # [e, Q]
    return extra, per.max(axis=1).astype(np.float32), per.argmax(axis=1)


# -- stage 6: answer ---------------------------------------------------------------------------

INTEREST_FIELDS = tuple(b',"interest":%d' % k for k in range(256))    # built once, not per item


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
        if q.mode == PER_INTEREST and source is not None:
            src = source.tolist()
            if len(src) > 1 and max(src) < len(INTEREST_FIELDS):      # a C lookup, 6x a format
                parts.append(operator.itemgetter(*src)(INTEREST_FIELDS))
            else:
                parts.append([b',"interest":%d' % r for r in src])
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
    head = (b'{"user_id":%b,"version":%b,"arm":%b,"mode":"%b","merge":%b,"fallback":%b,'
            b'"score_kind":"%b","items":[') % (
        orjson.dumps(q.user_id), orjson.dumps(engine.version), orjson.dumps(engine.arm),
        q.mode.encode(),
        b'"%b"' % q.merge.encode() if q.merge is not None else b"null",
        b'"%b"' % fallback.encode() if fallback else b"null",
        b"popularity" if fallback else b"inner_product")
    w: bytes = (orjson.dumps(weights.astype(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
                if q.include_interests and weights is not None else b"null")
    return head + items + b'],"interest_weights":' + w + b"}"
