"""One loaded bundle: the ONNX Runtime encoder, the faiss index and the id maps, warmed up.

What the request path does with them is `service.stages`; here are the loading, the devices
and the lookups the stages share (item vectors, the most popular items).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson

from index_builder import bundle as bundle_mod

log = logging.getLogger("sine.service")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class EngineError(RuntimeError):
    """A bundle that cannot be served here: invalid, or not on the device it was asked to use."""


@dataclass
class Engine:
    """A loaded bundle: the encoder session, the faiss index and the id maps."""
    bundle: bundle_mod.Bundle
    session: Any                       # onnxruntime.InferenceSession
    index: Any                         # what searches run on (a GPU copy when on GPU)
    cpu_index: Any                     # for reconstructing item vectors
    item_index: dict[str, int]         # external id -> internal id
    item_json: np.ndarray              # [M + 1] bytes: '{"item_id":<id as JSON>,"score":'
    popular: np.ndarray                # [M] internal ids by training popularity, most popular first
    popularity: np.ndarray             # [M + 1] training click counts
    providers: list[str]
    faiss_device: str
    faiss_threads: int = 1             # idle OpenMP workers spin and starve the event loop
    blas_vectors: int | None = None    # query vectors from which exact search is one sgemm
    table: np.ndarray | None = None    # [M + 1, D] float32, row j = internal id j (row 0: 0):
                                       # set where an exact index is searched as dense scores
    table_t: np.ndarray | None = field(init=False, default=None)   # [D, M + 1] contiguous: the
    # dense product's right side (a transposed view of `table` made it 1.7x slower at B = 20)
    arm: str = "control"               # the arm it answers as (service.arms): control, or its version

    def __post_init__(self) -> None:
        if self.table is not None:
            self.table_t = np.ascontiguousarray(self.table.T)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def n(self) -> int:
        return int(self.bundle.manifest["model"]["n"])

    @property
    def D(self) -> int:
        return int(self.bundle.manifest["model"]["D"])

    @property
    def n_items(self) -> int:
        return len(self.popular)

    def popular_ids(self, n: int, exclude: np.ndarray) -> np.ndarray:
        """The n most popular internal ids outside `exclude` (any shape; 0s ignored).

        Looks at the first n + |exclude| by popularity only: at most |exclude| of them can be
        excluded, so the answer is among them, whatever the catalog's size."""
        head = self.popular[: n + exclude.size]
        return head[~np.isin(head, exclude)][:n]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Item vectors as the index stores them, [len(ids), D] float32."""
        if len(ids) == 0:
            return np.zeros((0, self.D), dtype=np.float32)
        if self.table is not None:
            rows: np.ndarray = self.table[ids]
            return rows
        out: np.ndarray = self.cpu_index.reconstruct_batch(np.ascontiguousarray(ids, np.int64))
        return out

    def warm_up(self, max_batch: int) -> None:
        """One encoder run and one search at batch 1 and at the largest batch, before serving."""
        from .stages import encode, knn

        for b in sorted({1, max(1, max_batch)}):
            w = np.zeros((b, self.n), dtype=np.int64)
            w[:, 0] = self.popular[0]
            knn(self, encode(self, w).user_vector, 100)


def _session(path: Path, providers: str, allow_cpu_fallback: bool,
             intra_op_threads: int) -> tuple[Any, list[str]]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers == "cpu":
        want = [CPU]
    elif providers == "cuda":
        if CUDA not in available:
            if not allow_cpu_fallback:
                raise EngineError(f"providers=cuda but this onnxruntime offers {available}; install "
                                  f"onnxruntime-gpu, or set SINE_ALLOW_CPU_FALLBACK=true.")
            want = [CPU]
        else:
            want = [CUDA, CPU]
    else:
        want = [CUDA, CPU] if CUDA in available else [CPU]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=want)
    active: list[str] = sess.get_providers()   # what the session really runs on, not what was offered
    if providers == "cuda" and active[0] != CUDA and not allow_cpu_fallback:
        raise EngineError(f"providers=cuda but the session runs on {active} (no usable GPU or "
                          f"CUDA libraries); set SINE_ALLOW_CPU_FALLBACK=true to serve on CPU.")
    return sess, active


def _faiss_index(b: bundle_mod.Bundle, mode: str, search_params: dict[str, int],
                 mmap: bool = False) -> tuple[Any, Any, str]:
    cpu = b.read_index(mmap=mmap)
    params = {**b.manifest["index"].get("search_params", {}), **search_params}
    try:
        bundle_mod.set_search_params(cpu, params)
    except Exception as e:      # faiss raises RuntimeError with its own text for a wrong knob
        raise EngineError(f"search params {params} do not apply to the index "
                          f"{b.manifest['index']['factory']!r}: {e}") from e
    try:
        ivf = faiss.extract_index_ivf(cpu)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # ids 1..M
    except RuntimeError:
        pass
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if mode == "on" and gpus == 0:
        raise EngineError("faiss_gpu=on but faiss sees no GPU (faiss-cpu installed, or no device).")
    if mode != "off" and gpus > 0:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
        gpu.referenced_resources = res  # type: ignore[attr-defined]  # alive as long as the index
        return gpu, cpu, "gpu"
    return cpu, cpu, "cpu"


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")


def limit_blas_threads() -> list[str]:
    """Every OpenBLAS this process has loaded (numpy's, faiss's) on one thread; the libraries
    set. A pthreads OpenBLAS's workers spin between calls: one dense search a few milliseconds
    apart kept a second core busy (1.13 CPU seconds a second, 0.19 on one thread). Linux
    (/proc/self/maps); elsewhere nothing is set."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f
                            if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []
    done = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                done.append(path)
                break
    return done


