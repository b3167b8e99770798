"""`sine refresh`: the model kept fresh. One cycle, each stage timed:

1. **export** the click log (`clicklog.export_clicks`) into the clicks folder; clicks lost
   before the export (a cap, a deletion) are counted in the report;
2. **holdout**: the clicks of the last `window_hours` (before the newest one) are the new data,
   and only they are read; the last click of each user active in that window is held out for
   the gate;
3. **train** on the base data set plus the other new clicks (`data.extend`: new users and new
   items join the vocabulary), warm-started from the live bundle's model (`train.warm_start`),
   within `train_minutes`;
4. **export** the encoder and **index** the items into a new version under the bundle root,
   not yet current;
5. **gate**: the candidate and the live bundle answer the held-out users exactly as the service
   would (its engine: the same encoder, faiss search and exclusion of seen items), and are scored
   on the held-out clicks. The candidate is published only if its HR@k is not below the live
   one's by more than `tolerance`; otherwise it is deleted and the live one keeps serving. A
   held-out click on an item the live bundle does not know is left out of that comparison by
   default (`gate_new_items`): the live one cannot score it, so counting it would be the
   candidate's win by construction. Their share of the holdout, and the candidate's HR@k on
   them alone, are reported beside;
6. **publish**: `current` moves by atomic rename (the running services hot-reload it), and with
   `archive_dir` a `<version>.tar.gz` for `sine fetch-bundle` users appears there atomically.

Then **retention**: all but the newest `keep_versions` versions are deleted (never `current`,
the live, the new one or a `pinned` one), staging folders that killed builds left are swept, the click
partitions older than the window are compacted into one file an hour, and with
`clicks_retention_hours` those older than that are deleted.

The outcome, the gate's metrics, the stage times and what retention removed are written to
`<root>/refresh.json` (the service reports them in /metrics) and returned.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from index_builder import bundle as bundle_mod
from index_builder.bundle import RefreshReport

from .. import data
from ..configs import RefreshConfig
from ..data.clicklogs import count_clicks, newest_click, read_clicks
from .clicklog import compact_partitions, export_clicks
from .gate import histories, holdout, score_bundle

PUBLISHED, REFUSED, NOTHING_NEW = "published", "refused", "nothing_new"
# exit statuses of `sine refresh` (2 is any error, as for every command)
EXIT = {PUBLISHED: 0, REFUSED: 3, NOTHING_NEW: 4}


def _seen_until(root: Path, live: bundle_mod.Bundle | None) -> float:
    """The newest click the live bundle, or the last refused candidate, was made from."""
    marks = [float("-inf")]
    if live is not None:
        marks.append(live.manifest.get("provenance", {}).get("refresh", {})
                     .get("clicks_until", float("-inf")))
    last = bundle_mod.read_refresh_report(root)
    if last is not None and last.outcome in (REFUSED, NOTHING_NEW):
        marks.append(last.clicks.get("until", float("-inf")))
    return max(marks)


def _live(root: Path) -> bundle_mod.Bundle | None:
    try:
        return bundle_mod.load(root, deep=False)
    except bundle_mod.BundleError:
        return None


def refresh(cfg: RefreshConfig, log=print) -> RefreshReport:
    from index_builder.make import make_bundle

    from ..export import export
    from ..training import TrainConfig, train
    from ..training.checkpoints import CheckpointError
    from ..training.workflow import model_config

    root = Path(cfg.bundle_root)
    stages: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        stages[name] = now - t
        t = now

    live = _live(root)
    report = RefreshReport(outcome=NOTHING_NEW, live=live.version if live else None)
    swept = bundle_mod.sweep_staging(root, cfg.staging_max_age_h * 3600) if root.exists() else []
    report.retention["staging_removed"] = swept
    exported = export_clicks(cfg.redis_url, cfg.clicks_dir, list(cfg.streams), cfg.group,
                             password=cfg.redis_password, cluster=cfg.redis_cluster)
    lap("export_clicks")
    report.clicks = {"exported_now": exported.written, "lost_before_export": exported.lost,
                     "rejected": exported.rejected}
    if exported.lost:
        log(f"warning: {exported.lost} clicks were lost before they could be exported")
    Path(cfg.clicks_dir).mkdir(parents=True, exist_ok=True)
    newest = newest_click(cfg.clicks_dir)
    report.clicks["in_log"] = count_clicks(cfg.clicks_dir)
    targets: dict[str, str] = {}
    if newest is not None:
        since = newest - cfg.window_hours * 3600
        window = list(read_clicks(cfg.clicks_dir, since=since))     # the window only
        train_clicks, targets = holdout(window, since)
        report.clicks.update({"in_window": len(window), "holdout_users": len(targets),
                              "window_hours": cfg.window_hours})
        report.clicks["until"] = newest
    if newest is None or not targets or newest <= _seen_until(root, live):
        log("no click since the live bundle or the last refused candidate: nothing to refresh")
        _retention(cfg, root, report, newest, set())
        return _finish(root, report, stages)

    base = data.load(cfg.dataset, cfg.data_dir)
    ds = data.extend(base, train_clicks)
    new_items = ds.n_items - len(set(base.item_ids[1:]) & set(ds.item_ids[1:]))
    report.clicks.update({"users": ds.n_users, "items": ds.n_items, "new_items": new_items})
    log(f"{ds.summary()}; {new_items} new items, {len(targets)} users held out for the gate")
    lap("prepare")
    if cfg.new_rows_only and not new_items:
        log("no new item in the window: a rows-only cycle has nothing to fit")
        _retention(cfg, root, report, newest, set())
        return _finish(root, report, stages)

    # the live model's shape, so that it can warm-start the candidate
    shape = {k: v for k, v in live.manifest["model"].items() if k != "n_items"} if live else {}
    mcfg = model_config(ds, **shape)
    work = Path(cfg.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    warm = None if cfg.from_scratch or live is None else live.path
    if cfg.new_rows_only and warm is None:
        raise CheckpointError(f"{root}: a rows-only cycle fits new rows into the live model, and "
                              "there is none (or --from-scratch was given); run a full refresh "
                              "first.")
    train(ds, mcfg, TrainConfig(max_epochs=cfg.max_epochs, max_minutes=cfg.train_minutes,
                                patience=2, seed=cfg.seed, threads=cfg.threads,
                                new_item_init=cfg.new_item_init,
                                new_item_oversample=cfg.new_item_oversample,
                                new_rows_only=cfg.new_rows_only,
                                new_rows_replay=cfg.new_rows_replay),
          work / "train", progress=False, log=log, warm_start_from=warm)
    lap("train")
    export(work / "train" / "best.pt", ds, work / "export", log=log,
           provenance={"refresh": {"clicks_until": newest, "window_hours": cfg.window_hours,
                                   "warm_start": live.version if warm and live else None}})
    lap("export")
    cand = make_bundle(work / "export", root, make_current=False, log=log)
    report.version = cand.version
    lap("index")

    hist = histories(base, train_clicks, targets)
    # a held-out click on an item the live bundle does not know is a miss it cannot help:
    # counted, it would be the candidate's win by construction
    live_knows = set(live.item_ids()) if live is not None else set()
    unknown = {u: i for u, i in targets.items() if live is not None and i not in live_knows}
    compared = ({u: i for u, i in targets.items() if u not in unknown}
                if cfg.gate_new_items == "exclude" else targets)
    metrics = {"candidate": score_bundle(cand.path, hist, compared, cfg.k)}
    if live is not None:
        metrics["live"] = score_bundle(live.path, hist, compared, cfg.k)
    if unknown:
        metrics["candidate_on_new_items"] = score_bundle(cand.path, hist, unknown, cfg.k)
    key = f"HR@{cfg.k}"
    passed = live is None or metrics["candidate"][key] >= metrics["live"][key] - cfg.tolerance
    report.gate = {"metric": key, "tolerance": cfg.tolerance, "passed": passed,
                   "metrics": metrics, "new_items": cfg.gate_new_items,
                   "holdout_new_item_share": len(unknown) / max(len(targets), 1)}
    lap("gate")
    log(f"gate: candidate {key} {metrics['candidate'][key]:.4f}"
        + (f", live {metrics['live'][key]:.4f}" if live else " (no live bundle)")
        + f" -> {'publish' if passed else 'refuse'}")
    if passed:
        if cfg.archive_dir is not None:
            bundle_mod.archive(root, cand.version, cfg.archive_dir)
        bundle_mod.set_current(root, cand.version)
        report.outcome = PUBLISHED
    else:
        shutil.rmtree(cand.path, ignore_errors=True)
        report.outcome = REFUSED
    lap("publish")
    _retention(cfg, root, report, newest, {cand.version, *([live.version] if live else [])})
    lap("retention")
    return _finish(root, report, stages)


def _retention(cfg: RefreshConfig, root: Path, report: RefreshReport, newest: float | None,
               protect: set[str]) -> None:
    """Old versions, closed click partitions compacted, clicks past the retention dropped."""
    if root.exists():
        report.retention["versions_removed"] = bundle_mod.prune_versions(
            root, cfg.keep_versions, protect | set(cfg.pinned))
    if newest is not None:
        compacted, dropped = compact_partitions(
            cfg.clicks_dir, before=newest - cfg.window_hours * 3600,
            drop_before=None if cfg.clicks_retention_hours is None
            else newest - cfg.clicks_retention_hours * 3600)
        report.retention.update({"click_partitions_compacted": compacted,
                                 "click_partitions_dropped": dropped})


def _finish(root: Path, report: RefreshReport, stages: dict[str, float]) -> RefreshReport:
    report.stages_s = stages
    report.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.finished_unix = time.time()
    bundle_mod.write_refresh_report(root, report)
    return report
