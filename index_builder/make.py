"""`sine build-index`: an export folder -> a published, validated bundle version."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from . import bundle
from .build import build_and_gate
from .bundle import git_commit
from .options import DEFAULTS

EXPORT_FILES = ("encoder.onnx", "item_ids.json", "popularity.npy")


def make_bundle(export_dir: Path, root: Path, *, factory: str = DEFAULTS.factory,
                k: int = DEFAULTS.recall_k, floor: float = DEFAULTS.recall_floor,
                params: dict[str, int] | None = None, gpu: bool = False,
                version: str | None = None, make_current: bool = True,
                progress: bundle.Progress | None = None, log: Callable[[str], object] = print,
                memory_budget_mb: float | None = None) -> bundle.Bundle:
    export_dir, root = Path(export_dir), Path(root)
    info_path = export_dir / "export.json"
    if not info_path.exists():
        raise bundle.BundleError(f"{export_dir}: no export.json; run `sine export` first.")
    info = json.loads(info_path.read_text())
    for name in EXPORT_FILES + ("items.npy", "queries.npy"):
        if not (export_dir / name).exists():
            raise bundle.BundleError(f"{export_dir}: {name} is missing; rerun `sine export`.")
    xb = np.load(export_dir / "items.npy")
    xq = np.load(export_dir / "queries.npy")
    ids = np.arange(1, len(xb) + 1, dtype=np.int64)          # faiss id = internal item id
    built = build_and_gate(xb, ids, xq, factory=factory, k=k, floor=floor, params=params,
                           gpu=gpu, progress=progress, log=log, memory_budget_mb=memory_budget_mb)
    created = time.gmtime()
    version = version or (time.strftime("%Y%m%dT%H%M%SZ", created) + "-"
                          + info["items"]["vocab_sha256"][:8])
    staging = bundle.staging_dir(root, version)
    try:
        faiss.write_index(built.index, str(staging / bundle.FILES["index"]))
        optional = [n for n in bundle.OPTIONAL_FILES.values() if (export_dir / n).exists()]
        for name in (*EXPORT_FILES, *optional):
            shutil.copyfile(export_dir / name, staging / name)
        manifest = {
            "schema_version": bundle.SCHEMA_VERSION, "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", created), "git_commit": git_commit(),
            "model": info["model"], "dataset": info["dataset"], "onnx": info["onnx"],
            "items": info["items"],
            "index": {"file": bundle.FILES["index"], "factory": built.factory,
                      "metric": "inner_product", "search_params": built.search_params,
                      "recall": {"k": built.recall_k, "value": built.recall, "floor": floor,
                                 "queries": built.n_queries, "tried": built.recall_curve},
                      "build_seconds": built.build_seconds, "built_on_gpu": built.gpu},
            "offline_metrics": info.get("offline_metrics"),
            **({"serving": info["serving"]} if "serving" in info else {}),
            "provenance": info.get("provenance", {}),
            "libraries": {**info.get("libraries", {}), "faiss": faiss.__version__},
            "files": {name: bundle.sha256_file(staging / name)
                      for name in (*bundle.FILES.values(), *optional)},
        }
        (staging / bundle.MANIFEST).write_text(json.dumps(manifest, indent=1))
        bundle.load(staging, optional=True)                   # validate before it can go live
        final = bundle.publish(staging, root, version, make_current)
    except BaseException:
        bundle.discard(staging)
        raise
    log(f"published {final}" + (" (current)" if make_current else ""))
    return bundle.load(final, verify_hashes=False, deep=False)
