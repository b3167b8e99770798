"""Checkpoints: what a training run saves and reads back, and warm starts from a trained model.

A checkpoint carries everything needed to rebuild the model and check it against data: the model
config (`model_args`), the training config, the item vocabulary and its hash, the optimizer and RNG
states and the per-epoch history. Checkpoints are written to a temporary file and renamed, so a
crash never leaves a half-written file under the final name, and read weights-only: tensors and
plain data, never a pickled object that would run code.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from index_builder.bundle import SineError, write_atomic

from ..configs import SASRecConfig, SINEConfig
from ..data import Dataset
from ..models.sasrec import SASRec
from ..models.sine import SINE

CHECKPOINT_FORMAT = 1


class CheckpointError(SineError, ValueError):
    """A checkpoint cannot be used with this data or code; the message says why and what to do."""


def atomic_save(obj, path: Path) -> None:
    """torch.save through the bundle's temp-file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"))


def load_checkpoint(path: Path, ds: Dataset | None = None) -> dict:
    """Load and check a checkpoint; with `ds`, refuse one trained on another item vocabulary."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found.")
    try:
        # tensors and plain containers only: a checkpoint (or a bundle's model.pt, which anyone
        # who can write to the bundle store can replace) never runs code when it is read
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the object it would have built: "... unsupported GLOBAL posix.system ..."
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if what is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file). "
                                  "Retrain or point to another file.") from None
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data, a "
                              f"pickled object that would run code when loaded ({what}).") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). "
                              "Retrain or point to another file.") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ck.get('format') if isinstance(ck, dict) else '?'}"
                              f" is not {CHECKPOINT_FORMAT}; retrain with this version.")
    if ds is not None:
        info = ck["dataset"]
        if info["vocab_sha256"] != ds.vocab_sha256() or info["items"] != ds.n_items:
            raise CheckpointError(
                f"{path}: trained on {info['name']} with {info['items']} items (vocabulary "
                f"{info['vocab_sha256'][:12]}), but the data given has {ds.n_items} items "
                f"(vocabulary {ds.vocab_sha256()[:12]}). Use the data set it was trained on, "
                "or train a new model.")
    return ck


ModelConfig = SINEConfig | SASRecConfig
Encoder = SINE | SASRec


def config_from_args(args: dict) -> ModelConfig:
    """The model config a checkpoint's `model_args` describe (no `arch`: SINE)."""
    return SASRecConfig(**args) if args.get("arch") == "sasrec" else SINEConfig(**args)


def build_model(cfg: ModelConfig) -> Encoder:
    return SASRec(cfg) if isinstance(cfg, SASRecConfig) else SINE(cfg)


def describe(cfg: ModelConfig) -> str:
    if isinstance(cfg, SASRecConfig):
        return f"SASRec blocks={cfg.blocks} heads={cfg.heads} dropout={cfg.dropout} D={cfg.D}"
    return f"K={cfg.K} L={cfg.L} D={cfg.D}"


