"""Train-then-evaluate steps shared by the `sine` CLI and the accuracy benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..configs import SASRecConfig, SINEConfig, TrainConfig
from ..data import Dataset, split
from ..evaluation.evaluate import concept_analysis, evaluate_model, evaluate_popularity
from ..evaluation.report import plot_curves, render
from ..models.sine import SINE
from . import checkpoints as training
from .checkpoints import ModelConfig, atomic_write_text
from .loop import TrainResult, train

# Table 3 of the paper; other data sets take the MovieLens setting
PRESETS = {"ml-1m": {"K": 4, "L": 50}, "amazon-beauty": {"K": 4, "L": 500}}
# SASRec's paper: dropout 0.2 on MovieLens, 0.5 on the sparse Amazon logs
SASREC_PRESETS = {"amazon-beauty": {"dropout": 0.5}}
ARCHS = ("sine", "sasrec")


def model_config(ds: Dataset, arch: str = "sine", **overrides) -> ModelConfig:
    """SINE's config (Table 3 presets) or, with `arch="sasrec"`, SASRec's; `None` overrides
    are ignored, and SINE-only ones (K, L, temperatures, ...) are refused for SASRec."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if arch == "sasrec":
        allowed = {"D", "n", "blocks", "heads", "dropout"}
        if set(given) - allowed:
            raise ValueError(f"SASRec takes {sorted(allowed)}, not {sorted(set(given) - allowed)}")
        return SASRecConfig(n_items=ds.n_items, **{**SASREC_PRESETS.get(ds.name, {}), **given})
    if arch != "sine":
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    args: dict[str, Any] = {"K": 4, "L": 50, **PRESETS.get(ds.name, {})}
    args.update(given)
    if ds.name not in PRESETS and "L" not in overrides:
        args["L"] = min(args["L"], ds.n_items)
    return SINEConfig(n_items=ds.n_items, **args)


def evaluate_checkpoint(ck_path: Path, ds: Dataset, out_dir: Path | None = None,
                        exclude_history: bool = True, with_popularity: bool = True) -> dict:
    """Metrics on valid and test (+ popularity), concepts; with `out_dir`, report.md + curves.png."""
    ck = training.load_checkpoint(ck_path, ds)
    model = training.model_from_checkpoint(ck)
    sp = split(ds, model.config.n)
    name = type(model).__name__                                       # "SINE" or "SASRec"
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for which in ("valid", "test"):
        rows = {name: evaluate_model(model, ds, sp, which, exclude_history)}
        if with_popularity:
            rows["Popularity"] = evaluate_popularity(ds, sp, which, exclude_history)
        metrics[which] = rows
    with torch.no_grad():
        concepts = concept_analysis(model, ds, sp) if isinstance(model, SINE) else {}
    # best.pt holds the history up to its own epoch; the run's full history sits beside it
    history = ck["history"]
    hist_file = Path(ck_path).parent / "history.json"
    if hist_file.exists():
        full = json.loads(hist_file.read_text())
        if len(full) > len(history) and full[:len(history)] == history:
            history = full
    result = {"model_name": name, "metrics": metrics, "concepts": concepts, "best_epoch": ck["best_epoch"],
              "epochs_run": len(history), "seconds": ck.get("seconds"),
              "model_args": ck["model_args"], "train_args": ck["train_args"],
              "loss_kind": ck.get("loss_kind"), "history": history}
    if out_dir is not None:
        out_dir = Path(out_dir)
        curves = plot_curves(history, out_dir / "curves.png", f"{name} on {ds.name}", ck["best_epoch"])
        text = render(ds.name, metrics, concepts, {**ck, "history": history},
                      curves.name if curves else None)
        atomic_write_text(text, out_dir / "report.md")
        atomic_write_text(json.dumps(result, indent=1), out_dir / "metrics.json")
    return result


def train_and_report(ds: Dataset, mcfg: ModelConfig, tcfg: TrainConfig, out_dir: Path,
                     resume: Path | None = None, progress: bool = True, log=print,
                     warm_start_from: Path | None = None) -> tuple[TrainResult, dict]:
    """`sine train`: train with early stopping, then evaluate `best.pt` and write the report.
    Under torchrun only rank 0 reports; the other ranks return an empty report."""
    import torch.distributed as td

    from .distributed import dist_context

    res = train(ds, mcfg, tcfg, out_dir, resume=resume, progress=progress, log=log,
                warm_start_from=warm_start_from)
    main = dist_context(tcfg.device).main
    try:
        if not main:
            return res, {}
        log(f"stopped ({res.stopped_because}) after {res.epochs_run} epochs, {res.seconds:.0f} s; "
            f"best epoch {res.best_epoch}")
        return res, evaluate_checkpoint(Path(out_dir) / "best.pt", ds, out_dir)
    finally:
        if td.is_available() and td.is_initialized():
            # every rank leaves together: a rank that tore gloo down while rank 0 still evaluated
            # aborted in its listener thread under load
            td.barrier()
            td.destroy_process_group()
