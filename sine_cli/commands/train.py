"""`sine train`: train SINE (or SASRec) with early stopping, then evaluate and report."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..common import CliError, data_args, dataset, need_torch, print_metrics


def add(sub: Any) -> None:
    from model_export.configs import (
        ACTIVATIONS,
        AGGREGATIONS,
        INTEREST_LOSSES,
        NEW_ITEM_INITS,
        TARGETS,
        WINDOW_HOURS,
        SASRecConfig,
        SINEConfig,
        TrainConfig,
    )

    SINE = {f.name: f.default for f in fields(SINEConfig)}
    SASREC = {f.name: f.default for f in fields(SASRecConfig)}
    TRAIN = TrainConfig()
    t = sub.add_parser("train", help="train SINE (or SASRec) with early stopping, then evaluate "
                       "and report",
                       description="Train SINE on a data set (leave-one-out split), keep the best "
                       "validation checkpoint, then evaluate it on the test split and write "
                       "report.md, curves.png and metrics.json next to the checkpoints.")
    data_args(t, TRAIN.seed)
    t.add_argument("--out", help="output folder (default runs/<dataset>)")
    g = t.add_argument_group("model (paper symbols)")
    g.add_argument("--arch", choices=["sine", "sasrec"], default="sine",
                   help="sine (default), or the single-vector SASRec baseline (a K = 1 bundle)")
    g.add_argument("--K", type=int, help=f"activated intentions per user (Table 3: {SINE['K']})")
    g.add_argument("--L", type=int, help="prototype pool size (Table 3: ML-1M 50, Amazon 500)")
    g.add_argument("--D", type=int, default=SINE["D"], help=f"embedding size (default {SINE['D']})")
    g.add_argument("--seq-len", type=int, default=SINE["n"],
                   help=f"clicks per input window, n (default {SINE['n']})")
    g.add_argument("--tau", type=float, default=SINE["tau"],
                   help=f"Eq. 7 temperature (default {SINE['tau']})")
    g.add_argument("--tau-assign", type=float, default=SINE["tau_assign"],
                   help=f"Eq. 3 cosine temperature (default {SINE['tau_assign']})")
    g.add_argument("--literal", action="store_true",
                   help="Eq. 3 and 7 as raw LayerNorm dot products, as printed in the paper")
    g.add_argument("--aggregation", choices=AGGREGATIONS, default=SINE["aggregation"],
                   help="adaptive: Eq. 6-8 (default); mean: average of the K interests (ablation); "
                        "latest: Eq. 7's intention from the latest click's state (deviation 9)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=SINE["activation"],
                   help="attention: Eq. 1-2, the top K of <z_u, C> (default); votes: the K "
                        "prototypes Eq. 3 assigns the most clicks to (model_export/models/sine.py, deviation 6)")
    g = t.add_argument_group("self-attention (SASRec, or SINE's backbone)")
    g.add_argument("--blocks", type=int, help=f"causal self-attention blocks (SASRec default "
                   f"{SASREC['blocks']}; SINE default {SINE['blocks']}: none, Eq. 1-6 on the item "
                   "embeddings)")
    g.add_argument("--heads", type=int, help=f"attention heads (default {SASREC['heads']})")
    g.add_argument("--dropout", type=float,
                   help=f"dropout (SASRec default {SASREC['dropout']}, 0.5 on amazon-beauty; "
                        f"SINE's backbone {SINE['dropout']})")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=TRAIN.max_epochs,
                   help=f"maximum epochs (default {TRAIN.max_epochs})")
    g.add_argument("--patience", type=int, default=TRAIN.patience,
                   help=f"stop after this many epochs without a validation {TRAIN.select_metric} "
                        f"gain (default {TRAIN.patience})")
    g.add_argument("--batch-size", type=int, default=TRAIN.batch_size,
                   help=f"training windows a step (default {TRAIN.batch_size})")
    g.add_argument("--targets", choices=TARGETS, default=TRAIN.targets,
                   help="last: one target per sliding window (the paper's); dense: strided "
                        "windows whose every slot predicts the click after it, as SASRec+ trains "
                        f"(default {TRAIN.targets})")
    g.add_argument("--stride", type=int, help="with --targets dense, clicks between window ends "
                   "(default: --seq-len)")
    g.add_argument("--lr", type=float, default=TRAIN.lr,
                   help=f"Adam learning rate (default {TRAIN.lr:g})")
    g.add_argument("--lam", type=float, default=TRAIN.lam,
                   help=f"Eq. 11 lambda (default {TRAIN.lam})")
    g.add_argument("--loss", choices=["auto", "full", "sampled"], default=TRAIN.loss,
                   help="full softmax, sampled softmax with logQ correction, or auto: full up to "
                        "50,000 items (default)")
    g.add_argument("--num-negatives", type=int, default=TRAIN.num_negatives,
                   help=f"shared negatives per batch for the sampled loss (default "
                        f"{TRAIN.num_negatives})")
    g.add_argument("--max-minutes", type=float,
                   help="wall-clock budget; once spent, the epoch ends, is validated and "
                        "checkpointed")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default=TRAIN.device, help="cpu or cuda (default cpu)")
    g.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = t.add_argument_group("interest-aware terms (SINE; each off at 0, added to Eq. 11)")
    g.add_argument("--interest-weight", type=float, default=TRAIN.interest_weight,
                   help="beta: weight of an item loss on the interests themselves beside Eq. 9 "
                        f"on the aggregate (default {TRAIN.interest_weight:g}: off)")
    g.add_argument("--interest-loss", choices=list(INTEREST_LOSSES), default=TRAIN.interest_loss,
                   help="argmax: the target against its best-matching interest; sample: an "
                        "interest drawn from softmax(T <phi_k, h>); logsumexp: items scored by "
                        f"logsumexp over the interests (default {TRAIN.interest_loss})")
    g.add_argument("--interest-T", type=float, default=TRAIN.interest_T,
                   help=f"T of --interest-loss sample (default {TRAIN.interest_T:g})")
    g.add_argument("--cos-penalty", type=float, default=TRAIN.cos_penalty,
                   help="alpha: weight of the mean pairwise cosine of a user's interests "
                        f"(default {TRAIN.cos_penalty:g}: off)")
    g.add_argument("--weight-kl", type=float, default=TRAIN.weight_kl,
                   help="gamma: weight of the KL that teaches the Eq. 7 weights the target's "
                        f"interest (default {TRAIN.weight_kl:g}: off)")
    g.add_argument("--weight-kl-T", type=float, default=TRAIN.weight_kl_T,
                   help=f"temperature of that KL's target (default {TRAIN.weight_kl_T:g})")
    g.add_argument("--prototype-refresh", action="store_true",
                   help="before every epoch but the first, set the L prototypes to the k-means "
                        "centres of the item embeddings as Eq. 3 compares them (default: off)")
    g = t.add_argument_group("fresh data")
    g.add_argument("--warm-start", type=Path, metavar="CHECKPOINT_OR_BUNDLE",
                   help="start from a trained model (a best.pt, or a bundle holding model.pt) "
                        "instead of the initialization; its items keep their rows, new items start "
                        "as --new-item-init says; the model flags are taken from it")
    g.add_argument("--new-item-init", choices=NEW_ITEM_INITS, default=TRAIN.new_item_init,
                   help="with --warm-start, a new item's first row: the old rows' mean plus "
                        "noise, or the mean of the rows of the items clicked just before and after "
                        f"it (default {TRAIN.new_item_init})")
    g.add_argument("--new-item-oversample", type=int, default=TRAIN.new_item_oversample,
                   help="with --warm-start, draw each window that ends in a new item this many "
                        f"times an epoch (default {TRAIN.new_item_oversample})")
    g.add_argument("--new-rows-only", action="store_true",
                   help="with --warm-start, fit the new items' rows alone: every other parameter "
                        "and every known row stays as it was, and an epoch draws the windows that "
                        "end in a new item (--new-item-oversample times each) and "
                        "--new-rows-replay times as many others")
    g.add_argument("--new-rows-replay", type=float, default=TRAIN.new_rows_replay,
                   help="with --new-rows-only, other windows drawn at random per new-item draw "
                        f"(default {TRAIN.new_rows_replay:g})")
    g.add_argument("--clicks", type=Path, metavar="FOLDER",
                   help="append the clicks of a `sine export-clicks` folder to --dataset")
    g.add_argument("--clicks-window-hours", type=float, default=WINDOW_HOURS,
                   help=f"use the clicks of the last this many hours before the newest (default "
                        f"{WINDOW_HOURS:g})")
    t.set_defaults(func=run)


def _model(a: argparse.Namespace, ds: Any) -> Any:
    from model_export.training import config_from_args, warm_start_source
    from model_export.training.workflow import model_config

    if a.warm_start:                         # the shape of the model it starts from
        shape = warm_start_source(a.warm_start)["model_args"]
        return config_from_args({**shape, "n_items": ds.n_items})
    if a.arch == "sasrec":
        sine_only = [f"--{k.replace('_', '-')}" for k in ("K", "L", "literal") if getattr(a, k)]
        if a.aggregation != "adaptive":
            sine_only.append("--aggregation")
        if a.activation != "attention":
            sine_only.append("--activation")
        if sine_only:
            raise CliError(f"{', '.join(sine_only)}: SINE's options; SASRec "
                           "takes --blocks, --heads and --dropout")
        return model_config(ds, "sasrec", D=a.D, n=a.seq_len, blocks=a.blocks, heads=a.heads,
                            dropout=a.dropout)
    return model_config(ds, K=a.K, L=a.L, D=a.D, n=a.seq_len, tau=a.tau,
                        tau_assign=a.tau_assign, literal=a.literal or None,
                        aggregation=a.aggregation, activation=a.activation, blocks=a.blocks,
                        heads=a.heads, dropout=a.dropout)


def _train_config(a: argparse.Namespace) -> Any:
    from model_export.configs import TrainConfig

    return TrainConfig(batch_size=a.batch_size, targets=a.targets, stride=a.stride, lr=a.lr, lam=a.lam, loss=a.loss,
                       num_negatives=a.num_negatives, max_epochs=a.epochs, patience=a.patience,
                       max_minutes=a.max_minutes, seed=a.seed, threads=a.threads, device=a.device,
                       interest_loss=a.interest_loss, interest_weight=a.interest_weight,
                       interest_T=a.interest_T, cos_penalty=a.cos_penalty,
                       weight_kl=a.weight_kl, weight_kl_T=a.weight_kl_T,
                       prototype_refresh=a.prototype_refresh,
                       new_item_init=a.new_item_init, new_item_oversample=a.new_item_oversample,
                       new_rows_only=a.new_rows_only, new_rows_replay=a.new_rows_replay)


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