def model_from_checkpoint(ck: dict) -> Encoder:
    try:
        model = build_model(config_from_args(ck["model_args"]))
        model.load_state_dict(ck["model"])
    except (TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not match this model code: {e}") from e
    model.eval()
    return model


def warm_start_source(path: Path | str) -> dict:
    """The model to warm-start from: a checkpoint (`best.pt`), or a bundle folder or root whose
    version holds `model.pt` (written by `sine export`)."""
    p = Path(path)
    if p.is_dir():
        from index_builder import bundle as bundle_mod
        try:
            b = bundle_mod.load(p, deep=False, optional=True)
        except bundle_mod.BundleError as e:
            raise CheckpointError(f"cannot warm-start from {p}: {e}") from None
        if not b.has("model"):
            raise CheckpointError(f"{b.path}: this bundle holds no model.pt (it was built before "
                                  "bundles kept the model); warm-start from its checkpoint.")
        p = b.file("model")
    return load_checkpoint(p)


WARM_START_NOISE = 0.1      # new item rows: the old rows' mean plus this much of their spread


def warm_start(model: Encoder, ck: dict, ds: Dataset, seed: int = 0,
               init: str = "mean") -> torch.Tensor:
    """Start `model` (built for `ds`, whose vocabulary may have grown) from a trained one.

    Every parameter but the item table is copied. An item the old model knew keeps its row
    (matched by external id: internal ids are re-ranked by popularity on every data set). A new
    item starts, with `init="mean"`, at the mean of the old item rows plus Gaussian noise of
    `WARM_START_NOISE` times their per-coordinate standard deviation: near the centre of the
    item space, where its first training steps can move it, rather than at a random far point.
    With `init="neighbours"` it starts at the mean of the old rows of the items clicked just
    before and just after it in `ds`'s sequences, weighted by how often (plus the same noise),
    which puts it among what its clickers watch; a new item with no known neighbour falls back
    to the global mean. Returns the new items' mask over `ds`'s internal ids [M + 1]."""
    old_cfg = dict(ck["model_args"])
    new_cfg = asdict(model.config)
    if {k: v for k, v in old_cfg.items() if k != "n_items"} != \
            {k: v for k, v in new_cfg.items() if k != "n_items"}:
        raise CheckpointError(f"warm start: the model config {old_cfg} differs from {new_cfg} "
                              "beyond the item count; train with the same D, n, K, L and variants.")
    state = ck["model"]
    old_H = state["H.weight"].float()                                  # [M_old + 1, D]
    old_index = {x: i for i, x in enumerate(ck["item_ids"]) if i}
    new_ids = torch.tensor([old_index.get(x, 0) for x in ds.item_ids])  # [M + 1], 0 = new
    known = new_ids > 0
    known[0] = False
    g = torch.Generator().manual_seed(seed)
    mean, std = old_H[1:].mean(0), old_H[1:].std(0)                    # [D], [D]
    with torch.no_grad():
        noise = WARM_START_NOISE * std * torch.randn(len(ds.item_ids), old_H.shape[1],
                                                     generator=g)     # [M + 1, D]
        H = mean + noise                                               # [M + 1, D]
        if init == "neighbours":
            near, has = _neighbour_rows(ds, old_H, new_ids, known)     # [M + 1, D], [M + 1]
            H[has] = near[has] + noise[has]
        H[known] = old_H[new_ids[known]]
        H[0] = 0.0
        rest = {k: v for k, v in state.items() if k != "H.weight"}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if set(missing) != {"H.weight"} or unexpected:
            raise CheckpointError(f"warm start: parameters differ ({missing}, {unexpected}).")
        model.H.weight.copy_(H.to(model.H.weight.device))
    fresh = ~known
    fresh[0] = False
    return fresh


def _neighbour_rows(ds: Dataset, old_H: torch.Tensor, new_ids: torch.Tensor,
                    known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the count-weighted mean old row of each item's known neighbours in the sequences, which
    items have one). Neighbours: the item clicked just before and just after, per click."""
    seqs = [np.asarray(s, dtype=np.int64) for s in ds.sequences if len(s) > 1]
    if not seqs:
        return torch.zeros_like(old_H[:1]).expand(len(new_ids), -1), torch.zeros(
            len(new_ids), dtype=torch.bool)
    a = torch.from_numpy(np.concatenate([s[:-1] for s in seqs]))      # [P] clicked first
    b = torch.from_numpy(np.concatenate([s[1:] for s in seqs]))       # [P] clicked next
    item = torch.cat([a, b])                                          # [2P] each item ...
    other = torch.cat([b, a])                                         # [2P] ... and its neighbour
    keep = ~known[item] & (item > 0) & known[other]                   # new item, known neighbour
    item, other = item[keep], other[keep]
    sums = torch.zeros(len(new_ids), old_H.shape[1])                  # [M + 1, D]
    sums.index_add_(0, item, old_H[new_ids[other]])
    counts = torch.zeros(len(new_ids)).index_add_(0, item, torch.ones(len(item)))  # [M + 1]
    has = counts > 0
    return sums / counts.clamp(min=1)[:, None], has
