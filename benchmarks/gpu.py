"""GPU checks in one short run: ORT's CUDA provider and GPU retrieval at 1M and 10M items.

    python -m benchmarks.gpu --bundle runs/bundles --out benchmarks/results

1. onnxruntime: which providers the package offers, whether a session asked for CUDA really runs
   on it (`session.get_providers()`, not `get_available_providers()`), CUDA vs CPU latency at
   B = 1 to 256, plain and with I/O binding (input bound from host memory, outputs left on the
   device), and the largest |difference| between CUDA and CPU.
3. The service's request path on that machine: `service.engine.load_engine` with
   `providers=cuda` (and faiss on the GPU where faiss-gpu sees one), then the stages of one
   micro-batch (window, encode, search, filter and answer) at B = 1 to 256.
2. Retrieval at 1M and 10M items (Gaussian mixture fitted to the bundle's items when the bundle has
   an export folder beside it, else clustered random vectors): with faiss-gpu, `GpuIndexFlatIP` and
   GPU IVF4096,Flat, batch 1 and 1024; without faiss-gpu, exact search as a torch CUDA matmul +
   top-k, labelled as such. Every row says which backend produced it.
Where no GPU is present every GPU row is reported as skipped with the reason; the script never
fails for lack of a GPU. Writes gpu.json and gpu.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit, machine, now, write_results

ROOT = Path(__file__).resolve().parent.parent

K = 100


def med_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def check_ort(encoder: Path) -> dict:
    import onnxruntime as ort
    out = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    cpu = ort.InferenceSession(str(encoder), so, providers=["CPUExecutionProvider"])
    n = cpu.get_inputs()[0].shape[1]
    rng = np.random.default_rng(0)
    if "CUDAExecutionProvider" not in out["available_providers"]:
        out["cuda"] = "skipped: this onnxruntime has no CUDAExecutionProvider"
        return out
    try:
        gpu = ort.InferenceSession(str(encoder), so, providers=["CUDAExecutionProvider",
                                                                 "CPUExecutionProvider"])
    except Exception as e:  # the provider library fails to load without CUDA/cuDNN
        out["cuda"] = f"skipped: session creation failed: {e}"
        return out
    out["session_providers"] = gpu.get_providers()
    if gpu.get_providers()[0] != "CUDAExecutionProvider":
        out["cuda"] = "skipped: asked for CUDA, the session fell back to CPU"
        return out
    rows = []
    names = [o.name for o in gpu.get_outputs()]
    for B in (1, 8, 32, 256):
        x = rng.integers(1, 1000, size=(B, n)).astype(np.int64)
        a = cpu.run(None, {"item_ids": x})
        b = gpu.run(None, {"item_ids": x})
        io = gpu.io_binding()

        def bound():
            io.bind_cpu_input("item_ids", x)
            for name in names:
                io.bind_output(name, "cuda")
            gpu.run_with_iobinding(io)
        reps = 200 if B <= 8 else 40
        rows.append({"batch": B,
                     "cpu_ms": med_ms(lambda: cpu.run(None, {"item_ids": x}), reps),
                     "cuda_ms": med_ms(lambda: gpu.run(None, {"item_ids": x}), reps),
                     "cuda_iobinding_ms": med_ms(bound, reps),
                     "max_abs_diff": {o.name: float(np.abs(p - q).max())
                                      for o, p, q in zip(gpu.get_outputs(), a, b)}})
    out["cuda"] = rows
    return out


def check_pipeline(bundle_path: str) -> list[dict] | str:
    """Stage times of one micro-batch on the GPU engine, or why it cannot run here."""
    try:
        from service.engine import EngineError, load_engine
        from service.stages import Query, compute, render, top_n, window
    except ImportError as e:                  # the device image may lack faiss or the service
        return f"skipped: {e}"
    try:
        eng = load_engine(bundle_path, providers="cuda", faiss_gpu="auto")
    except EngineError as e:
        return f"skipped: {e}"
    ext = eng.bundle.item_ids()
    rng = np.random.default_rng(0)
    rows = []
    for B in (1, 8, 32, 256):
        hists = [[ext[int(i)] for i in rng.integers(1, eng.n_items + 1, 20)] for _ in range(B)]
        times: dict[str, list[float]] = {"window": [], "encode": [], "search": [], "filter": []}
        for rep in range(30):
            t0 = time.perf_counter()
            win = window(eng, hists)
            t1 = time.perf_counter()
            c = compute(eng, win.window, np.zeros(B, dtype=bool), 120)
            t2 = time.perf_counter()
            top = top_n(c.scores[0], c.ids[0], win.seen, 100)
            for p in range(B):
                render(eng, Query(str(p), 100), top.ids[p], top.scores[p])
            t3 = time.perf_counter()
            if rep >= 5:
                for k, v in (("window", t1 - t0), ("encode", c.timings["encode"]),
                             ("search", c.timings["search"]), ("filter", t3 - t2)):
                    times[k].append(v * 1e3)
        rows.append({"batch": B, **{k: float(np.median(v)) for k, v in times.items()},
                     "providers": eng.providers, "faiss": eng.faiss_device})
    return rows


def catalog(n: int, d: int, items: np.ndarray | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if items is not None:
        try:
            from benchmarks.index import mixture_catalog
            return mixture_catalog(items, n, seed=seed)
        except ImportError:       # no faiss for the k-means fit: jitter copies of trained items
            base = items[rng.integers(0, len(items), n)]
            return (base + 0.5 * items.std(0) * rng.normal(size=base.shape)).astype(np.float32)
    c = rng.normal(size=(2000, d)).astype(np.float32)
    return c[rng.integers(0, 2000, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)


def check_retrieval(sizes: list[int], items: np.ndarray | None, xq: np.ndarray) -> list[dict]:
    rows = []
    try:
        import faiss
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        faiss, ngpu = None, 0
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    d = xq.shape[1]
    for n in sizes:
        if ngpu == 0 and not cuda:
            rows.append({"items": n, "skipped": "no GPU visible to faiss or torch"})
            continue
        xb = catalog(n, d, items)
        for B in (1, 1024):
            q = np.ascontiguousarray(np.resize(xq, (B, d)), dtype=np.float32)
            if ngpu:
                res = faiss.StandardGpuResources()
                flat = faiss.GpuIndexFlatIP(res, d)
                flat.add(xb)
                rows.append({"items": n, "batch": B, "backend": "faiss-gpu GpuIndexFlatIP",
                             "ms": med_ms(lambda: flat.search(q, K), 20)})
                ivf = faiss.index_cpu_to_gpu(res, 0, faiss.index_factory(d, "IVF4096,Flat",
                                                                         faiss.METRIC_INNER_PRODUCT))
                ivf.train(xb[: min(n, 400_000)])
                ivf.add(xb)
                _, gt = flat.search(q, K)
                for nprobe in (32, 128, 256):
                    faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", nprobe)
                    _, I = ivf.search(q, K)
                    rec = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(I, gt)]))
                    rows.append({"items": n, "batch": B, "backend": f"faiss-gpu IVF4096,Flat nprobe {nprobe}",
                                 "ms": med_ms(lambda: ivf.search(q, K), 20), "recall@100": rec})
                del flat, ivf
            else:
                tb = torch.from_numpy(xb).cuda()
                tq = torch.from_numpy(q).cuda()

                def search():
                    torch.topk(tq @ tb.T, K, dim=1)
                    torch.cuda.synchronize()
                rows.append({"items": n, "batch": B, "backend": "torch CUDA matmul + topk (exact; no faiss-gpu here)",
                             "ms": med_ms(search, 20)})
                del tb, tq
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a bundle folder or root (its encoder is used)")
    p.add_argument("--export", help="export folder: its items and queries shape the catalogs")
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    from index_builder import bundle
    b = bundle.load(a.bundle, deep=False)
    items = np.load(Path(a.export) / "items.npy") if a.export else None
    xq = (np.load(Path(a.export) / "queries.npy") if a.export
          else np.random.default_rng(1).normal(size=(1024, b.manifest["model"]["D"])).astype(np.float32))
    ort_rows = check_ort(b.file("encoder"))
    pipe_rows = check_pipeline(str(b.path))
    ret_rows = check_retrieval([int(s) for s in a.sizes.split(",")], items, xq)
    meta = {"command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
            "machine": machine("cuda"), "git_commit": git_commit(), "finished": now(),
            "bundle": b.version}
    md = ["# GPU checks", "", f"`{meta['command']}` on {meta['machine'].get('gpu', 'no GPU')} "
          f"({meta['machine']['cpu']}), {meta['finished']}.", "",
          f"onnxruntime {ort_rows['onnxruntime']}, available providers "
          f"{ort_rows['available_providers']}, session providers {ort_rows.get('session_providers', '-')}.", ""]
    if isinstance(ort_rows["cuda"], str):
        md.append(f"Encoder on CUDA: {ort_rows['cuda']}.")
    else:
        md += ["| B | CPU ms | CUDA ms | CUDA + I/O binding ms | max abs diff |",
               "|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['cpu_ms']:.3f} | {r['cuda_ms']:.3f} | "
               f"{r['cuda_iobinding_ms']:.3f} | {max(r['max_abs_diff'].values()):.1e} |"
               for r in ort_rows["cuda"]]
    md.append("")
    if isinstance(pipe_rows, str):
        md.append(f"Request path on the GPU engine: {pipe_rows}.")
    else:
        md += [f"Request path on the GPU engine ({pipe_rows[0]['providers'][0]}, faiss on "
               f"{pipe_rows[0]['faiss']}), ms per micro-batch of B users, n = 100:", "",
               "| B | window | encode | search | filter + answers |", "|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['window']:.3f} | {r['encode']:.3f} | {r['search']:.3f} | "
               f"{r['filter']:.3f} |" for r in pipe_rows]
    md += ["", "| items | batch | backend | ms | recall@100 |", "|---|---|---|---|---|"]
    for r in ret_rows:
        if "skipped" in r:
            md.append(f"| {r['items']:,} | - | skipped: {r['skipped']} | - | - |")
        else:
            md.append(f"| {r['items']:,} | {r['batch']} | {r['backend']} | {r['ms']:.3f} | "
                      f"{r.get('recall@100', '-')} |")
    write_results(a.out, "gpu", {"meta": meta, "onnxruntime": ort_rows, "pipeline": pipe_rows,
                                 "retrieval": ret_rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
