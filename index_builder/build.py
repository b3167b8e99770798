"""faiss index over the item table: build, measure recall against exact search, tune, gate.

Inner-product metric throughout (the model scores items by v . H_j). Items keep their internal ids
(1..M) inside the index, through `add_with_ids` for IVF and an `IndexIDMap2` wrapper otherwise, so
a search returns ids the bundle's id map turns into external ids.

Recall@k is measured on real user vectors (the export's validation queries), against
`IndexFlatIP` on the same items. An ANN index with one search knob (`efSearch` for HNSW, `nprobe`
for IVF) has it raised step by step until recall reaches the floor, and the smallest such value
is recorded. One with several (a refine stage's `k_factor_rf`, an HNSW quantizer's
`quantizer_efSearch`) is tuned by faiss's own autotuning, which keeps the fastest point at the
floor. An index that cannot reach the floor is refused.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from .bundle import Progress, SineError, set_search_params
from .options import DEFAULTS

# `auto`: exact search up to `auto_exact_max_items`; above, IVF with about 4 sqrt(N) lists (a
# power of two), at most AUTO_MAX_LISTS, over 8-bit scalar-quantized vectors: the lowest p99 at
# recall@100 >= 0.95 of the indexes that fit the default budget (benchmarks/results/index.md,
# index-10m-lists.md: why not HNSW over SQ8, or IVF16384 at 10M, which needs 4x the lists probed
# for the same recall and answered slower). Residual fast-scan PQ re-ranked with SQ8
# (index-10m.md) is 2.6x faster at 10M but holds twice the memory, so it is named, not chosen.
# Past `memory_budget_mb` of codes and ids it still builds and says to shard.
AUTO_EXACT_MAX_ITEMS = DEFAULTS.auto_exact_max_items
AUTO_MEMORY_BUDGET_MB = DEFAULTS.memory_budget_mb
AUTO_MAX_LISTS = 4096
KNOB_LADDER = {"efSearch": [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
               "nprobe": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]}
AUTOTUNE_EXPERIMENTS = 64                     # points faiss's autotuning measures, at most
TRAIN_PER_LIST = 40                           # k-means points per IVF list (faiss warns below 39)


class IndexBuildError(SineError, RuntimeError):
    """The index cannot be built or does not meet the recall floor; the message says why."""


@dataclass
class BuiltIndex:
    """A built index with what its gate measured: the factory, knobs, recall and build time."""
    index: faiss.Index
    factory: str
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    recall_k: int = 100
    n_queries: int = 0
    build_seconds: float = 0.0
    recall_curve: list[tuple[dict[str, int], float]] = field(default_factory=list)  # tried
    gpu: bool = False


def resident_mb(factory: str, n_items: int, d: int) -> float:
    """An index's codes, ids and graph links in memory, MiB (a refine stage not counted: its
    rows are read a few hundred at a time, from the memory-mapped file)."""
    base = re.sub(r",(RFlat|Refine\(.*\))$", "", factory)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", base)
    if pq:
        per = int(pq.group(1)) * int(pq.group(2) or 8) / 8
    elif base.endswith("SQ8"):
        per = d
    elif base.endswith("SQ4"):
        per = d / 2
    else:
        per = 4 * d
    hnsw = re.match(r"HNSW(\d+)", base)
    links = 2 * int(hnsw.group(1)) * 4 if hnsw else 0     # level 0 holds 2M int32 neighbours
    return n_items * (per + 8 + links) / 2**20


def resolve_factory(factory: str, n_items: int, d: int = 128) -> str:
    if factory != "auto":
        return factory
    if n_items <= AUTO_EXACT_MAX_ITEMS:
        return "Flat"
    nlist = min(AUTO_MAX_LISTS, 2 ** round(math.log2(4 * math.sqrt(n_items))))
    return f"IVF{nlist},SQ8"


def over_budget(factory: str, n_items: int, d: int,
                memory_budget_mb: float = AUTO_MEMORY_BUDGET_MB) -> str | None:
    """Why `factory` does not fit one pod's budget (and what to do), or None."""
    need = resident_mb(factory, n_items, d)
    if need <= memory_budget_mb:
        return None
    shards = math.ceil(need / memory_budget_mb)
    return (f"{factory!r} holds about {need:,.0f} MiB of codes for {n_items:,} items, over the "
            f"{memory_budget_mb:,.0f} MiB budget: split the catalog into {shards} or more shards, "
            "one per pod (the Kubernetes guide, 'Catalogs past one pod'), or raise the budget")


