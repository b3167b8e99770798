"""`sine export`: a checkpoint into an export folder for `sine build-index`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import data_args, dataset, need_torch


def add(sub: Any) -> None:
    from model_export.configs import SERVINGS, ExportConfig, TrainConfig

    D = ExportConfig()
    x = sub.add_parser("export", help="export a checkpoint: ONNX encoder, item table, ids, popularity",
                       description="Write the user encoder to ONNX (checked against PyTorch), the "
                       "item table, the id map, training popularity and a sample of real user "
                       "vectors (validation histories) to an export folder for `sine build-index`.")
    data_args(x, TrainConfig.seed)
    x.add_argument("--checkpoint", required=True, help="a best.pt written by `sine train`")
    x.add_argument("--out", required=True, help="export folder to write")
    x.add_argument("--opset", type=int, default=D.opset, help=f"ONNX opset (>= 17; default {D.opset})")
    x.add_argument("--queries", type=int, default=D.n_queries,
                   help=f"user vectors kept for the recall check (default {D.n_queries})")
    x.add_argument("--graph", choices=["auto", "folded", "plain"], default=D.graph,
                   help="folded: the item-side products of Eq. 1, 3, 4 precomputed into per-item "
                        "tables (fast, (2 + K) D floats per item); plain: computed per request; "
                        f"auto: folded when the tables fit --fold-budget-mb (default {D.graph})")
    x.add_argument("--fold-budget-mb", type=float, default=D.fold_budget_mb,
                   help=f"largest table memory auto folds (default {D.fold_budget_mb:g})")
    x.add_argument("--serving", choices=list(SERVINGS), default=D.serving,
                   help="the search a request that names no mode gets: auto: the best on the "
                        "validation split (HR@50) of the aggregate and, for K > 1, each "
                        "per-interest merge, ties to the aggregate; aggregate; or max, weighted, "
                        f"quota: per_interest with that merge (default {D.serving})")
    x.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    need_torch()
    from model_export.export import export

    export(Path(a.checkpoint), dataset(a), Path(a.out), opset=a.opset, n_queries=a.queries,
           graph=a.graph, fold_budget_mb=a.fold_budget_mb, serving=a.serving)
    return 0
