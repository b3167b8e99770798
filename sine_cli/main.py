"""The `sine` command: each subcommand parses its arguments and calls one library function.

Nothing heavy is imported up front: `sine serve` loads the service and never torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

DATA_DIR_ENV = "SINE_DATA_DIR"

# The errors a command raises for bad input or a bad environment: printed as one line, exit 2.
# An error class can only have been raised once its module is loaded, so none is imported here.
USER_ERRORS = {"model_export.data": "DataError", "model_export.training": "CheckpointError",
               "model_export.freshness.clicklog": "ClickLogError",
               "model_export.export": "ExportError", "index_builder.bundle": "BundleError",
               "index_builder.build": "IndexBuildError", "service.settings": "SettingsError",
               "service.history": "HistoryError", "devtools.local": "LocalError"}


# what a serving-only install (the container image) leaves out
OPTIONAL_PARTS = {"torch", "onnx", "model_export", "index_builder", "devtools", "matplotlib", "pyarrow"}


class CliError(Exception):
    """A usage or environment problem; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules]
    return (CliError, *loaded)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-1m",
                   help="ml-1m, amazon-beauty, ml-100k, synthetic, synthetic-mix, or the path of a click log "
                        "(.csv/.parquet with user_id,item_id,timestamp). Default: ml-1m")
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"folder holding the data sets (env {DATA_DIR_ENV}; default ../shared/data)")
    p.add_argument("--drop-short-users", action="store_true",
                   help="skip users with fewer than 3 interactions instead of failing")
    p.add_argument("--seed", type=int, default=42, help="random seed (data generator and training)")


def _nonnegative(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise CliError("this command needs the training extra: pip install -e '.[train]'")


def _dataset(a: argparse.Namespace):
    from model_export import data
    return data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)


