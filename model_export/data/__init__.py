"""Click-sequence data: the `Dataset` and its split (`dataset`), the public sets (`public`),
click logs of any size and exported folders (`clicklogs`), synthetic data with planted
interests (`synthetic`), and `load`, which picks one by name or path."""
from __future__ import annotations

import os
from pathlib import Path

from .clicklogs import (
    ClickLogError,
    count_clicks,
    extend_with_clicks,
    load_click_folder,
    load_click_log,
    newest_click,
    parquet_files,
    parse_ts,
    read_clicks,
)
from .dataset import (
    DataError,
    Dataset,
    Split,
    dataset_info,
    dense_windows,
    extend,
    from_external,
    histories,
    in_time_order,
    sequences_from_events,
    split,
    vocab_rank,
    window,
)
from .public import load_beauty, load_ml1m, load_ml100k
from .synthetic import SyntheticClicks, synthetic, synthetic_mix, write_synthetic_log

DATASETS = ("ml-1m", "amazon-beauty", "ml-100k", "synthetic", "synthetic-mix")

__all__ = ["DATASETS", "ClickLogError", "DataError", "Dataset", "Split", "SyntheticClicks",
           "count_clicks", "dataset_info", "dense_windows", "extend_with_clicks", "default_data_dir",
           "extend", "from_external",
           "histories", "in_time_order", "load", "load_beauty", "load_click_folder",
           "load_click_log", "load_ml1m", "load_ml100k", "newest_click", "parquet_files",
           "parse_ts", "read_clicks", "sequences_from_events", "split", "synthetic",
           "synthetic_mix", "vocab_rank", "window", "write_synthetic_log"]


def default_data_dir() -> Path:
    """`../shared/data` seen from the working directory, else from the project root."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = (base / ".." / "shared" / "data").resolve()
        if p.exists():
            return p
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def load(name: str, data_dir: Path | str | None = None, drop_short: bool = False,
         seed: int = 0) -> Dataset:
    """Load a data set by name, a click log when `name` is a path to a .csv / .parquet file, or
    a folder exported by `sine export-clicks`."""
    if name not in DATASETS and Path(name).is_dir():
        return load_click_folder(Path(name), drop_short)
    if name not in DATASETS and (os.sep in name or name.endswith((".csv", ".parquet", ".pq", ".gz"))):
        return load_click_log(Path(name), drop_short)
    loaders = {"ml-1m": load_ml1m, "amazon-beauty": load_beauty, "ml-100k": load_ml100k}
    if name in loaders:
        return loaders[name](Path(data_dir) if data_dir else default_data_dir(), drop_short)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "synthetic-mix":
        return synthetic_mix(seed=seed)
    raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)} "
                    "or give the path of a .csv/.parquet click log")