def unwrapped(index: faiss.Index) -> faiss.Index:
    """The index inside an id map (what holds the search knobs), or `index` itself."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def is_refine(index: faiss.Index) -> bool:
    inner = unwrapped(index)
    return isinstance(faiss.downcast_index(inner), faiss.IndexRefine)


def knob_name(index: faiss.Index) -> str | None:
    inner = unwrapped(index)
    try:
        faiss.extract_index_ivf(inner)
        return "nprobe"
    except RuntimeError:
        pass
    if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        return "efSearch"
    return None


def build(xb: np.ndarray, ids: np.ndarray, factory: str = "auto", gpu: bool = False,
          train_size: int = 200_000, seed: int = 0, progress: Progress | None = None) -> faiss.Index:
    """An inner-product index over `xb` [N, d] float32 keeping `ids` [N] int64: trained on a
    sample of `train_size` vectors, then filled in chunks (`progress(done, total)` after each)."""
    if gpu and faiss_gpu_count() == 0:
        raise IndexBuildError("--gpu asked for, but faiss sees no GPU (faiss.get_num_gpus() == 0; "
                              "is faiss-gpu installed and a CUDA device visible?). Build without --gpu.")
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, d = xb.shape
    factory = resolve_factory(factory, n, d)
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"faiss cannot build factory string {factory!r}: {e}") from e
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    is_ivf = ivf is not None
    if ivf is not None and ivf.nlist > n:
        raise IndexBuildError(f"{factory!r} asks for {ivf.nlist} lists but there are only {n} "
                              "items; use fewer lists or 'Flat'.")
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        want = max(train_size, TRAIN_PER_LIST * ivf.nlist if ivf is not None else 0)
        sample = xb[rng.choice(n, size=min(want, n), replace=False)]
        index.train(sample)
    if not is_ivf or is_refine(index):           # a refine stage keeps no ids of its own
        index = faiss.IndexIDMap2(index)
    step = max(1, min(n // 20, 500_000))
    for i in range(0, n, step):                           # chunks, so a bar can move on 1M items
        index.add_with_ids(xb[i:i + step], ids[i:i + step])
        if progress is not None:
            progress(min(i + step, n), n)
    if gpu:
        index = faiss.index_gpu_to_cpu(index)              # the bundle stores a CPU index
    return index


def faiss_gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def exact_topk(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(np.ascontiguousarray(xb, dtype=np.float32))
    _, I = flat.search(np.ascontiguousarray(xq, dtype=np.float32), k)
    return ids[I]


def recall_at_k(index: faiss.Index, xq: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over the queries."""
    _, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) / k for a, b in zip(I, gt)]))


def knobs(index: faiss.Index) -> dict[str, list[float]]:
    """Every search knob faiss's ParameterSpace finds in `index` (through an id map), with the
    values its autotuning explores: nprobe, efSearch, k_factor_rf, quantizer_efSearch, ..."""
    inner = unwrapped(index)
    ps = faiss.ParameterSpace()
    ps.initialize(inner)
    ranges = [ps.parameter_ranges.at(i) for i in range(ps.parameter_ranges.size())]
    return {r.name: faiss.vector_to_array(r.values).tolist() for r in ranges}


def tune(index: faiss.Index, xq: np.ndarray, gt: np.ndarray, k: int, floor: float,
         experiments: int = AUTOTUNE_EXPERIMENTS
         ) -> tuple[dict[str, int], float, list[tuple[dict[str, int], float]]]:
    """The cheapest search knobs that reach `floor`. One knob: raised step by step, the smallest
    value that reaches it. Several (a refine stage's k_factor_rf, an HNSW quantizer's
    efSearch beside nprobe): faiss's own autotuning, the fastest point it found at or above the
    floor. Returns (params, recall, every (params, recall) tried)."""
    space = knobs(index)
    if len(space) > 1:
        return autotune(index, xq, gt, k, floor, experiments)
    knob = knob_name(index)
    curve: list[tuple[dict[str, int], float]] = []
    if knob is None:
        rec = recall_at_k(index, xq, gt, k)
        return {}, rec, [({}, rec)]
    chosen: dict[str, int] = {}
    rec = 0.0
    for v in KNOB_LADDER[knob]:
        params = {knob: v}
        set_search_params(index, params)
        got = recall_at_k(index, xq, gt, k)
        curve.append((params, got))
        if got > rec:
            chosen, rec = params, got
        if got >= floor:
            break
    set_search_params(index, chosen)
    return chosen, rec, curve


