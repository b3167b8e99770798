"""`sine demo`: the whole system on one machine, in one command.

Builds a bundle (a short SINE run on ML-1M when the data folder has it, else on the synthetic
generator), reuses it on the next run, starts an embedded redis-server (unless a Redis URL is
given) and loads the histories, starts `sine serve`, prints a sample answer, and serves until
Ctrl-C; then stops what it started.
"""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

from .local import LocalError, Stack, ensure_redis_server


def build_bundle(ds, root: Path, minutes: float, log=print) -> None:
    """Train briefly, export, index, publish under `root` (makes it `current`)."""
    from index_builder.make import make_bundle
    from model_export.export import export
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config

    run = root.parent / "train"
    shutil.rmtree(run, ignore_errors=True)
    log(f"training SINE on {ds.name} for at most {minutes:g} min ...")
    train(ds, model_config(ds), TrainConfig(max_epochs=20, max_minutes=minutes, patience=2),
          run, progress=True, log=log)
    log("exporting the encoder to ONNX and building the faiss index ...")
    export(run / "best.pt", ds, root.parent / "export", log=log)
    make_bundle(root.parent / "export", root, log=log)


def sample(url: str, user: str, titles: dict[str, str], n: int = 10) -> str:
    req = urllib.request.Request(url + "/recommend", method="POST",
                                 data=json.dumps({"user_id": user, "n": n}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.load(r)
    lines = [f"POST /recommend {{\"user_id\": \"{user}\", \"n\": {n}}} -> bundle {body['version']}"
             f", fallback {body['fallback']}"]
    for rank, it in enumerate(body["items"], 1):
        t = titles.get(it["item_id"])
        lines.append(f"  {rank:2d}. {it['item_id']:>8}  {it['score']:7.3f}" + (f"  {t}" if t else ""))
    return "\n".join(lines)


def run_demo(dataset: str, data_dir: str | None, workdir: Path, minutes: float, rebuild: bool,
             redis_url: str | None, port: int, serve_forever: bool, log=print) -> int:
    from index_builder import bundle as bundle_mod
    from model_export import data

    if dataset == "auto":
        have = (Path(data_dir) if data_dir else data.default_data_dir()) / "ml-1m"
        dataset = "ml-1m" if have.exists() else "synthetic"
        log(f"data: MovieLens-1M from {have}" if dataset == "ml-1m"
            else f"data: no ML-1M at {have}; using the synthetic generator")
    if redis_url is None:
        ensure_redis_server(log)
    ds = data.load(dataset, data_dir)
    log(ds.summary())
    root = workdir / "bundles"
    current = None
    if not rebuild and (root / bundle_mod.CURRENT).exists():
        try:
            b = bundle_mod.load(root, deep=False)
            if b.manifest["items"]["vocab_sha256"] == ds.vocab_sha256():
                current = b
                log(f"reusing bundle {b.version} in {root} (--rebuild to train again)")
            else:
                log(f"the bundle in {root} was built on other data; building a new one")
        except bundle_mod.BundleError as e:
            log(f"the bundle in {root} is unusable ({e}); building a new one")
    if current is None:
        build_bundle(ds, root, minutes, log)

    stack = None
    try:
        stack = Stack(data.histories(ds), redis_url=redis_url)
        if redis_url is None:
            log(f"started redis-server on {stack.redis_url} (temporary, no persistence)")
        log(f"loaded {stack.loaded} histories into {stack.redis_url}")
        server = stack.serve(root, log_path=workdir / "server.log", port=port)
        titles = {ds.item_ids[i]: t for i, t in ds.titles.items()}
        log("")
        log(sample(server.url, ds.user_ids[0], titles))
        log("")
        log(f"serving on {server.url}  (logs: {workdir / 'server.log'})")
        log(f"  API docs: {server.url}/docs")
        log(f"  metrics:  {server.url}/metrics")
        log(f"  try:      curl -s {server.url}/recommend -H 'content-type: application/json' "
            f"-d '{{\"user_id\": \"{ds.user_ids[1]}\", \"n\": 10}}'")
        if serve_forever:
            log("Ctrl-C stops the service and everything this command started.")
            assert server.proc is not None
            while server.proc.poll() is None:
                time.sleep(0.5)
            if server.proc.returncode == 0:
                # a clean shutdown: Ctrl-C in a terminal reaches the server (the whole process
                # group) before or as it reaches this loop; a signal to it alone does the same
                log("\nthe service stopped; stopping the rest ...")
                return 0
            raise LocalError(f"the server exited (code {server.proc.returncode}); "
                             f"see {workdir / 'server.log'}")
        return 0
    except KeyboardInterrupt:
        log("\nstopping ...")
        return 0
    finally:
        if stack is not None:
            stack.close()
