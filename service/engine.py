"""One loaded bundle: the ONNX Runtime encoder, the faiss index and the id maps, warmed up.

The encoder's input layout is the bundle's (`[B, n]` int64, most recent click first, 0 = padding
at the end); `window()` builds it from a history list read newest first.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index_builder import bundle as bundle_mod

log = logging.getLogger("sine.service")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class EngineError(RuntimeError):
    """A bundle that cannot be served here: invalid, or not on the device it was asked to use."""


@dataclass
class Engine:
    bundle: bundle_mod.Bundle
    session: object
    index: object                      # what searches run on (a GPU copy when on GPU)
    cpu_index: object                  # for reconstructing item vectors
    item_ids: list[str]                # internal id -> external id; [0] is padding
    item_index: dict[str, int]         # external id -> internal id
    popular: np.ndarray                # internal ids by training popularity, most popular first
    popularity: np.ndarray             # [M + 1] click counts
    providers: list[str]
    faiss_device: str
    faiss_threads: int = 1             # idle OpenMP workers spin and starve the event loop
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def n(self) -> int:
        return self.bundle.manifest["model"]["n"]

    @property
    def K(self) -> int:
        return self.bundle.manifest["model"]["K"]

    @property
    def D(self) -> int:
        return self.bundle.manifest["model"]["D"]

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def window(self, history: list[str]) -> tuple[np.ndarray, list[int], int]:
        """History (newest first, external ids) -> ([n] int64 window, known internal ids, unknown)."""
        known = [self.item_index[h] for h in history if h in self.item_index]
        w = np.zeros(self.n, dtype=np.int64)
        head = known[: self.n]
        w[: len(head)] = head
        return w, known, len(history) - len(known)

    def encode(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, n] int64 -> interests [B, K, D], user_vector [B, D], weights [B, K]."""
        interests, user_vector, weights = self.session.run(
            ["interests", "user_vector", "weights"], {"item_ids": windows})
        return interests, user_vector, weights

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, D] float32 -> scores [Q, k], internal ids [Q, k] (-1 where fewer were found)."""
        # omp_set_num_threads is per calling thread: set it in whichever thread searches
        faiss.omp_set_num_threads(self.faiss_threads)
        k = max(1, min(k, self.n_items))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def popular_ids(self, n: int, exclude: set[int]) -> list[int]:
        """The n most popular internal ids outside `exclude`."""
        out: list[int] = []
        for i in self.popular.tolist():
            if i not in exclude:
                out.append(i)
                if len(out) == n:
                    break
        return out

    def vectors(self, ids: list[int]) -> np.ndarray:
        """Item vectors as the index stores them, [len(ids), D]."""
        out = np.empty((len(ids), self.D), dtype=np.float32)
        for j, i in enumerate(ids):
            out[j] = self.cpu_index.reconstruct(int(i))
        return out

    def warm_up(self, max_batch: int) -> None:
        for b in sorted({1, max(1, max_batch)}):
            w = np.zeros((b, self.n), dtype=np.int64)
            w[:, 0] = self.popular[: 1].repeat(b) if len(self.popular) else 0
            _, uv, _ = self.encode(w)
            self.search(uv, 100)


def _session(path: Path, providers: str, allow_cpu_fallback: bool, intra_op_threads: int):
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
    active = sess.get_providers()     # what the session really runs on, not what was offered
    if providers == "cuda" and active[0] != CUDA and not allow_cpu_fallback:
        raise EngineError(f"providers=cuda but the session runs on {active} (no usable GPU or "
                          f"CUDA libraries); set SINE_ALLOW_CPU_FALLBACK=true to serve on CPU.")
    return sess, active


def _faiss_index(b: bundle_mod.Bundle, mode: str, search_params: dict):
    from index_builder.build import set_search_params

    cpu = b.read_index()
    params = {**b.manifest["index"].get("search_params", {}), **search_params}
    try:
        set_search_params(cpu, params)
    except Exception as e:      # faiss raises RuntimeError with its own text for a wrong knob
        raise EngineError(f"search params {params} do not apply to the index "
                          f"{b.manifest['index']['factory']!r}: {e}") from e
    try:
        ivf = faiss.extract_index_ivf(cpu)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)   # ids are 1..M, not 0..M-1
    except RuntimeError:
        pass
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if mode == "on" and gpus == 0:
        raise EngineError("faiss_gpu=on but faiss sees no GPU (faiss-cpu installed, or no device).")
    if mode != "off" and gpus > 0:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
        gpu.referenced_resources = res       # keep the resources alive with the index
        return gpu, cpu, "gpu"
    return cpu, cpu, "cpu"


def load_engine(path: str | Path, providers: str = "auto", allow_cpu_fallback: bool = False,
                intra_op_threads: int = 1, faiss_gpu: str = "auto", search_params: dict | None = None,
                warm_batch: int = 64, faiss_threads: int = 1) -> Engine:
    """Validate a bundle (hashes, schema, dimensions), open it on the configured devices, warm up."""
    t0 = time.perf_counter()
    try:
        b = bundle_mod.load(path, verify_hashes=True, deep=False)
        sess, active = _session(b.file("encoder"), providers, allow_cpu_fallback, intra_op_threads)
        index, cpu_index, device = _faiss_index(b, faiss_gpu, search_params or {})
        bundle_mod.check_dimensions(b, index=cpu_index, session=sess)
    except bundle_mod.BundleError as e:
        raise EngineError(str(e)) from e
    ids = b.item_ids()
    pop = b.popularity()
    order = np.argsort(-pop[1:], kind="stable") + 1
    e = Engine(bundle=b, session=sess, index=index, cpu_index=cpu_index, item_ids=ids,
               item_index={s: i for i, s in enumerate(ids) if i > 0}, popular=order,
               popularity=pop, providers=active, faiss_device=device,
               faiss_threads=faiss_threads)
    e.warm_up(warm_batch)
    log.info("bundle loaded", extra={"version": b.version, "path": str(b.path), "items": e.n_items,
                                     "providers": active, "faiss": device,
                                     "factory": b.manifest["index"]["factory"],
                                     "seconds": round(time.perf_counter() - t0, 3)})
    return e
