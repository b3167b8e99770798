"""`sine refresh`: one refresh cycle (export, warm-start, gate, publish, retention)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..common import CliError, add_options, data_args, log_args, log_settings, need_torch, nonnegative


def add(sub: Any) -> None:
    from model_export.configs import GATE_NEW_ITEMS, WARM_START_OPTIONS, RefreshConfig, TrainConfig

    D = {f.name: f.default for f in fields(RefreshConfig)}
    r = sub.add_parser("refresh", help="export clicks, warm-start, gate and publish a bundle",
                       description="One refresh cycle: export the click log, warm-start training "
                       "on the base data plus the new clicks, export and index a candidate, score "
                       "it and the live bundle on each active user's last click, and publish it "
                       "(current, and a .tar.gz with --archive-dir) only if its HR@k is not worse "
                       "by more than --tolerance. Exit 0: published; 3: refused by the gate; 4: "
                       "nothing new; 2: an error. The report goes to <bundle-root>/refresh.json.")
    data_args(r, RefreshConfig.seed)
    log_args(r)
    r.add_argument("--bundle-root", type=Path, required=True, help="the live bundle root")
    r.add_argument("--clicks-dir", type=Path, required=True,
                   help="where the exported clicks accumulate (kept between runs)")
    r.add_argument("--work-dir", type=Path, default=Path("runs/refresh"),
                   help="scratch space for training and export (default runs/refresh)")
    r.add_argument("--window-hours", type=float, default=D["window_hours"],
                   help=f"new clicks: the last this many hours before the newest (default "
                        f"{D['window_hours']:g})")
    r.add_argument("--train-minutes", type=float, default=D["train_minutes"],
                   help=f"training budget (default {D['train_minutes']:g})")
    r.add_argument("--epochs", type=int, default=D["max_epochs"],
                   help=f"most epochs (0: no training step; default {D['max_epochs']})")
    r.add_argument("--from-scratch", action="store_true", help="do not warm-start")
    r.add_argument("--tolerance", type=float, default=D["tolerance"],
                   help="how far below the live HR@k the candidate may be (fraction; default "
                        f"{D['tolerance']})")
    r.add_argument("--k", type=int, default=D["k"], help=f"the gate's cut-off (default {D['k']})")
    r.add_argument("--archive-dir", type=Path, help="also write <version>.tar.gz here")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--keep-versions", type=nonnegative, default=D["keep_versions"],
                   help="bundle versions kept under the root, newest first; current, the live "
                        f"and the new one are never removed (0: keep all; default "
                        f"{D['keep_versions']})")
    r.add_argument("--keep-version", action="append", default=[], metavar="VERSION",
                   help="a version retention never removes, whatever its age (repeatable; the "
                        "chart passes its pinned bundle.version)")
    r.add_argument("--clicks-retention-hours", type=float,
                   help="delete exported clicks older than this many hours before the newest "
                        "(default: keep them; partitions older than the window are compacted)")
    add_options(r, TrainConfig, WARM_START_OPTIONS)
    r.add_argument("--gate-new-items", choices=GATE_NEW_ITEMS, default=D["gate_new_items"],
                   help="held-out clicks on items the live bundle does not know: exclude them "
                        "from the gate's comparison, or count them as its misses (default "
                        f"{D['gate_new_items']})")
    r.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    need_torch()
    from model_export.configs import WARM_START_OPTIONS, RefreshConfig, TrainConfig
    from model_export.freshness.refresh import EXIT, refresh
    from service.keys import Keys

    warm = {k: getattr(a, k) for k in WARM_START_OPTIONS}
    try:                                   # the training values, checked before any work
        TrainConfig(**warm)
    except ValueError as e:
        raise CliError(str(e)) from None
    if a.new_rows_only and a.from_scratch:
        raise CliError("--new-rows-only fits new rows into the live model; --from-scratch starts "
                       "from nothing: give one of them")
    s = log_settings(a)
    report = refresh(RefreshConfig(
        bundle_root=a.bundle_root, dataset=a.dataset, data_dir=a.data_dir, redis_url=s.redis_url,
        redis_password=s.redis_password.get_secret_value() if s.redis_password else None,
        streams=tuple(Keys.streams_of(s.click_stream_key, s.shards)),
        redis_cluster=s.redis_cluster, group=s.click_export_group, clicks_dir=a.clicks_dir,
        work_dir=a.work_dir, window_hours=a.window_hours, train_minutes=a.train_minutes,
        max_epochs=a.epochs, from_scratch=a.from_scratch, tolerance=a.tolerance, k=a.k,
        archive_dir=a.archive_dir, threads=a.threads, seed=a.seed,
        keep_versions=a.keep_versions, pinned=tuple(a.keep_version),
        clicks_retention_hours=a.clicks_retention_hours, gate_new_items=a.gate_new_items,
        **warm),
        log=lambda msg: print(msg, file=sys.stderr))           # stdout: the report alone
    print(json.dumps(vars(report), indent=1))
    return EXIT[report.outcome]
