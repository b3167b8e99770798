"""What several `sine` commands share: the data set flags, the click log flags, progress bars,
the metrics table, and `CliError`."""
from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from typing import Any

from index_builder.bundle import SineError

DATA_DIR_ENV = "SINE_DATA_DIR"


class CliError(SineError):
    """A usage or environment problem; printed as one line, exit code 2."""


def data_args(p: argparse.ArgumentParser, seed: int) -> None:
    p.add_argument("--dataset", default="ml-1m",
                   help="ml-1m, amazon-beauty, ml-100k, synthetic, synthetic-mix, or the path of a "
                        "click log (.csv/.parquet with user_id,item_id,timestamp). Default: ml-1m")
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"folder holding the data sets (env {DATA_DIR_ENV}; default ../shared/data)")
    p.add_argument("--drop-short-users", action="store_true",
                   help="skip users with fewer than 3 interactions instead of failing")
    p.add_argument("--seed", type=int, default=seed,
                   help=f"random seed (data generator and training; default {seed})")


def add_options(g: Any, cls: type, names: tuple[str, ...] | None = None,
                also: type | None = None) -> None:
    """A flag for each `opt` field of the config `cls` (those in `names`, else every one made for
    the CLI), its help, choices and default from the field. With `also` (a config that shares
    some flags, as SASRec shares SINE's), each flag defaults to None so that the config chosen
    later fills its own default, and the help names both."""
    from model_export.configs import default_of, flag_of, options
    others = {f.name: default_of(f) for f in options(also)} if also else {}
    for f in options(cls):
        if not f.metadata["cli"] or (names is not None and f.name not in names):
            continue
        default = default_of(f)
        if isinstance(default, bool):
            g.add_argument(flag_of(f), dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        choices = f.metadata["choices"]
        g.add_argument(flag_of(f), dest=f.name, type=_kind(f), help=_help(f, others, also),
                       choices=list(choices) if choices else None,
                       default=None if also else default)


def _kind(f: Any) -> type:
    """A field's value type, from its default or else from its annotation (`int | None`)."""
    if f.default is not None:
        return type(f.default)
    return float if "float" in str(f.type) else int if "int" in str(f.type) else str


def _help(f: Any, others: dict[str, Any], also: type | None) -> str:
    text, default = f.metadata["help"], f.default
    if f.name in others and others[f.name] != default:
        theirs = getattr(also, "__name__", "").removesuffix("Config")
        return f"{text} (default {_shown(default)}; {theirs} {_shown(others[f.name])})"
    if f.metadata["show_default"] and default is not None:
        return f"{text} (default {_shown(default)})"
    return str(text)


def _shown(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def options_from(a: argparse.Namespace, cls: type, given_only: bool = False) -> dict[str, Any]:
    """The values of `cls`'s flags in parsed arguments, by field name (`given_only`: those set:
    not None, and a switch only when on)."""
    from model_export.configs import options
    out = {f.name: getattr(a, f.name) for f in options(cls)
           if f.metadata["cli"] and hasattr(a, f.name)}
    if given_only:
        out = {k: v for k, v in out.items() if v is not None and v is not False}
    return out


def dataset(a: argparse.Namespace) -> Any:
    from model_export import data
    return data.load(a.dataset, a.data_dir, a.drop_short_users, seed=a.seed)


def nonnegative(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise CliError("this command needs the training extra: pip install -e '.[train]'")


def log_args(p: argparse.ArgumentParser) -> None:
    """The flags naming the click log in Redis (each with its SINE_* variable)."""
    p.add_argument("--redis-url", help="the Redis holding the click log (SINE_REDIS_URL)")
    p.add_argument("--stream", help="click log stream (SINE_CLICK_STREAM_KEY)")
    p.add_argument("--redis-cluster", action="store_true", default=None,
                   help="--redis-url is a node of a Redis Cluster (SINE_REDIS_CLUSTER)")
    p.add_argument("--shards", type=int, help="hash-tag shards of the log: its streams are "
                   "{s0}:STREAM ... (SINE_REDIS_SHARDS; default 16 on a cluster, else 0)")
    p.add_argument("--group", help="consumer group (SINE_CLICK_EXPORT_GROUP)")


def log_settings(a: argparse.Namespace) -> Any:
    """The service's settings for the click log (flags over SINE_* variables)."""
    from service.settings import settings_from

    s = settings_from(redis_url=a.redis_url, click_stream_key=a.stream,
                      redis_cluster=a.redis_cluster, redis_shards=a.shards,
                      click_export_group=a.group)
    if not s.redis_url:
        raise CliError("no Redis: pass --redis-url or set SINE_REDIS_URL")
    return s


def progress_bar(desc: str, unit: str = "item") -> Callable[[int, int], None]:
    from tqdm.auto import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                                leave=False)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return update


def print_metrics(result: dict[str, Any]) -> None:
    from model_export.evaluation.report import metrics_table
    for which, rows in result["metrics"].items():
        print(f"\n{which} (percent)\n{metrics_table(rows)}")
    c = result.get("concepts") or {}
    if "nmi" in c:
        print(f"\nNMI(nearest prototype, {c['label_kind']}) = {c['nmi']:.3f}")
