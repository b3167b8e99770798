"""Training (§3.4, Eq. 9-11) with validation-based early stopping and resumable checkpoints.

A checkpoint carries everything needed to rebuild the model and check it against data: the model
config (`model_args`), the training config, the item vocabulary and its hash, the optimizer and RNG
states and the per-epoch history. Checkpoints are written to a temporary file and renamed, so a
crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from index_builder.bundle import write_atomic

from .data import DataError, Dataset, dataset_info, split
from .evaluate import evaluate_model
from .sasrec import SASRec, SASRecConfig
from .sine import SINE, LogUniformSampler, SINEConfig

CHECKPOINT_FORMAT = 1
FULL_SOFTMAX_MAX_ITEMS = 50_000


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this data or code; the message says why and what to do."""


@dataclass
class TrainConfig:
    batch_size: int = 128
    lr: float = 1e-3
    lam: float = 0.5                 # Eq. 11 lambda, weight of the covariance regularizer
    loss: str = "auto"               # "full", "sampled", or "auto" (full up to 50k items)
    num_negatives: int = 1280        # shared sampled negatives per batch (sampled loss)
    max_epochs: int = 30
    patience: int = 3                # epochs without a validation gain before stopping
    select_metric: str = "NDCG@10"   # validation metric for early stopping
    max_minutes: float | None = None  # wall-clock budget for the whole run
    seed: int = 42
    threads: int | None = None
    eval_batch_size: int = 1024
    device: str = "cpu"

    def resolved_loss(self, n_items: int) -> str:
        if self.loss == "auto":
            return "full" if n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be auto, full or sampled, not {self.loss!r}")
        return self.loss


@dataclass
class TrainResult:
    best_epoch: int
    best_valid: dict
    epochs_run: int
    seconds: float
    history: list = field(default_factory=list)
    stopped_because: str = ""


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


@dataclass
class Dist:
    """Where this process stands in a `torchrun` job: rank 0 of 1 when run alone."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_context(device: str = "cpu") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as td

    if not td.is_available() or not td.is_torchelastic_launched():
        return Dist()
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), td.get_node_local_rank(fallback_rank=0))


class _Objective(torch.nn.Module):
    """Eq. 11 for one batch as one module, so that DistributedDataParallel sees the whole step
    (the softmax over the item table included) inside its forward."""

    def __init__(self, model: Encoder, sampler: LogUniformSampler | None, gen: torch.Generator,
                 lam: float):
        super().__init__()
        self.model, self.sampler, self.gen, self.lam = model, sampler, gen, lam

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        _, v, _ = self.model(x)                                        # [B, D]
        if self.sampler is None:
            like = self.model.full_softmax_loss(v, y)
        else:
            like = self.model.sampled_softmax_loss(v, y, self.sampler, self.gen)
        reg = self.model.covariance_loss()
        return like + self.lam * reg, like.detach(), reg.detach()     # Eq. 11


def _any(flag: bool, dist: Dist) -> bool:
    """True on every rank when it is true on one (a time budget read off each rank's clock)."""
    if dist.world == 1:
        return flag
    import torch.distributed as td
    t = torch.tensor([int(flag)])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def _from_main(value, dist: Dist):
    """Rank 0's `value` on every rank."""
    if dist.world == 1:
        return value
    import torch.distributed as td
    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):   # last partial batch dropped, as the authors
        yield perm[i:i + batch_size]


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


def warm_start(model: Encoder, ck: dict, ds: Dataset, seed: int = 0) -> tuple[int, int]:
    """Start `model` (built for `ds`, whose vocabulary may have grown) from a trained one.

    Every parameter but the item table is copied. An item the old model knew keeps its row
    (matched by external id: internal ids are re-ranked by popularity on every data set). A new
    item starts at the mean of the old item rows plus Gaussian noise of `WARM_START_NOISE` times
    their per-coordinate standard deviation: near the centre of the item space, where its first
    training steps can move it, rather than at a random far point. Returns (kept, new) items."""
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
        H = mean + WARM_START_NOISE * std * torch.randn(len(ds.item_ids), old_H.shape[1],
                                                        generator=g)  # [M + 1, D]
        H[known] = old_H[new_ids[known]]
        H[0] = 0.0
        rest = {k: v for k, v in state.items() if k != "H.weight"}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if set(missing) != {"H.weight"} or unexpected:
            raise CheckpointError(f"warm start: parameters differ ({missing}, {unexpected}).")
        model.H.weight.copy_(H.to(model.H.weight.device))
    kept = int(known.sum())
    return kept, ds.n_items - kept