def cmd_train(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export.training import TrainConfig
    from model_export.training.workflow import model_config, train_and_report

    ds = _dataset(a)
    if a.clicks:
        from model_export import data
        from model_export.data import newest_click, read_clicks
        newest = newest_click(a.clicks)
        if newest is not None:                  # the window alone is read
            rows = read_clicks(a.clicks, since=newest - a.clicks_window_hours * 3600)
            ds = data.extend(ds, [(u, i, ts) for u, i, ts, _ in rows])
    print(ds.summary())
    if a.warm_start:                         # the shape of the model it starts from
        from model_export.training import config_from_args, warm_start_source
        shape = warm_start_source(a.warm_start)["model_args"]
        mcfg = config_from_args({**shape, "n_items": ds.n_items})
    elif a.arch == "sasrec":
        sine_only = [f"--{k.replace('_', '-')}" for k in ("K", "L", "literal") if getattr(a, k)]
        if sine_only or a.aggregation != "adaptive":
            raise CliError(f"{', '.join(sine_only) or '--aggregation'}: SINE's options; SASRec "
                           "takes --blocks, --heads and --dropout")
        mcfg = model_config(ds, "sasrec", D=a.D, n=a.seq_len, blocks=a.blocks, heads=a.heads,
                            dropout=a.dropout)
    else:
        mcfg = model_config(ds, K=a.K, L=a.L, D=a.D, n=a.seq_len, tau=a.tau,
                            tau_assign=a.tau_assign, literal=a.literal or None,
                            aggregation=a.aggregation)
    tcfg = TrainConfig(batch_size=a.batch_size, lr=a.lr, lam=a.lam, loss=a.loss,
                       num_negatives=a.num_negatives, max_epochs=a.epochs, patience=a.patience,
                       max_minutes=a.max_minutes, seed=a.seed, threads=a.threads, device=a.device)
    out = Path(a.out or f"runs/{ds.name}")
    if a.resume and a.warm_start:
        raise CliError("--resume continues a run; --warm-start begins one: give one of them")
    _, result = train_and_report(ds, mcfg, tcfg, out, resume=a.resume, progress=not a.no_progress,
                                 warm_start_from=a.warm_start)
    if not result:                           # a torchrun rank other than 0
        return 0
    _print_metrics(result)
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export.training.workflow import evaluate_checkpoint

    ds = _dataset(a)
    out = Path(a.report_dir) if a.report_dir else Path(a.checkpoint).parent
    _print_metrics(evaluate_checkpoint(Path(a.checkpoint), ds, out,
                                       exclude_history=not a.keep_history))
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    _need_torch()
    from model_export.export import export

    export(Path(a.checkpoint), _dataset(a), Path(a.out), opset=a.opset, n_queries=a.queries,
           graph=a.graph, fold_budget_mb=a.fold_budget_mb)
    return 0


def _search_params(pairs: list[str] | None) -> dict[str, int]:
    params = {}
    for kv in pairs or []:
        k, _, v = kv.partition("=")
        try:
            params[k] = int(v)
        except ValueError:
            raise CliError(f"--search-param takes NAME=INTEGER, got {kv!r}") from None
    return params


def cmd_build_index(a: argparse.Namespace) -> int:
    from index_builder.make import make_bundle

    b = make_bundle(Path(a.export), Path(a.bundle_root), a.factory, a.recall_k, a.recall_floor,
                    _search_params(a.search_param) or None, a.gpu, a.version, not a.no_current,
                    progress=_progress_bar("adding items"), memory_budget_mb=a.memory_budget_mb)
    idx = b.manifest["index"]
    print(f"bundle {b.version}: {idx['factory']} {idx['search_params']} "
          f"recall@{idx['recall']['k']} {idx['recall']['value']:.4f}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from service.server import serve
    from service.settings import settings_from

    serve(settings_from(bundle=a.bundle, host=a.host, port=a.port, redis_url=a.redis_url))
    return 0


def cmd_load_histories(a: argparse.Namespace) -> int:
    from model_export import data
    from service.history import load_histories
    from service.settings import settings_from

    s = settings_from(redis_url=a.redis_url, history_keep=a.keep)
    if not s.redis_url:
        raise CliError("no Redis: pass --redis-url or set SINE_REDIS_URL")
    ds = _dataset(a)
    n = load_histories(s, data.histories(ds, a.holdout), ds.n_users, _progress_bar("users"))
    held = f", last {a.holdout} held out" if a.holdout else ""
    print(f"loaded {n} histories (newest {s.history_keep} clicks each{held}) into "
          f"{s.redis_url_redacted()}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    _need_torch()
    from devtools.demo import run_demo

    return run_demo(a.dataset, a.data_dir, Path(a.workdir), a.train_minutes, a.rebuild,
                    a.redis_url, a.port, serve_forever=not a.no_wait)


def cmd_fetch_bundle(a: argparse.Namespace) -> int:
    from index_builder.fetch import Limits, fetch

    limits = Limits(archive_bytes=a.max_archive_bytes, total_bytes=a.max_unpacked_bytes,
                    file_bytes=a.max_file_bytes, members=a.max_members, timeout_s=a.timeout_s)
    b = fetch(a.url, a.version, Path(a.bundle_root), sha256=a.sha256, allow_http=a.allow_http,
              limits=limits, progress=_progress_bar("downloading", "B"))
    print(f"bundle {b.version} ready in {b.path}; {Path(a.bundle_root) / 'current'} names it")
    return 0


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="the Redis holding the click log (SINE_REDIS_URL)")
    p.add_argument("--stream", help="click log stream (SINE_CLICK_STREAM_KEY)")
    p.add_argument("--redis-cluster", action="store_true", default=None,
                   help="--redis-url is a node of a Redis Cluster (SINE_REDIS_CLUSTER)")
    p.add_argument("--shards", type=int, help="hash-tag shards of the log: its streams are "
                   "{s0}:STREAM ... (SINE_REDIS_SHARDS; default 16 on a cluster, else 0)")
    p.add_argument("--group", help="consumer group (SINE_CLICK_EXPORT_GROUP)")


def _log_settings(a: argparse.Namespace):
    from service.settings import settings_from

    s = settings_from(redis_url=a.redis_url, click_stream_key=a.stream,
                      redis_cluster=a.redis_cluster, redis_shards=a.shards,
                      click_export_group=a.group)
    if not s.redis_url:
        raise CliError("no Redis: pass --redis-url or set SINE_REDIS_URL")
    return s


def cmd_export_clicks(a: argparse.Namespace) -> int:
    from model_export.freshness.clicklog import EXIT_LOST, export_clicks
    from service.history import Keys

    s = _log_settings(a)
    res = export_clicks(s.redis_url, a.out, Keys(s).streams(), s.click_export_group, a.consumer,
                        s.redis_password.get_secret_value() if s.redis_password else None,
                        cluster=s.redis_cluster, claim_idle_s=a.claim_idle_s)
    print(f"read {res.read} entries ({res.taken_over} taken over from an unfinished run), wrote "
          f"{res.written} clicks in {len(res.files)} files, skipped {res.skipped} already "
          f"written, in {res.seconds:.1f} s -> {a.out}")
    if res.rejected:
        print(f"warning: {res.rejected} entries are not clicks; set aside in "
              f"{', '.join(res.rejected_files)}", file=sys.stderr)
    if res.lost:
        print(f"error: {res.lost} clicks were lost before they could be exported "
              f"({res.lost_to_cap} removed unexported by the cap, {res.gap} deleted before the "
              f"export read them, {res.vanished} deleted after it read them)", file=sys.stderr)
        return EXIT_LOST
    return 0


def cmd_refresh(a: argparse.Namespace) -> int:
    _need_torch()
    import json

    from model_export.freshness.refresh import EXIT, RefreshConfig, refresh
    from service.history import Keys

    s = _log_settings(a)
    report = refresh(RefreshConfig(
        bundle_root=a.bundle_root, dataset=a.dataset, data_dir=a.data_dir, redis_url=s.redis_url,
        redis_password=s.redis_password.get_secret_value() if s.redis_password else None,
        streams=tuple(Keys(s).streams()), redis_cluster=s.redis_cluster,
        group=s.click_export_group, clicks_dir=a.clicks_dir,
        work_dir=a.work_dir, window_hours=a.window_hours, train_minutes=a.train_minutes,
        max_epochs=a.epochs, from_scratch=a.from_scratch, tolerance=a.tolerance, k=a.k,
        archive_dir=a.archive_dir, threads=a.threads, seed=a.seed,
        keep_versions=a.keep_versions, clicks_retention_hours=a.clicks_retention_hours),
        log=lambda msg: print(msg, file=sys.stderr))           # stdout: the report alone
    print(json.dumps(vars(report), indent=1))
    return EXIT[report.outcome]


def _progress_bar(desc: str, unit: str = "item") -> Callable[[int, int], None]:
    from tqdm.auto import tqdm

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                                leave=False)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return update


def _print_metrics(result: dict) -> None:
    from model_export.evaluation.report import metrics_table
    for which, rows in result["metrics"].items():
        print(f"\n{which} (percent)\n{metrics_table(rows)}")
    c = result.get("concepts") or {}
    if "nmi" in c:
        print(f"\nNMI(nearest prototype, {c['label_kind']}) = {c['nmi']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sine", description="SINE candidate retrieval: train, "
                                "evaluate, export and serve a sparse-interest recommender.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train SINE (or SASRec) with early stopping, then evaluate and report",
                       description="Train SINE on a data set (leave-one-out split), keep the best "
                       "validation checkpoint, then evaluate it on the test split and write "
                       "report.md, curves.png and metrics.json next to the checkpoints.")
    _data_args(t)
    t.add_argument("--out", help="output folder (default runs/<dataset>)")
    g = t.add_argument_group("model (paper symbols)")
    g.add_argument("--arch", choices=["sine", "sasrec"], default="sine",
                   help="sine (default), or the single-vector SASRec baseline (a K = 1 bundle)")
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
    g = t.add_argument_group("SASRec (--arch sasrec)")
    g.add_argument("--blocks", type=int, help="self-attention blocks (default 2)")
    g.add_argument("--heads", type=int, help="attention heads (default 1)")
    g.add_argument("--dropout", type=float,
                   help="dropout (default 0.2; 0.5 on amazon-beauty)")
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
    g.add_argument("--max-minutes", type=float,
                   help="wall-clock budget; once spent, the epoch ends, is validated and checkpointed")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = t.add_argument_group("fresh data")
    g.add_argument("--warm-start", type=Path, metavar="CHECKPOINT_OR_BUNDLE",
                   help="start from a trained model (a best.pt, or a bundle holding model.pt) "
                        "instead of the initialization; its items keep their rows, new items start "
                        "at the mean of the old rows plus noise; the model flags are taken from it")
    g.add_argument("--clicks", type=Path, metavar="FOLDER",
                   help="append the clicks of a `sine export-clicks` folder to --dataset")
    g.add_argument("--clicks-window-hours", type=float, default=24.0 * 7,
                   help="use the clicks of the last this many hours before the newest (default 168)")
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
    x.add_argument("--graph", choices=["auto", "folded", "plain"], default="auto",
                   help="folded: the item-side products of Eq. 1, 3, 4 precomputed into per-item "
                        "tables (fast, (2 + K) D floats per item); plain: computed per request; "
                        "auto: folded when the tables fit --fold-budget-mb (default auto)")
    x.add_argument("--fold-budget-mb", type=float, default=1024.0,
                   help="largest table memory auto folds (default 1024)")
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
    b.add_argument("--memory-budget-mb", type=float, default=None,
                   help="index codes one pod should hold; past it the build warns and says how "
                        "many shards to split the catalog into (default 1024)")
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
    h.add_argument("--holdout", type=_nonnegative, default=0,
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
                       description="Download <url>/<version>.tar.gz (or a URL with {version} in it) "
                       "into the bundle root, check its size and optional sha256, unpack its "
                       "regular files (no links, within the limits below), validate every hash "
                       "and publish it atomically under <bundle-root>/<version>, pointing "
                       "`current` at it. A version already present is only re-pointed.")
    from index_builder.fetch import Limits  # its defaults, not restated here
    lim = Limits()
    f.add_argument("--url", required=True, help="https:// base URL of the published bundles")
    f.add_argument("--version", required=True, help="bundle version to fetch")
    f.add_argument("--bundle-root", required=True, help="local bundle root")
    f.add_argument("--sha256", help="expected sha256 of the archive, checked before unpacking")
    f.add_argument("--allow-http", action="store_true",
                   help="accept a plain http:// URL (only on a network you trust)")
    f.add_argument("--timeout-s", type=float, default=lim.timeout_s,
                   help=f"deadline of the whole download (default {lim.timeout_s:g})")
    f.add_argument("--max-archive-bytes", type=int, default=lim.archive_bytes,
                   help=f"largest archive downloaded (default {lim.archive_bytes})")
    f.add_argument("--max-unpacked-bytes", type=int, default=lim.total_bytes,
                   help=f"largest total of its files unpacked (default {lim.total_bytes})")
    f.add_argument("--max-file-bytes", type=int, default=lim.file_bytes,
                   help=f"largest single file (default {lim.file_bytes})")
    f.add_argument("--max-members", type=int, default=lim.members,
                   help=f"most members of the archive (default {lim.members})")
    f.set_defaults(func=cmd_fetch_bundle)

    c = sub.add_parser("export-clicks", help="move the click log from Redis into Parquet",
                       description="Read the click log stream through a consumer group and write "
                       "partitioned Parquet (date=/hour=; user_id,item_id,timestamp,event_id), "
                       "each file atomically, acknowledging entries only once written. A rerun "
                       "after a crash takes over the pending entries and skips those written. "
                       "Entries that are not clicks are set aside in <out>/rejected/. Exit 5: "
                       "clicks were lost before they could be exported (removed by the cap, "
                       "or deleted), each counted.")
    _log_args(c)
    c.add_argument("--out", type=Path, required=True, help="folder of the exported clicks")
    c.add_argument("--consumer", help="consumer name in the group (default export-<host>)")
    c.add_argument("--claim-idle-s", type=float, default=60.0,
                   help="take over another consumer's unacknowledged entries once idle this "
                        "long (default 60): a live exporter's are never taken")
    c.set_defaults(func=cmd_export_clicks)

    r = sub.add_parser("refresh", help="export clicks, warm-start, gate and publish a bundle",
                       description="One refresh cycle: export the click log, warm-start training "
                       "on the base data plus the new clicks, export and index a candidate, score "
                       "it and the live bundle on each active user's last click, and publish it "
                       "(current, and a .tar.gz with --archive-dir) only if its HR@k is not worse "
                       "by more than --tolerance. Exit 0: published; 3: refused by the gate; 4: "
                       "nothing new; 2: an error. The report goes to <bundle-root>/refresh.json.")
    _data_args(r)
    _log_args(r)
    r.add_argument("--bundle-root", type=Path, required=True, help="the live bundle root")
    r.add_argument("--clicks-dir", type=Path, required=True,
                   help="where the exported clicks accumulate (kept between runs)")
    r.add_argument("--work-dir", type=Path, default=Path("runs/refresh"),
                   help="scratch space for training and export (default runs/refresh)")
    r.add_argument("--window-hours", type=float, default=24.0 * 7,
                   help="new clicks: the last this many hours before the newest (default 168)")
    r.add_argument("--train-minutes", type=float, default=10.0, help="training budget (default 10)")
    r.add_argument("--epochs", type=int, default=20, help="most epochs (0: no training step)")
    r.add_argument("--from-scratch", action="store_true", help="do not warm-start")
    r.add_argument("--tolerance", type=float, default=0.005,
                   help="how far below the live HR@k the candidate may be (fraction; default 0.005)")
    r.add_argument("--k", type=int, default=50, help="the gate's cut-off (default 50)")
    r.add_argument("--archive-dir", type=Path, help="also write <version>.tar.gz here")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--keep-versions", type=_nonnegative, default=5,
                   help="bundle versions kept under the root, newest first; current, the live "
                        "and the new one are never removed (0: keep all; default 5)")
    r.add_argument("--clicks-retention-hours", type=float,
                   help="delete exported clicks older than this many hours before the newest "
                        "(default: keep them; partitions older than the window are compacted)")
    r.set_defaults(func=cmd_refresh)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        hint = "; the last completed epoch is in last.pt (use --resume)" if args.command == "train" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL_PARTS:
            raise
        print(f"error: `sine {args.command}` needs {e.name}, which this install lacks (the serving "
              "image holds `serve` and `fetch-bundle` only; pip install -e '.[train]' for the rest)",
              file=sys.stderr)
        return 2
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