def dense_table(index: Any, n_items: int, max_items: int) -> np.ndarray | None:
    """The exact index's vectors as a table [M + 1, D] by internal id (row 0 zeros), for an
    IndexIDMap over IndexFlatIP of at most `max_items` items; None for any other index."""
    if n_items > max_items or not isinstance(index, faiss.IndexIDMap):
        return None
    inner = faiss.downcast_index(index.index)
    if type(inner) is not faiss.IndexFlatIP:
        return None
    ids = faiss.vector_to_array(index.id_map)                         # [M] internal id per row
    table = np.zeros((n_items + 1, inner.d), dtype=np.float32)
    table[ids] = inner.reconstruct_n(0, inner.ntotal)                # [M, D]
    return table


def item_json_prefixes(item_ids: list[str]) -> np.ndarray:
    """[M + 1] fixed-width bytes: each item's answer up to its score, JSON-escaped once."""
    return np.array([b'{"item_id":' + orjson.dumps(x) + b',"score":' for x in item_ids])


def load_engine(path: str | Path, providers: str = "auto", allow_cpu_fallback: bool = False,
                intra_op_threads: int = 1, faiss_gpu: str = "auto",
                search_params: dict[str, int] | None = None, warm_batch: int = 64,
                faiss_threads: int = 1, index_mmap: bool = False,
                blas_vectors: int | None = None, dense_max_items: int = 0) -> Engine:
    """Validate a bundle (hashes, schema, dimensions), open it on the configured devices, warm
    up. `blas_vectors`: query vectors from which faiss's exact search scores a batch as one
    matrix product (None: faiss's own threshold). `dense_max_items`: an exact index on CPU over
    at most this many items is searched as dense scores (`stages.dense_search`; 0: never)."""
    t0 = time.perf_counter()
    limit_blas_threads()
    try:
        b = bundle_mod.load(path, verify_hashes=True, deep=False)
        sess, active = _session(b.file("encoder"), providers, allow_cpu_fallback, intra_op_threads)
        index, cpu_index, device = _faiss_index(b, faiss_gpu, search_params or {}, index_mmap)
        bundle_mod.check_dimensions(b, index=cpu_index, session=sess)
        ids = b.item_ids()
        pop = b.popularity()
        eng = Engine(bundle=b, session=sess, index=index, cpu_index=cpu_index,
                     item_index={s: i for i, s in enumerate(ids) if i > 0},
                     item_json=item_json_prefixes(ids),
                     popular=np.argsort(-pop[1:], kind="stable") + 1, popularity=pop,
                     providers=active, faiss_device=device, faiss_threads=faiss_threads,
                     blas_vectors=blas_vectors,
                     table=dense_table(cpu_index, len(ids) - 1, dense_max_items)
                     if device == "cpu" else None)
        eng.warm_up(warm_batch)
    except (EngineError, bundle_mod.BundleError) as e:
        raise EngineError(str(e)) from e
    except Exception as e:     # ONNX Runtime's or faiss's own errors: an encoder it cannot
        raise EngineError(f"{path}: the bundle cannot be served: {type(e).__name__}: "  # parse
                          f"{e}") from e
    log.info("bundle loaded", extra={"version": b.version, "path": str(b.path), "items": eng.n_items,
                                     "providers": active, "faiss": device,
                                     "graph": b.manifest["onnx"].get("graph", "plain"),
                                     "factory": b.manifest["index"]["factory"],
                                     "seconds": round(time.perf_counter() - t0, 3)})
    return eng
