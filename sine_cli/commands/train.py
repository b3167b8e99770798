"""`sine train`: train SINE (or SASRec) with early stopping, then evaluate and report."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import CliError, add_options, data_args, dataset, need_torch, options_from, print_metrics

# `sine train`'s groups of TrainConfig flags (every one of them is in exactly one)
TRAINING = ("batch_size", "targets", "stride", "lr", "lam", "loss", "num_negatives", "max_epochs",
            "patience", "max_minutes", "threads", "device")
INTEREST_TERMS = ("interest_weight", "interest_loss", "interest_T", "cos_penalty", "weight_kl",
                  "weight_kl_T", "prototype_refresh")


def add(sub: Any) -> None:
    from model_export.configs import (
        WARM_START_OPTIONS,
        WINDOW_HOURS,
        SASRecConfig,
        SINEConfig,
        TrainConfig,
    )

    t = sub.add_parser("train", help="train SINE (or SASRec) with early stopping, then evaluate "
                       "and report",
                       description="Train SINE on a data set (leave-one-out split), keep the best "
                       "validation checkpoint, then evaluate it on the test split and write "
                       "report.md, curves.png and metrics.json next to the checkpoints.")
    data_args(t, TrainConfig.seed)
    t.add_argument("--out", help="output folder (default runs/<dataset>)")
    g = t.add_argument_group("model (paper symbols; SASRec takes --D, --seq-len, --blocks, "
                             "--heads and --dropout)")
    g.add_argument("--arch", choices=["sine", "sasrec"], default="sine",
                   help="sine (default), or the single-vector SASRec baseline (a K = 1 bundle)")
    add_options(g, SINEConfig, also=SASRecConfig)
    g = t.add_argument_group("training")
    add_options(g, TrainConfig, TRAINING)
    g.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = t.add_argument_group("interest-aware terms (SINE; each off at 0, added to Eq. 11)")
    add_options(g, TrainConfig, INTEREST_TERMS)
    g = t.add_argument_group("fresh data")
    g.add_argument("--warm-start", type=Path, metavar="CHECKPOINT_OR_BUNDLE",
                   help="start from a trained model (a best.pt, or a bundle holding model.pt) "
                        "instead of the initialization; its items keep their rows, new items start "
                        "as --new-item-init says; the model flags are taken from it")
    add_options(g, TrainConfig, WARM_START_OPTIONS)
    g.add_argument("--clicks", type=Path, metavar="FOLDER",
                   help="append the clicks of a `sine export-clicks` folder to --dataset")
    g.add_argument("--clicks-window-hours", type=float, default=WINDOW_HOURS,
                   help=f"use the clicks of the last this many hours before the newest (default "
                        f"{WINDOW_HOURS:g})")
    t.set_defaults(func=run)


def _model(a: argparse.Namespace, ds: Any) -> Any:
    from model_export.configs import SASRecConfig, SINEConfig, flag_of, options
    from model_export.training import config_from_args, warm_start_source
    from model_export.training.workflow import model_config

    if a.warm_start:                         # the shape of the model it starts from
        shape = warm_start_source(a.warm_start)["model_args"]
        return config_from_args({**shape, "n_items": ds.n_items})
    given = options_from(a, SINEConfig, given_only=True)
    if a.arch == "sasrec":
        theirs = {f.name for f in options(SASRecConfig)}
        sine_only = [flag_of(f) for f in options(SINEConfig) if f.name in set(given) - theirs]
        if sine_only:
            raise CliError(f"{', '.join(sine_only)}: SINE's options; SASRec takes "
                           f"{', '.join(flag_of(f) for f in options(SASRecConfig))}")
    return model_config(ds, a.arch, **given)


def _train_config(a: argparse.Namespace) -> Any:
    from model_export.configs import TrainConfig

    return TrainConfig(seed=a.seed, **options_from(a, TrainConfig))


def run(a: argparse.Namespace) -> int:
    need_torch()
    from model_export import data
    from model_export.training.distributed import leave, torchrun_launched
    from model_export.training.workflow import train_and_report

    ds = dataset(a)
    if a.clicks:
        ds = data.extend_with_clicks(ds, a.clicks, a.clicks_window_hours)
    print(ds.summary())
    try:                                      # the configs check their values
        mcfg, tcfg = _model(a, ds), _train_config(a)
    except ValueError as e:
        raise CliError(str(e)) from None
    out = Path(a.out or f"runs/{ds.name}")
    if a.resume and a.warm_start:
        raise CliError("--resume continues a run; --warm-start begins one: give one of them")
    if a.new_rows_only and not a.warm_start:
        raise CliError("--new-rows-only fits new rows into a trained model: give --warm-start")
    _, result = train_and_report(ds, mcfg, tcfg, out, resume=a.resume, progress=not a.no_progress,
                                 warm_start_from=a.warm_start)
    if result:                               # empty on a torchrun rank other than 0
        print_metrics(result)
        print(f"report: {out / 'report.md'}")
    if torchrun_launched():
        leave(0)
    return 0
