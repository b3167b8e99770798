"""`sine`: the project's command line. Subcommands import their heavy modules lazily."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DATA_DIR_ENV = "SINE_DATA_DIR"


class CliError(Exception):
    """A usage or environment problem; printed as one line, exit code 2."""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-1m",
                   help="ml-1m, amazon-beauty, ml-100k, synthetic, or the path of a click log "
                        "(.csv/.parquet with user_id,item_id,timestamp). Default: ml-1m")
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"folder holding the data sets (env {DATA_DIR_ENV}; default ../shared/data)")
    p.add_argument("--drop-short-users", action="store_true",
                   help="skip users with fewer than 3 interactions instead of failing")
    p.add_argument("--seed", type=int, default=42, help="random seed (data generator and training)")


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("error: this command needs the training extra: pip install -e '.[train]'")


def cmd_train(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export import data
    from model_export.train import TrainConfig, train
    from model_export.workflow import evaluate_checkpoint, model_config

    ds = data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)
    print(ds.summary())
    mcfg = model_config(ds, K=a.K, L=a.L, D=a.D, n=a.seq_len, tau=a.tau, tau_assign=a.tau_assign,
                        literal=a.literal or None, aggregation=a.aggregation)
    tcfg = TrainConfig(batch_size=a.batch_size, lr=a.lr, lam=a.lam, loss=a.loss,
                       num_negatives=a.num_negatives, max_epochs=a.epochs, patience=a.patience,
                       max_minutes=a.max_minutes, seed=a.seed, threads=a.threads, device=a.device)
    out = Path(a.out or f"runs/{ds.name}")
    res = train(ds, mcfg, tcfg, out, resume=a.resume, progress=not a.no_progress)
    print(f"stopped ({res.stopped_because}) after {res.epochs_run} epochs, {res.seconds:.0f} s; "
          f"best epoch {res.best_epoch}")
    result = evaluate_checkpoint(out / "best.pt", ds, out)
    _print_metrics(result)
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export import data
    from model_export.workflow import evaluate_checkpoint

    ds = data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)
    out = Path(a.report_dir) if a.report_dir else Path(a.checkpoint).parent
    result = evaluate_checkpoint(Path(a.checkpoint), ds, out, exclude_history=not a.keep_history)
    _print_metrics(result)
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export import data
    from model_export.export import export

    ds = data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)
    export(Path(a.checkpoint), ds, Path(a.out), opset=a.opset, n_queries=a.queries)
    return 0


def cmd_build_index(a: argparse.Namespace) -> int:
    from index_builder.make import make_bundle

    params = {}
    for kv in a.search_param or []:
        k, _, v = kv.partition("=")
        if not v:
            sys.exit(f"error: --search-param takes NAME=VALUE, got {kv!r}")
        params[k] = int(v)
    bar = _progress_bar("adding items")
    b = make_bundle(Path(a.export), Path(a.bundle_root), a.factory, a.recall_k, a.recall_floor,
                    params or None, a.gpu, a.version, not a.no_current, progress=bar)
    print(f"bundle {b.version}: {b.manifest['index']['factory']} "
          f"{b.manifest['index']['search_params']} recall@{b.manifest['index']['recall']['k']} "
          f"{b.manifest['index']['recall']['value']:.4f}")
    return 0


def _settings(**overrides):
    """Service Settings from SINE_* env vars, with the command line's values on top."""
    from pydantic import ValidationError

    from service.settings import Settings
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise CliError(f"invalid settings: {msgs}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from index_builder import bundle as bundle_mod
    from service.app import create_app
    from service.logs import configure

    s = _settings(bundle=a.bundle, host=a.host, port=a.port, redis_url=a.redis_url)
    bundle_mod.load(s.bundle, verify_hashes=True, deep=False)    # fail fast with the reason
    configure(s.log_level)
    uvicorn.run(create_app(s), host=s.host, port=s.port, log_config=None,
                access_log=s.access_log, timeout_graceful_shutdown=int(s.shutdown_grace_s) or None)
    return 0


def cmd_load_histories(a: argparse.Namespace) -> int:
    import asyncio

    from model_export import data
    from service.history import bulk_load, redis_client

    s = _settings(redis_url=a.redis_url, history_keep=a.keep)
    if not s.redis_url:
        raise CliError("no Redis: pass --redis-url or set SINE_REDIS_URL")
    ds = data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)
    if a.holdout < 0:
        raise CliError("--holdout must be >= 0")

    def rows():
        for u, seq in zip(ds.user_ids, ds.sequences):
            items = seq[: len(seq) - a.holdout] if a.holdout else seq
            yield u, [ds.item_ids[int(i)] for i in items]

    bar = _progress_bar("users")
    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        if bar:
            bar(done[0], len(ds.sequences))

    async def run() -> int:
        client = redis_client(s, timeout_s=30.0)
        try:
            return await bulk_load(client, s.redis_key_template, rows(), s.history_keep,
                                   progress=progress)
        finally:
            await client.aclose()

    try:
        n = asyncio.run(run())
    except OSError as e:
        raise CliError(f"Redis at {s.redis_url_redacted()}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("redis"):
            raise CliError(f"Redis at {s.redis_url_redacted()}: {e}") from None
        raise
    print(f"loaded {n} histories (newest {s.history_keep} clicks each"
          f"{f', last {a.holdout} held out' if a.holdout else ''}) into {s.redis_url_redacted()}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    _need_torch()
    from service.demo import run_demo
    from service.local import LocalError

    try:
        return run_demo(a.dataset, a.data_dir, Path(a.workdir), a.train_minutes, a.rebuild,
                        a.redis_url, a.port, serve_forever=not a.no_wait)
    except LocalError as e:
        raise CliError(str(e)) from None


def cmd_fetch_bundle(a: argparse.Namespace) -> int:
    from index_builder.fetch import fetch

    b = fetch(a.url, a.version, Path(a.bundle_root), progress=_progress_bar("downloading", "B"))
    print(f"bundle {b.version} ready in {b.path}; {Path(a.bundle_root) / 'current'} names it")
    return 0


def _progress_bar(desc: str, unit: str = "item"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                                leave=False)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return update


def _print_metrics(result: dict) -> None:
    from model_export.report import metrics_table
    for which, rows in result["metrics"].items():
        print(f"\n{which} (percent)\n{metrics_table(rows)}")
    c = result.get("concepts") or {}
    if "nmi" in c:
        print(f"\nNMI(nearest prototype, {c['label_kind']}) = {c['nmi']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sine", description="SINE candidate retrieval: train, "
                                "evaluate, export and serve a sparse-interest recommender.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train SINE with early stopping, then evaluate and report",
                       description="Train SINE on a data set (leave-one-out split), keep the best "
                       "validation checkpoint, then evaluate it on the test split and write "
                       "report.md, curves.png and metrics.json next to the checkpoints.")
    _data_args(t)
    t.add_argument("--out", help="output folder (default runs/<dataset>)")
    g = t.add_argument_group("model (paper symbols)")
    g.add_argument("--K", type=int, help="activated intentions per user (Table 3: 4)")
    g.add_argument("--L", type=int, help="prototype pool size (Table 3: ML-1M 50, Amazon 500)")
    g.add_argument("--D", type=int, default=128, help="embedding size (default 128)")
    g.add_argument("--seq-len", type=int, default=20, help="clicks per input window, n (default 20)")
    g.add_argument("--tau", type=float, default=0.1, help="Eq. 7 temperature (default 0.1)")
    g.add_argument("--tau-assign", type=float, default=0.1, help="Eq. 3 cosine temperature (default 0.1)")
    g.add_argument("--literal", action="store_true",
                   help="Eq. 3 and 7 as raw LayerNorm dot products, as printed in the paper")
    g.add_argument("--aggregation", choices=["adaptive", "mean"], default="adaptive",
                   help="adaptive: Eq. 6-8 (default); mean: average of the K interests (ablation)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="maximum epochs (default 30)")
    g.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs without a validation NDCG@10 gain (default 3)")
    g.add_argument("--batch-size", type=int, default=128, help="default 128")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--lam", type=float, default=0.5, help="Eq. 11 lambda (default 0.5)")
    g.add_argument("--loss", choices=["auto", "full", "sampled"], default="auto",
                   help="full softmax, sampled softmax with logQ correction, or auto: full up to "
                        "50,000 items (default)")
    g.add_argument("--num-negatives", type=int, default=1280,
                   help="shared negatives per batch for the sampled loss (default 1280)")
    g.add_argument("--max-minutes", type=float, help="wall-clock budget; stops after the epoch")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint with the paper's protocol",
                       description="Full-ranking leave-one-out evaluation (HR/NDCG@10/50/100) of a "
                       "checkpoint on valid and test, beside popularity, plus the concept analyses; "
                       "writes report.md, curves.png and metrics.json.")
    _data_args(e)
    e.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `sine train`")
    e.add_argument("--report-dir", help="where to write the report (default: the checkpoint's folder)")
    e.add_argument("--keep-history", action="store_true",
                   help="do not exclude the user's past items from the ranking")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a checkpoint: ONNX encoder, item table, ids, popularity",
                       description="Write the user encoder to ONNX (checked against PyTorch), the item "
                       "table, the id map, training popularity and a sample of real user vectors "
                       "(validation histories) to an export folder for `sine build-index`.")
    _data_args(x)
    x.add_argument("--checkpoint", required=True, help="a best.pt written by `sine train`")
    x.add_argument("--out", required=True, help="export folder to write")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    x.add_argument("--queries", type=int, default=2000,
                   help="user vectors kept for the recall check (default 2000)")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("build-index", help="build the faiss index, gate it on recall, publish a bundle",
                       description="Build an inner-product faiss index over an export's item table, "
                       "measure recall@k against exact search on real user vectors, tune the search "
                       "knob up to the floor (or refuse), and publish <bundle-root>/<version> "
                       "atomically, pointing <bundle-root>/current at it.")
    b.add_argument("--export", required=True, help="folder written by `sine export`")
    b.add_argument("--bundle-root", required=True, help="folder holding bundle versions")
    b.add_argument("--factory", default="auto",
                   help="faiss factory string (Flat, HNSW32,Flat, IVF4096,Flat, IVF4096,PQ32, ...) "
                        "or auto: Flat up to 50,000 items, IVF with ~4 sqrt(N) lists and 8-bit "
                        "codes above (default auto)")
    b.add_argument("--recall-k", type=int, default=100, help="k of the recall check (default 100)")
    b.add_argument("--recall-floor", type=float, default=0.95,
                   help="refuse to write an index below this recall@k (default 0.95)")
    b.add_argument("--search-param", action="append", metavar="NAME=VALUE",
                   help="fix a search knob (efSearch=128, nprobe=64) instead of tuning it")
    b.add_argument("--gpu", action="store_true", help="build on a GPU with faiss-gpu")
    b.add_argument("--version", help="version name (default: UTC time + vocabulary hash)")
    b.add_argument("--no-current", action="store_true", help="publish without moving `current`")
    b.set_defaults(func=cmd_build_index)

    v = sub.add_parser("serve", help="serve POST /recommend (settings from SINE_* variables)",
                       description="Start the retrieval service with uvicorn. Every setting is a "
                       "SINE_* environment variable (see the README's table); these flags override "
                       "the most common ones.")
    v.add_argument("--bundle", help="bundle root or bundle folder (SINE_BUNDLE)")
    v.add_argument("--host", help="bind address (SINE_HOST, default 127.0.0.1)")
    v.add_argument("--port", type=int, help="port (SINE_PORT, default 8000)")
    v.add_argument("--redis-url", help="history store (SINE_REDIS_URL); unset: cold start only")
    v.set_defaults(func=cmd_serve)

    h = sub.add_parser("load-histories", help="bulk-load user histories into Redis",
                       description="Write each user's newest clicks from a data set or click log "
                       "into Redis lists (newest first), pipelined, replacing what was there.")
    _data_args(h)
    h.add_argument("--redis-url", help="target Redis (SINE_REDIS_URL)")
    h.add_argument("--keep", type=int, help="clicks kept per user (SINE_HISTORY_KEEP, default 20)")
    h.add_argument("--holdout", type=int, default=0,
                   help="leave out each user's last N clicks (1: everything before the test "
                        "target, as the offline evaluation sees it; default 0)")
    h.set_defaults(func=cmd_load_histories)

    d = sub.add_parser("demo", help="the whole system in one command: bundle, Redis, service",
                       description="Build a bundle (a short SINE run on ML-1M when the data folder "
                       "has it, else on synthetic data; reused on later runs), start an embedded "
                       "redis-server unless --redis-url is given, load the histories, start the "
                       "service, print a sample answer, and serve until Ctrl-C.")
    d.add_argument("--dataset", default="auto",
                   help="auto (ml-1m when present, else synthetic), or any `sine train` data set")
    d.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"folder holding the data sets (env {DATA_DIR_ENV}; default ../shared/data)")
    d.add_argument("--workdir", default="runs/demo", help="where the bundle and logs go")
    d.add_argument("--train-minutes", type=float, default=3.0,
                   help="training budget when a bundle is built (default 3)")
    d.add_argument("--rebuild", action="store_true", help="train a new bundle even if one exists")
    d.add_argument("--redis-url", help="use this Redis instead of starting one")
    d.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    d.add_argument("--no-wait", action="store_true",
                   help="stop after the sample answer instead of serving until Ctrl-C")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fetch-bundle", help="download a bundle version into a bundle root",
                       description="Download <url>/<version>.tar.gz (or a URL with {version} in it), "
                       "validate it and publish it atomically under <bundle-root>/<version>, "
                       "pointing `current` at it. A version already present is only re-pointed.")
    f.add_argument("--url", required=True, help="HTTP(S) base URL of the published bundles")
    f.add_argument("--version", required=True, help="bundle version to fetch")
    f.add_argument("--bundle-root", required=True, help="local bundle root")
    f.set_defaults(func=cmd_fetch_bundle)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model_export.data import DataError
    try:
        from model_export.train import CheckpointError
    except ImportError:  # pragma: no cover - service-only installs have no torch
        CheckpointError = ValueError  # type: ignore[misc,assignment]
    from index_builder.build import IndexBuildError
    from index_builder.bundle import BundleError
    try:
        return args.func(args)
    except (DataError, CheckpointError, BundleError, IndexBuildError, CliError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch is in last.pt (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
