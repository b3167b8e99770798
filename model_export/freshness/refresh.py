"""`sine refresh`: the model kept fresh. One cycle (`Cycle`, a method a step, each timed under its
name in the report):

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from index_builder import bundle as bundle_mod
from index_builder.bundle import RefreshReport

from .. import data
from ..configs import WARM_START_OPTIONS, RefreshConfig
from ..data import Dataset
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


@dataclass
class Window:
    """The collect and window steps' record: the newest click, the window's clicks less the
    held-out ones, and each held-out user's last click."""
    newest: float | None = None
    train_clicks: list[tuple[str, str, float]] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)


@dataclass
class Prepared:
    """The prepare step's record: the base data set, and it extended by the window."""
    base: Dataset
    ds: Dataset
    new_items: int


@dataclass
class Verdict:
    """The gate step's record: publish or not, and the metrics that decided it."""
    passed: bool
    metrics: dict[str, dict[str, float]]
    held_out: int
    unknown: int


class Cycle:
    """One refresh cycle. Each step is a method that returns its record and fills its part of
    the report; `timed(step)` records how long each took under the step's name."""

    def __init__(self, cfg: RefreshConfig, log: Callable[[str], object] = print):
        self.cfg, self.log = cfg, log
        self.root = Path(cfg.bundle_root)
        self.live = _live(self.root)
        self.report = RefreshReport(outcome=NOTHING_NEW,
                                    live=self.live.version if self.live else None)
        self.work = Path(cfg.work_dir)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.report.stages_s[step] = time.perf_counter() - t

    def collect(self) -> None:
        """Sweep stale staging folders, export the click log into the clicks folder."""
        cfg = self.cfg
        swept = (bundle_mod.sweep_staging(self.root, cfg.staging_max_age_h * 3600)
                 if self.root.exists() else [])
        self.report.retention["staging_removed"] = swept
        exported = export_clicks(cfg.redis_url, cfg.clicks_dir, list(cfg.streams), cfg.group,
                                 password=cfg.redis_password, cluster=cfg.redis_cluster)
        self.report.clicks = {"exported_now": exported.written,
                              "lost_before_export": exported.lost, "rejected": exported.rejected}
        if exported.lost:
            self.log(f"warning: {exported.lost} clicks were lost before they could be exported")
        Path(cfg.clicks_dir).mkdir(parents=True, exist_ok=True)

    def window(self) -> Window:
        """The last `window_hours` of clicks, each active user's last one held out."""
        cfg = self.cfg
        w = Window(newest=newest_click(cfg.clicks_dir))
        self.report.clicks["in_log"] = count_clicks(cfg.clicks_dir)
        if w.newest is None:
            return w
        since = w.newest - cfg.window_hours * 3600
        clicks = list(read_clicks(cfg.clicks_dir, since=since))     # the window only
        w.train_clicks, w.targets = holdout(clicks, since)
        self.report.clicks.update({"in_window": len(clicks), "holdout_users": len(w.targets),
                                   "window_hours": cfg.window_hours, "until": w.newest})
        return w

    def is_new(self, w: Window) -> bool:
        return (w.newest is not None and bool(w.targets)
                and w.newest > _seen_until(self.root, self.live))

    def prepare(self, w: Window) -> Prepared:
        base = data.load(self.cfg.dataset, self.cfg.data_dir)
        ds = data.extend(base, w.train_clicks)
        new_items = ds.n_items - len(set(base.item_ids[1:]) & set(ds.item_ids[1:]))
        self.report.clicks.update({"users": ds.n_users, "items": ds.n_items,
                                   "new_items": new_items})
        self.log(f"{ds.summary()}; {new_items} new items, {len(w.targets)} users held out for "
                 "the gate")
        return Prepared(base, ds, new_items)

    def train(self, prep: Prepared) -> Path:
        """The candidate trained, warm-started from the live model; its best checkpoint."""
        from ..training import TrainConfig, train
        from ..training.checkpoints import CheckpointError
        from ..training.workflow import model_config
        cfg, live = self.cfg, self.live
        # the live model's shape, so that it can warm-start the candidate
        shape = ({k: v for k, v in live.manifest["model"].items() if k != "n_items"}
                 if live else {})
        warm = None if cfg.from_scratch or live is None else live.path
        if cfg.new_rows_only and warm is None:
            raise CheckpointError(f"{self.root}: a rows-only cycle fits new rows into the live "
                                  "model, and there is none (or --from-scratch was given); run "
                                  "a full refresh first.")
        shutil.rmtree(self.work, ignore_errors=True)
        train(prep.ds, model_config(prep.ds, **shape),
              TrainConfig(max_epochs=cfg.max_epochs, max_minutes=cfg.train_minutes, patience=2,
                          seed=cfg.seed, threads=cfg.threads,
                          **{k: getattr(cfg, k) for k in WARM_START_OPTIONS}),
              self.work / "train", progress=False, log=self.log, warm_start_from=warm)
        return self.work / "train" / "best.pt"

    def export(self, checkpoint: Path, prep: Prepared, w: Window) -> Path:
        from ..export import export
        warm = not self.cfg.from_scratch and self.live is not None
        export(checkpoint, prep.ds, self.work / "export", log=self.log,
               provenance={"refresh": {"clicks_until": w.newest,
                                       "window_hours": self.cfg.window_hours,
                                       "warm_start": self.live.version if warm and self.live
                                       else None}})
        return self.work / "export"

    def index(self, exported: Path) -> bundle_mod.Bundle:
        """The candidate bundle, under the root but not current."""
        from index_builder.make import make_bundle
        cand = make_bundle(exported, self.root, make_current=False, log=self.log)
        self.report.version = cand.version
        return cand

    def gate(self, cand: bundle_mod.Bundle, prep: Prepared, w: Window) -> Verdict:
        """Candidate and live answer the held-out users as the service would, scored on their
        held-out clicks."""
        cfg, live = self.cfg, self.live
        hist = histories(prep.base, w.train_clicks, w.targets)
        # a held-out click on an item the live bundle does not know is a miss it cannot help:
        # counted, it would be the candidate's win by construction
        live_knows = set(live.item_ids()) if live is not None else set()
        unknown = {u: i for u, i in w.targets.items() if live is not None and i not in live_knows}
        compared = ({u: i for u, i in w.targets.items() if u not in unknown}
                    if cfg.gate_new_items == "exclude" else w.targets)
        metrics = {"candidate": score_bundle(cand.path, hist, compared, cfg.k)}
        if live is not None:
            metrics["live"] = score_bundle(live.path, hist, compared, cfg.k)
        if unknown:
            metrics["candidate_on_new_items"] = score_bundle(cand.path, hist, unknown, cfg.k)
        key = f"HR@{cfg.k}"
        passed = live is None or metrics["candidate"][key] >= metrics["live"][key] - cfg.tolerance
        self.report.gate = {"metric": key, "tolerance": cfg.tolerance, "passed": passed,
                            "metrics": metrics, "new_items": cfg.gate_new_items,
                            "holdout_new_item_share": len(unknown) / max(len(w.targets), 1)}
        self.log(f"gate: candidate {key} {metrics['candidate'][key]:.4f}"
                 + (f", live {metrics['live'][key]:.4f}" if live else " (no live bundle)")
                 + f" -> {'publish' if passed else 'refuse'}")
        return Verdict(passed, metrics, len(w.targets), len(unknown))

    def publish(self, cand: bundle_mod.Bundle, verdict: Verdict) -> None:
        """`current` moved to the candidate (and its archive written), or the candidate deleted."""
        if verdict.passed:
            if self.cfg.archive_dir is not None:
                bundle_mod.archive(self.root, cand.version, self.cfg.archive_dir)
            bundle_mod.set_current(self.root, cand.version)
            self.report.outcome = PUBLISHED
        else:
            shutil.rmtree(cand.path, ignore_errors=True)
            self.report.outcome = REFUSED

    def retain(self, newest: float | None, protect: set[str]) -> None:
        _retention(self.cfg, self.root, self.report, newest, protect)

    def finish(self) -> RefreshReport:
        return _finish(self.root, self.report)


def refresh(cfg: RefreshConfig, log: Callable[[str], object] = print) -> RefreshReport:
    c = Cycle(cfg, log)
    with c.timed("export_clicks"):
        c.collect()
        w = c.window()
    if not c.is_new(w):
        log("no click since the live bundle or the last refused candidate: nothing to refresh")
        c.retain(w.newest, set())
        return c.finish()
    with c.timed("prepare"):
        prep = c.prepare(w)
    if cfg.new_rows_only and not prep.new_items:
        log("no new item in the window: a rows-only cycle has nothing to fit")
        c.retain(w.newest, set())
        return c.finish()
    with c.timed("train"):
        checkpoint = c.train(prep)
    with c.timed("export"):
        exported = c.export(checkpoint, prep, w)
    with c.timed("index"):
        cand = c.index(exported)
    with c.timed("gate"):
        verdict = c.gate(cand, prep, w)
    with c.timed("publish"):
        c.publish(cand, verdict)
    with c.timed("retention"):
        c.retain(w.newest, {cand.version, *([c.live.version] if c.live else [])})
    return c.finish()


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


def _finish(root: Path, report: RefreshReport) -> RefreshReport:
    report.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.finished_unix = time.time()
    bundle_mod.write_refresh_report(root, report)
    return report
