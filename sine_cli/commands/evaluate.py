"""`sine evaluate`: a checkpoint under the paper's protocol, beside popularity."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import data_args, dataset, need_torch, print_metrics


def add(sub: Any) -> None:
    from model_export.configs import TrainConfig

    e = sub.add_parser("evaluate", help="evaluate a checkpoint with the paper's protocol",
                       description="Full-ranking leave-one-out evaluation (HR/NDCG@10/50/100) of a "
                       "checkpoint on valid and test, beside popularity, plus the concept "
                       "analyses; writes report.md, curves.png and metrics.json.")
    data_args(e, TrainConfig.seed)
    e.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `sine train`")
    e.add_argument("--report-dir", help="where to write the report (default: the checkpoint's folder)")
    e.add_argument("--keep-history", action="store_true",
                   help="do not exclude the user's past items from the ranking")
    e.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    need_torch()
    from model_export.training.workflow import evaluate_checkpoint

    ds = dataset(a)
    out = Path(a.report_dir) if a.report_dir else Path(a.checkpoint).parent
    print_metrics(evaluate_checkpoint(Path(a.checkpoint), ds, out,
                                      exclude_history=not a.keep_history))
    print(f"report: {out / 'report.md'}")
    return 0
