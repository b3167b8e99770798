"""What an arm costs in memory: the service's RSS with one bundle, then with a second version
of the same size as an arm beside it, at `--items` items (default 1M).

The bundle is a SASRec-shaped encoder with random weights over M synthetic item ids (memory does
not depend on what the weights learned): `export_onnx` writes its ONNX graph, its item table is
the index's vectors, and `make_bundle` publishes it (its default index for the size, recall gate included).
Two identical versions go under one root; `sine serve` runs on it alone, then with
`SINE_ARMS={"v2": 0.5}`, each asked a few requests before its RSS is read.

    python -m benchmarks.arms_memory --items 1000000
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack

D, N = 128, 20


def build_export(out: Path, items: int) -> None:
    """An export folder for `make_bundle`: encoder.onnx, items.npy, queries.npy, item_ids.json,
    popularity.npy and export.json, for a random SASRec over `items` ids."""
    import torch

    from model_export.configs import SASRecConfig
    from model_export.export import export_onnx, item_table, library_versions
    from model_export.models.sasrec import SASRec

    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=items, D=D, n=N)
    model = SASRec(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "encoder.onnx")
    table = item_table(model)
    np.save(out / "items.npy", table)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        windows = torch.from_numpy(rng.integers(1, items + 1, size=(500, N)))
        queries = model(windows)[1].numpy().astype(np.float32)            # user vectors [q, D]
    np.save(out / "queries.npy", queries)
    ids = ["<pad>", *(str(i) for i in range(1, items + 1))]
    (out / "item_ids.json").write_text(json.dumps(ids))
    np.save(out / "popularity.npy", np.arange(items + 1, dtype=np.int64)[::-1].copy())
    import hashlib
    h = hashlib.sha256()
    for x in ids:
        h.update(x.encode())
        h.update(b"\n")
    info = {"model": {"n_items": items, "D": D, "n": N, "blocks": cfg.blocks, "heads": cfg.heads,
                      "dropout": cfg.dropout, "arch": "sasrec", "K": 1, "ln_eps": cfg.ln_eps},
            "dataset": {"name": f"synthetic-{items}", "items": items},
            "onnx": {"file": "encoder.onnx", "opset": 18, "input": "item_ids",
                     "outputs": ["interests", "user_vector", "weights"], "graph": "plain"},
            "items": {"count": items, "vocab_sha256": h.hexdigest()},
            "offline_metrics": None, "libraries": library_versions()}
    (out / "export.json").write_text(json.dumps(info))


def rss_after_requests(stack: Stack, root: Path, log: Path, **settings: object) -> float:
    srv = stack.serve(root, log_path=log, watch_interval_s=0, **settings)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for u in range(64):                    # both arms answer (the hash splits the users)
            c.post("/recommend", json={"user_id": f"u{u}", "n": 10}).raise_for_status()
    time.sleep(1.0)
    rss = srv.rss_bytes() / 2**20
    srv.stop()
    stack.servers.remove(srv)
    return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    from index_builder.make import make_bundle

    tmp = Path(tempfile.mkdtemp(prefix="sine-arms-"))
    try:
        t0 = time.perf_counter()
        build_export(tmp / "export", a.items)
        root = tmp / "bundles"
        make_bundle(tmp / "export", root, version="v1", log=lambda *x: None)
        make_bundle(tmp / "export", root, version="v2", make_current=False, log=lambda *x: None)
        built = time.perf_counter() - t0
        sizes = {f.name: f.stat().st_size / 2**20 for f in (root / "v1").iterdir()}
        with Stack() as stack:
            one = rss_after_requests(stack, root, tmp / "one.log")
            two = rss_after_requests(stack, root, tmp / "two.log", arms=json.dumps({"v2": 0.5}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = f"python -m benchmarks.arms_memory --items {a.items}"
    md = [f"# What an arm costs in memory ({a.items:,} items)", "",
          f"{now()}; commit {git_commit()[:10]}; `{cmd}`; {machine()['cpus']} CPUs; bundles "
          f"built in {built:.0f} s. A SASRec-shaped encoder (D = {D}, n = {N}, random weights) "
          "and the index `make_bundle` picks by default at this size; the arm is a second "
          "version of the same size.", "",
          "| server | RSS MiB |", "|---|---|",
          f"| one bundle | {one:,.0f} |", f"| the bundle and one arm (`SINE_ARMS`) | {two:,.0f} |",
          f"| an arm's cost | {two - one:,.0f} |", "",
          "The bundle's files (MiB): " + ", ".join(f"`{k}` {v:,.1f}" for k, v in sorted(sizes.items())
                                                  if v >= 0.1) + "."]
    write_results(a.out, "arms-memory", {"items": a.items, "rss_mib": {"one": one, "two": two},
                                         "arm_mib": two - one, "files_mib": sizes,
                                         "command": cmd, "machine": machine(),
                                         "commit": git_commit(), "when": now()}, md)


if __name__ == "__main__":
    main()
