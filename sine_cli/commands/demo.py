"""`sine demo`: the whole system in one command."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..common import DATA_DIR_ENV, need_torch

TRAIN_MINUTES = 3.0


def add(sub: Any) -> None:
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
    d.add_argument("--train-minutes", type=float, default=TRAIN_MINUTES,
                   help=f"training budget when a bundle is built (default {TRAIN_MINUTES:g})")
    d.add_argument("--rebuild", action="store_true", help="train a new bundle even if one exists")
    d.add_argument("--redis-url", help="use this Redis instead of starting one")
    d.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    d.add_argument("--no-wait", action="store_true",
                   help="stop after the sample answer instead of serving until Ctrl-C")
    d.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    need_torch()
    from devtools.demo import run_demo

    return run_demo(a.dataset, a.data_dir, Path(a.workdir), a.train_minutes, a.rebuild,
                    a.redis_url, a.port, serve_forever=not a.no_wait)
