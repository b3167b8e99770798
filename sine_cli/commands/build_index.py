"""`sine build-index`: the faiss index over an export, gated on recall, published as a bundle."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import CliError, progress_bar


def add(sub: Any) -> None:
    from index_builder.options import DEFAULTS as D

    b = sub.add_parser("build-index", help="build the faiss index, gate it on recall, publish a bundle",
                       description="Build an inner-product faiss index over an export's item "
                       "table, measure recall@k against exact search on real user vectors, tune "
                       "the search knob up to the floor (or refuse), and publish "
                       "<bundle-root>/<version> atomically, pointing <bundle-root>/current at it.")
    b.add_argument("--export", required=True, help="folder written by `sine export`")
    b.add_argument("--bundle-root", required=True, help="folder holding bundle versions")
    b.add_argument("--factory", default=D.factory,
                   help="faiss factory string (Flat, HNSW32,Flat, IVF4096,Flat, IVF4096,PQ32, ...) "
                        f"or auto: Flat up to {D.auto_exact_max_items:,} items, IVF with "
                        f"~4 sqrt(N) lists (at most 4096) and 8-bit codes above (default {D.factory})")
    b.add_argument("--memory-budget-mb", type=float, default=None,
                   help="index codes one pod should hold; past it the build warns and says how "
                        f"many shards to split the catalog into (default {D.memory_budget_mb:g})")
    b.add_argument("--recall-k", type=int, default=D.recall_k,
                   help=f"k of the recall check (default {D.recall_k})")
    b.add_argument("--recall-floor", type=float, default=D.recall_floor,
                   help=f"refuse to write an index below this recall@k (default {D.recall_floor})")
    b.add_argument("--search-param", action="append", metavar="NAME=VALUE",
                   help="fix a search knob (efSearch=128, nprobe=64) instead of tuning it")
    b.add_argument("--gpu", action="store_true", help="build on a GPU with faiss-gpu")
    b.add_argument("--version", help="version name (default: UTC time + vocabulary hash)")
    b.add_argument("--no-current", action="store_true", help="publish without moving `current`")
    b.set_defaults(func=run)


def search_params(pairs: list[str] | None) -> dict[str, int]:
    params = {}
    for kv in pairs or []:
        k, _, v = kv.partition("=")
        try:
            params[k] = int(v)
        except ValueError:
            raise CliError(f"--search-param takes NAME=INTEGER, got {kv!r}") from None
    return params


def run(a: argparse.Namespace) -> int:
    from index_builder.make import make_bundle

    b = make_bundle(Path(a.export), Path(a.bundle_root), factory=a.factory, k=a.recall_k,
                    floor=a.recall_floor, params=search_params(a.search_param) or None,
                    gpu=a.gpu, version=a.version, make_current=not a.no_current,
                    progress=progress_bar("adding items"), memory_budget_mb=a.memory_budget_mb)
    idx = b.manifest["index"]
    print(f"bundle {b.version}: {idx['factory']} {idx['search_params']} "
          f"recall@{idx['recall']['k']} {idx['recall']['value']:.4f}")
    return 0