def autotune(index: faiss.Index, xq: np.ndarray, gt: np.ndarray, k: int, floor: float,
             experiments: int = AUTOTUNE_EXPERIMENTS
             ) -> tuple[dict[str, int], float, list[tuple[dict[str, int], float]]]:
    """faiss's ParameterSpace.explore over every knob of `index`, recall@k as its criterion
    (IntersectionCriterion: |ANN top-k ∩ exact top-k| / k, the gate's measure): of the
    (recall, search time) Pareto front it returns, the fastest point at or above `floor`, else
    the most accurate. Times are of the whole query batch, so they rank points, not promise a
    latency (benchmarks/index.py measures that)."""
    inner = unwrapped(index)
    # Any: faiss's stubs give these methods' C++ signatures, its Python wrapper replaces them
    ps: Any = faiss.ParameterSpace()
    ps.initialize(inner)
    ps.n_experiments = experiments
    ps.verbose = 0
    crit: Any = faiss.IntersectionCriterion(len(xq), k)
    crit.set_groundtruth(None, np.ascontiguousarray(gt, dtype=np.int64))
    front = ps.explore(index, np.ascontiguousarray(xq, dtype=np.float32), crit)
    points = [front.optimal_pts.at(i) for i in range(front.optimal_pts.size())]
    curve = [(_params(p.key), float(p.perf)) for p in points if p.key]
    if not curve:
        raise IndexBuildError("faiss's autotuning found no operating point for this index")
    met = [c for c in curve if c[1] >= floor]               # the front is in order of time
    chosen, rec = met[0] if met else max(curve, key=lambda c: c[1])
    set_search_params(index, chosen)
    return chosen, recall_at_k(index, xq, gt, k), curve


def _params(key: str) -> dict[str, int]:
    """faiss's operating-point key ('k_factor_rf=4,nprobe=64') as the manifest's knobs."""
    out = {}
    for part in key.split(","):
        name, value = part.split("=")
        out[name] = int(float(value))
    return out


def build_and_gate(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, *,
                   factory: str = DEFAULTS.factory, k: int = DEFAULTS.recall_k,
                   floor: float = DEFAULTS.recall_floor, params: dict[str, int] | None = None,
                   gpu: bool = False, progress: Progress | None = None,
                   log: Callable[[str], object] = print,
                   memory_budget_mb: float | None = None) -> BuiltIndex:
    """Build, then measure recall@k on `xq`; tune the search knob up to the floor or refuse."""
    resolved = resolve_factory(factory, len(xb), xb.shape[1])
    warning = over_budget(resolved, len(xb), xb.shape[1],
                          memory_budget_mb or AUTO_MEMORY_BUDGET_MB)
    if warning:
        log(f"warning: {warning}")
    k = min(k, len(xb))
    t0 = time.perf_counter()
    index = build(xb, ids, resolved, gpu=gpu, progress=progress)
    secs = time.perf_counter() - t0
    gt = exact_topk(xb, ids, xq, k)
    if params:
        set_search_params(index, params)
        chosen, rec = dict(params), recall_at_k(index, xq, gt, k)
        curve = [(params, rec)]
    else:
        chosen, rec, curve = tune(index, xq, gt, k, floor)
    log(f"index {resolved!r}: {index.ntotal:,} items, built in {secs:.1f} s, recall@{k} "
        f"{rec:.4f} on {len(xq)} real user vectors with {chosen or 'no search knob'}")
    if rec < floor:
        tried = ", ".join(f"{p or 'default'} -> {r:.3f}" for p, r in curve)
        raise IndexBuildError(f"recall@{k} {rec:.4f} of {resolved!r} is below the floor {floor} "
                              f"(tried {tried}); the index was not written. Use a larger "
                              "search knob, a finer index (more lists / links) or 'Flat'.")
    return BuiltIndex(index=index, factory=resolved, search_params=chosen, recall=rec,
                      recall_k=k, n_queries=len(xq), build_seconds=secs,
                      recall_curve=[(p, r) for p, r in curve], gpu=gpu)
