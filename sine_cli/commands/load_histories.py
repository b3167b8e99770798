"""`sine load-histories`: users' newest clicks bulk-loaded into Redis."""
from __future__ import annotations

import argparse
from typing import Any

from ..common import CliError, data_args, dataset, nonnegative, progress_bar


def add(sub: Any) -> None:
    from model_export.configs import TrainConfig  # the same data as `sine train` draws

    h = sub.add_parser("load-histories", help="bulk-load user histories into Redis",
                       description="Write each user's newest clicks from a data set or click log "
                       "into Redis lists (newest first), pipelined, replacing what was there.")
    data_args(h, TrainConfig.seed)
    h.add_argument("--redis-url", help="target Redis (SINE_REDIS_URL)")
    h.add_argument("--keep", type=int, help="clicks kept per user (SINE_HISTORY_KEEP, default 500)")
    h.add_argument("--holdout", type=nonnegative, default=0,
                   help="leave out each user's last N clicks (1: everything before the test "
                        "target, as the offline evaluation sees it; default 0)")
    h.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from model_export import data
    from service.history import load_histories
    from service.settings import settings_from

    s = settings_from(redis_url=a.redis_url, history_keep=a.keep)
    if not s.redis_url:
        raise CliError("no Redis: pass --redis-url or set SINE_REDIS_URL")
    ds = dataset(a)
    n = load_histories(s, data.histories(ds, a.holdout), ds.n_users, progress_bar("users"))
    held = f", last {a.holdout} held out" if a.holdout else ""
    print(f"loaded {n} histories (newest {s.history_keep} clicks each{held}) into "
          f"{s.redis_url_redacted()}")
    return 0