def train(ds: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path,
          resume: Path | None = None, progress: bool = True, log=print,
          warm_start_from: Path | str | None = None) -> TrainResult:
    """Train, keep `best.pt` (best validation) and `last.pt` (resume point) in `out_dir`.

    `warm_start_from` (a checkpoint or a bundle) starts from a trained model instead of the
    initialization (`warm_start`). `max_epochs = 0` trains nothing: the starting model is
    validated and saved as it is.

    Under `torchrun` (DistributedDataParallel) every rank draws the same global batches and
    takes its own slice of each (`batch[rank::world]`), so a step averages the gradient over
    the same samples as one process would: the same run, up to the order of float sums. Rank 0
    validates, checkpoints and logs; the others follow its decisions."""
    out_dir = Path(out_dir)
    dist = dist_context(cfg.device)
    if not dist.main:
        log, progress = (lambda *a, **k: None), False
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sp = split(ds, model_cfg.n)
    if len(sp.train_targets) < cfg.batch_size:
        raise DataError(f"{ds.name}: {len(sp.train_targets)} training samples, fewer than one batch "
                         f"of {cfg.batch_size}; lower --batch-size or use more data.")
    if cfg.batch_size % dist.world:
        raise DataError(f"--batch-size {cfg.batch_size} does not split evenly over {dist.world} "
                        "processes; make it a multiple of their number.")
    dev = torch.device(f"cuda:{dist.local_rank}" if cfg.device.startswith("cuda")
                       and dist.world > 1 else cfg.device)
    model = build_model(model_cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_kind = cfg.resolved_loss(ds.n_items)
    sampler = LogUniformSampler(ds.n_items, cfg.num_negatives) if loss_kind == "sampled" else None
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict] = []
    start_epoch, best_epoch, best_score, best_valid = 0, -1, -math.inf, {}
    elapsed_before = 0.0
    if resume is not None:
        ck = load_checkpoint(resume, ds)
        if ck["model_args"] != asdict(model_cfg):
            raise CheckpointError(f"{resume}: model config {ck['model_args']} differs from the one "
                                  f"asked for {asdict(model_cfg)}; resume with the same settings.")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])  # moved to the parameters' device by torch
        torch.set_rng_state(ck["torch_rng"])
        gen.set_state(ck["sampler_rng"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
        best_epoch, best_score, best_valid = ck["best_epoch"], ck["best_score"], ck["best_valid"]
        elapsed_before = ck.get("seconds", 0.0)
        log(f"resumed from {resume} at epoch {start_epoch}")
    elif warm_start_from is not None:
        kept, new = warm_start(model, warm_start_source(warm_start_from), ds, cfg.seed)
        log(f"warm start from {warm_start_from}: {kept:,} items kept their rows, {new:,} new")

    def checkpoint(epoch: int, seconds: float) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model_args": asdict(model_cfg),
                "train_args": asdict(cfg), "dataset": dataset_info(ds), "item_ids": ds.item_ids,
                "model": {k: t.cpu() for k, t in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "sampler_rng": gen.get_state(),
                "epoch": epoch, "history": history, "best_epoch": best_epoch,
                "best_score": best_score, "best_valid": best_valid, "seconds": seconds,
                "loss_kind": loss_kind}

    t0 = time.perf_counter() - elapsed_before
    N = len(sp.train_targets)
    steps = N // cfg.batch_size
    stopped = "max_epochs"
    log(f"{ds.summary()}; {N:,} training samples, {steps:,} steps/epoch, loss={loss_kind}, "
        f"{describe(model_cfg)} lambda={cfg.lam}")
    bar_cls = _tqdm() if progress else None
    objective: torch.nn.Module = _Objective(model, sampler, gen, cfg.lam)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        objective = DistributedDataParallel(
            objective, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.max_epochs == 0 and resume is None:          # the starting model, as it is
        if dist.main:
            best_valid = evaluate_model(model, ds, sp, "valid", batch_size=cfg.eval_batch_size)
            best_epoch, best_score = 0, best_valid[cfg.select_metric]
            ck = checkpoint(-1, time.perf_counter() - t0)
            atomic_save(ck, out_dir / "best.pt")
            atomic_save(ck, out_dir / "last.pt")
        best_valid = _from_main(best_valid, dist)
        return TrainResult(best_epoch=0, best_valid=best_valid, epochs_run=0,
                           seconds=time.perf_counter() - t0, history=[],
                           stopped_because="no_epochs")
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.max_epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        bar = bar_cls(total=steps, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", unit="batch",
                      leave=False, mininterval=1.0) if bar_cls else None
        ep_loss, ep_reg, n_b, t_ep = 0.0, 0.0, 0, time.perf_counter()
        for b in _batches(N, cfg.batch_size, rng):
            b = b[dist.rank::dist.world]                               # this rank's slice
            x = torch.from_numpy(sp.train_inputs[b]).long().to(dev)  # [B / world, n]
            y = torch.from_numpy(sp.train_targets[b]).to(dev)         # [B / world]
            loss, like, reg = objective(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ep_loss += like.item()
            ep_reg += reg.item()
            n_b += 1
            if bar is not None:
                bar.update(1)
                if n_b % 50 == 0:
                    rate = n_b * cfg.batch_size / (time.perf_counter() - t_ep)
                    bar.set_postfix(loss=f"{ep_loss / n_b:.4f}", samples_s=f"{rate:,.0f}")
            if cfg.max_minutes and _any(time.perf_counter() - t0 > cfg.max_minutes * 60, dist):
                stopped = "time_budget"
                break
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t_ep
        if dist.world > 1:                           # the epoch's losses over every rank
            import torch.distributed as td
            sums = torch.tensor([ep_loss, ep_reg], dtype=torch.float64)
            td.all_reduce(sums)
            ep_loss, ep_reg = (sums / dist.world).tolist()
        if not dist.main:
            history.append({})
            if _from_main(None, dist):
                break
            continue
        valid = evaluate_model(model, ds, sp, "valid", batch_size=cfg.eval_batch_size)
        score = valid[cfg.select_metric]
        row = {"epoch": epoch + 1, "loss": ep_loss / max(n_b, 1), "reg": ep_reg / max(n_b, 1),
               "train_seconds": train_s, "samples_per_s": n_b * cfg.batch_size / max(train_s, 1e-9),
               "elapsed_s": time.perf_counter() - t0,
               **{f"valid_{k}": v for k, v in valid.items()}}
        history.append(row)
        improved = score > best_score
        if improved:
            best_score, best_epoch, best_valid = score, epoch + 1, valid
        log(f"epoch {epoch + 1}: loss {row['loss']:.4f} reg {row['reg']:.5f} "
            f"{row['samples_per_s']:,.0f} samples/s | valid HR@10 {valid['HR@10']:.4f} "
            f"NDCG@10 {valid['NDCG@10']:.4f} HR@50 {valid['HR@50']:.4f}"
            f"{'  *best*' if improved else ''}")
        ck = checkpoint(epoch, time.perf_counter() - t0)
        if improved:
            atomic_save(ck, out_dir / "best.pt")
        atomic_save(ck, out_dir / "last.pt")
        atomic_write_text(json.dumps(history, indent=1), out_dir / "history.json")
        if stopped != "time_budget" and epoch + 1 - best_epoch >= cfg.patience:
            stopped = "early_stopping"
        if _from_main(stopped in ("time_budget", "early_stopping"), dist):
            break
    if dist.world > 1:
        best_epoch, best_valid, stopped, history = _from_main(
            (best_epoch, best_valid, stopped, history), dist)
    return TrainResult(best_epoch=best_epoch, best_valid=best_valid, epochs_run=len(history),
                       seconds=time.perf_counter() - t0, history=history, stopped_because=stopped)


def _tqdm():
    try:
        from tqdm.auto import tqdm
        return tqdm
    except ImportError:  # pragma: no cover
        return None
