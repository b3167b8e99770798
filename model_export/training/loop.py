"""Training (§3.4, Eq. 9-11) with validation-based early stopping and resumable checkpoints.

`train` sets a run up (`_Run`: the model, the optimizer, the samplers' RNGs and `RunState`, what
a checkpoint records of where the run stands), resumes or warm-starts it, then alternates an
epoch (`_Run.epoch`) and a validation that checkpoints and decides whether to stop
(`_Run.validate`). Under `torchrun` rank 0 validates, checkpoints and logs; the others follow.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import TrainConfig
from ..data import DataError, Dataset, dataset_info, dense_windows, split
from ..evaluation.evaluate import evaluate_model
from ..models.sine import SINE, LogUniformSampler
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    Encoder,
    ModelConfig,
    atomic_save,
    atomic_write_text,
    build_model,
    describe,
    load_checkpoint,
    warm_start,
    warm_start_source,
)
from .distributed import Dist, any_rank, dist_context, from_main
from .interests import interest_terms, refresh_prototypes


@dataclass
class TrainResult:
    """How a training run ended: its best epoch, best validation metrics and history."""
    best_epoch: int
    best_valid: dict
    epochs_run: int
    seconds: float
    history: list = field(default_factory=list)
    stopped_because: str = ""


@dataclass
class RunState:
    """Where a run stands, as its checkpoints record it."""
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best_epoch: int = -1
    best_score: float = -math.inf
    best_valid: dict = field(default_factory=dict)
    elapsed_before: float = 0.0
    stopped: str = "max_epochs"


@dataclass
class EpochStats:
    """One epoch's summed losses, its batch count and its seconds."""
    loss: float                      # the likelihood part of Eq. 11, summed over batches
    reg: float                       # the Eq. 10 regularizer, summed
    batches: int
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)   # the interest terms that are on, summed


class _Objective(torch.nn.Module):
    """Eq. 11 for one batch as one module, so that DistributedDataParallel sees the whole step
    (the softmax over the item table included) inside its forward."""

    def __init__(self, model: Encoder, sampler: LogUniformSampler | None, gen: torch.Generator,
                 cfg: TrainConfig):
        super().__init__()
        self.model, self.sampler, self.gen, self.cfg = model, sampler, gen, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        if y.dim() == 2:                                               # dense: a target per slot
            keep = y > 0                                               # [B, n]
            phi, v, e = (t[keep] for t in self.model.forward_prefixes(x))   # [T, K, D], [T, D], [T, K]
            y = y[keep]                                                # [T]
        else:
            phi, v, e = self.model(x)                                  # [B, K, D], [B, D], [B, K]
        if self.sampler is None:
            like = self.model.full_softmax_loss(v, y)
        else:
            like = self.model.sampled_softmax_loss(v, y, self.sampler, self.gen)
        reg = self.model.covariance_loss()
        loss = like + self.cfg.lam * reg                               # Eq. 11
        terms = interest_terms(self.model, phi, e, y, self.cfg, self.sampler, self.gen)
        for t in terms.values():
            loss = loss + t
        return loss, like.detach(), reg.detach(), {k: t.detach() for k, t in terms.items()}


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):   # last partial batch dropped, as the authors
        yield perm[i:i + batch_size]


class _Run:
    """One training run's moving parts and its `RunState`."""

    def __init__(self, ds: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path,
                 dist: Dist, log: Callable[..., None]):
        self.ds, self.model_cfg, self.cfg, self.out_dir, self.dist, self.log = \
            ds, model_cfg, cfg, out_dir, dist, log
        self.sp = split(ds, model_cfg.n)
        # the training windows [N, n] and their targets: [N], or [N, n] for dense targets
        self.inputs, self.targets = ((self.sp.train_inputs, self.sp.train_targets)
                                     if cfg.targets == "last" else
                                     dense_windows(ds, model_cfg.n, cfg.stride))
        self.order: np.ndarray | None = None     # the windows an epoch draws, when oversampled
        if len(self.targets) < cfg.batch_size:
            raise DataError(f"{ds.name}: {len(self.targets)} training windows, fewer "
                            f"than one batch of {cfg.batch_size}; lower --batch-size or use more "
                            "data.")
        if cfg.batch_size % dist.world:
            raise DataError(f"--batch-size {cfg.batch_size} does not split evenly over "
                            f"{dist.world} processes; make it a multiple of their number.")
        self.dev = torch.device(f"cuda:{dist.local_rank}" if cfg.device.startswith("cuda")
                                and dist.world > 1 else cfg.device)
        self.model = build_model(model_cfg).to(self.dev)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.loss_kind = cfg.resolved_loss(ds.n_items)
        self.sampler = (LogUniformSampler(ds.n_items, cfg.num_negatives)
                        if self.loss_kind == "sampled" else None)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.state = RunState()
        self.objective: torch.nn.Module | None = None

    def wrap(self) -> None:
        """The objective the epochs step, once the starting point is in the model (under
        torchrun, DistributedDataParallel around it)."""
        self.objective = _Objective(self.model, self.sampler, self.gen, self.cfg)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)

    # -- starting points ----------------------------------------------------------------------

    def resume(self, path: Path) -> None:
        ck = load_checkpoint(path, self.ds)
        if ck["model_args"] != asdict(self.model_cfg):
            raise CheckpointError(f"{path}: model config {ck['model_args']} differs from the one "
                                  f"asked for {asdict(self.model_cfg)}; resume with the same "
                                  "settings.")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])  # moved to the parameters' device by torch
        torch.set_rng_state(ck["torch_rng"])
        self.gen.set_state(ck["sampler_rng"])
        self.state = RunState(history=ck["history"], start_epoch=ck["epoch"] + 1,
                              best_epoch=ck["best_epoch"], best_score=ck["best_score"],
                              best_valid=ck["best_valid"], elapsed_before=ck.get("seconds", 0.0))
        self.log(f"resumed from {path} at epoch {self.state.start_epoch}")

    def warm(self, source: Path | str) -> None:
        fresh = warm_start(self.model, warm_start_source(source), self.ds, self.cfg.seed,
                           init=self.cfg.new_item_init)
        new = int(fresh.sum())
        self.log(f"warm start from {source}: {self.ds.n_items - new:,} items kept their rows, "
                 f"{new:,} new ({self.cfg.new_item_init} rows)")
        hit = np.flatnonzero(fresh.numpy()[self.targets].reshape(len(self.targets), -1).any(1))  # windows with one
        if self.cfg.new_rows_only:
            self.freeze_all_but(fresh, hit)
        elif self.cfg.new_item_oversample > 1 and new:
            # every window whose target is a new item, that many more times an epoch
            extra = np.repeat(hit, self.cfg.new_item_oversample - 1)
            self.order = np.concatenate([np.arange(len(self.targets)), extra])
            self.log(f"  {len(hit):,} windows end in a new item: {len(extra):,} more an epoch")

    def freeze_all_but(self, fresh: torch.Tensor, hit: np.ndarray) -> None:
        """`new_rows_only`: only the rows of `fresh` items learn, on the windows `hit`."""
        if not len(hit):
            raise DataError(f"{self.ds.name}: no training window ends in a new item, so there "
                            "are no new rows to fit; train without --new-rows-only.")
        for name, prm in self.model.named_parameters():
            prm.requires_grad_(name == "H.weight")
        keep = fresh.to(self.dev, torch.float32)[:, None]               # [M + 1, 1]
        # a zero gradient leaves Adam's moments at zero, so a known row never moves
        self.model.H.weight.register_hook(lambda g: g * keep)
        order = np.repeat(hit, self.cfg.new_item_oversample)
        rest = np.setdiff1d(np.arange(len(self.targets)), hit)
        n_replay = min(len(rest), int(round(self.cfg.new_rows_replay * len(order))))
        replay = np.random.default_rng(self.cfg.seed).choice(rest, n_replay, replace=False)
        order = np.concatenate([order, replay])
        self.order = np.resize(order, max(len(order), self.cfg.batch_size))  # a batch at least
        self.log(f"  new rows only: {int(fresh.sum()):,} rows learn, on {len(hit):,} windows "
                 f"that end in one and {n_replay:,} others ({len(self.order):,} draws an "
                 "epoch); everything else is frozen")

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, epoch: int, seconds: float) -> dict[str, Any]:
        st = self.state
        return {"format": CHECKPOINT_FORMAT, "model_args": asdict(self.model_cfg),
                "train_args": asdict(self.cfg), "dataset": dataset_info(self.ds),
                "item_ids": self.ds.item_ids,
                "model": {k: t.cpu() for k, t in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "sampler_rng": self.gen.get_state(),
                "epoch": epoch, "history": st.history, "best_epoch": st.best_epoch,
                "best_score": st.best_score, "best_valid": st.best_valid, "seconds": seconds,
                "loss_kind": self.loss_kind}

    def save(self, epoch: int, seconds: float, best: bool) -> None:
        ck = self.checkpoint(epoch, seconds)
        if best:
            atomic_save(ck, self.out_dir / "best.pt")
        atomic_save(ck, self.out_dir / "last.pt")

    def as_it_is(self, t0: float) -> TrainResult:
        """`max_epochs = 0`: the starting model, validated and saved as it is."""
        st, cfg = self.state, self.cfg
        if self.dist.main:
            st.best_valid = evaluate_model(self.model, self.ds, self.sp, "valid",
                                           batch_size=cfg.eval_batch_size)
            st.best_epoch, st.best_score = 0, st.best_valid[cfg.select_metric]
            self.save(-1, time.perf_counter() - t0, best=True)
        best_valid = from_main(st.best_valid, self.dist)
        return TrainResult(best_epoch=0, best_valid=best_valid, epochs_run=0,
                           seconds=time.perf_counter() - t0, history=[],
                           stopped_because="no_epochs")

    # -- one epoch, then its validation -------------------------------------------------------

    def epoch(self, epoch: int, t0: float, bar_cls: Any) -> EpochStats:
        cfg, dist = self.cfg, self.dist
        if cfg.prototype_refresh and epoch > 0 and isinstance(self.model, SINE):
            refresh_prototypes(self.model, seed=cfg.seed + epoch)     # every rank alike
            self.opt.state.pop(self.model.C, None)                    # Adam's moments were C's old rows'
        self.model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = self.order
        N = len(order) if order is not None else len(self.targets)
        bar = bar_cls(total=N // cfg.batch_size, desc=f"epoch {epoch + 1}/{cfg.max_epochs}",
                      unit="batch", leave=False, mininterval=1.0) if bar_cls else None
        loss_sum, reg_sum, n_b, t_ep = 0.0, 0.0, 0, time.perf_counter()
        term_sums: dict[str, float] = {}
        for b in _batches(N, cfg.batch_size, rng):
            if order is not None:
                b = order[b]                                           # windows, oversampled
            b = b[dist.rank::dist.world]                               # this rank's slice
            x = torch.from_numpy(self.inputs[b]).long().to(self.dev)      # [B / world, n]
            y = torch.from_numpy(self.targets[b]).long().to(self.dev)      # [B / world (, n)]
            loss, like, reg, terms = self.objective(x, y)  # type: ignore[misc]  # wrap() came first
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += like.item()
            reg_sum += reg.item()
            for name, t in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + t.item()
            n_b += 1
            if bar is not None:
                bar.update(1)
                if n_b % 50 == 0:
                    rate = n_b * cfg.batch_size / (time.perf_counter() - t_ep)
                    bar.set_postfix(loss=f"{loss_sum / n_b:.4f}", samples_s=f"{rate:,.0f}")
            if cfg.max_minutes and any_rank(time.perf_counter() - t0 > cfg.max_minutes * 60, dist):
                self.state.stopped = "time_budget"
                break
        if bar is not None:
            bar.close()
        stats = EpochStats(loss_sum, reg_sum, n_b, time.perf_counter() - t_ep, term_sums)
        if dist.world > 1:                           # the epoch's losses over every rank
            import torch.distributed as td
            names = sorted(stats.terms)
            sums = torch.tensor([stats.loss, stats.reg, *(stats.terms[k] for k in names)],
                                dtype=torch.float64)
            td.all_reduce(sums)
            stats.loss, stats.reg, *rest = (sums / dist.world).tolist()
            stats.terms = dict(zip(names, rest))
        return stats

    def validate(self, epoch: int, stats: EpochStats, t0: float) -> bool:
        """Rank 0: validate, log, checkpoint, and decide whether the run stops (True)."""
        cfg, st = self.cfg, self.state
        valid = evaluate_model(self.model, self.ds, self.sp, "valid",
                               batch_size=cfg.eval_batch_size)
        score = valid[cfg.select_metric]
        n_b = max(stats.batches, 1)
        row = {"epoch": epoch + 1, "loss": stats.loss / n_b, "reg": stats.reg / n_b,
               "train_seconds": stats.seconds,
               "samples_per_s": stats.batches * cfg.batch_size / max(stats.seconds, 1e-9),
               "elapsed_s": time.perf_counter() - t0,
               **{f"term_{k}": v / n_b for k, v in stats.terms.items()},
               **{f"valid_{k}": v for k, v in valid.items()}}
        st.history.append(row)
        improved = score > st.best_score
        if improved:
            st.best_score, st.best_epoch, st.best_valid = score, epoch + 1, valid
        self.log(f"epoch {epoch + 1}: loss {row['loss']:.4f} reg {row['reg']:.5f} "
                 f"{row['samples_per_s']:,.0f} samples/s | valid HR@10 {valid['HR@10']:.4f} "
                 f"NDCG@10 {valid['NDCG@10']:.4f} HR@50 {valid['HR@50']:.4f}"
                 f"{'  *best*' if improved else ''}")
        self.save(epoch, time.perf_counter() - t0, best=improved)
        atomic_write_text(json.dumps(st.history, indent=1), self.out_dir / "history.json")
        if st.stopped != "time_budget" and epoch + 1 - st.best_epoch >= cfg.patience:
            st.stopped = "early_stopping"
        return st.stopped in ("time_budget", "early_stopping")


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
    run = _Run(ds, model_cfg, cfg, out_dir, dist, log)
    if resume is not None:
        run.resume(resume)
    elif warm_start_from is not None:
        run.warm(warm_start_from)
    st = run.state
    t0 = time.perf_counter() - st.elapsed_before
    N = len(run.targets)
    pairs = int((run.targets > 0).sum())
    log(f"{ds.summary()}; {N:,} training windows ({pairs:,} targets, {cfg.targets}), "
        f"{N // cfg.batch_size:,} steps/epoch, loss={run.loss_kind}, {describe(model_cfg)} "
        f"lambda={cfg.lam}{_terms_on(cfg)}")
    run.wrap()
    if cfg.max_epochs == 0 and resume is None:
        return run.as_it_is(t0)
    # a bar on a terminal; in a log (a file, a pod's stdout) a line a minute instead of a
    # carriage-return frame per update
    bar_cls = (_tqdm() if sys.stderr.isatty() else _minute_lines(log)) if progress else None
    for epoch in range(st.start_epoch, cfg.max_epochs):
        stats = run.epoch(epoch, t0, bar_cls)
        if not dist.main:
            st.history.append({})
            if from_main(None, dist):
                break
            continue
        if from_main(run.validate(epoch, stats, t0), dist):
            break
    if dist.world > 1:
        st.best_epoch, st.best_valid, st.stopped, st.history = from_main(
            (st.best_epoch, st.best_valid, st.stopped, st.history), dist)
    return TrainResult(best_epoch=st.best_epoch, best_valid=st.best_valid,
                       epochs_run=len(st.history), seconds=time.perf_counter() - t0,
                       history=st.history, stopped_because=st.stopped)


def _terms_on(cfg: TrainConfig) -> str:
    on = []
    if cfg.interest_weight > 0:
        on.append(f"interest {cfg.interest_loss} beta={cfg.interest_weight}")
    if cfg.cos_penalty > 0:
        on.append(f"cosine alpha={cfg.cos_penalty}")
    if cfg.weight_kl > 0:
        on.append(f"weight KL gamma={cfg.weight_kl} T={cfg.weight_kl_T}")
    if cfg.prototype_refresh:
        on.append("prototypes refreshed by k-means each epoch")
    return "; " + ", ".join(on) if on else ""


def _minute_lines(log: Callable[..., None], every_s: float = 60.0) -> Callable[..., Any]:
    """A stand-in for tqdm that logs one progress line at most every `every_s` seconds."""

    class Lines:
        def __init__(self, total: int, desc: str = "", **_: Any):
            self.total, self.desc, self.n, self.post = total, desc, 0, ""
            self.last = time.perf_counter()

        def update(self, n: int = 1) -> None:
            self.n += n
            now = time.perf_counter()
            if now - self.last >= every_s:
                self.last = now
                log(f"{self.desc}: {self.n:,}/{self.total:,} batches "
                    f"({100 * self.n / max(self.total, 1):.0f} %){self.post}")

        def set_postfix(self, **kw: Any) -> None:
            self.post = "".join(f", {k} {v}" for k, v in kw.items())

        def close(self) -> None:
            pass
    return Lines


def _tqdm():
    try:
        from tqdm.auto import tqdm
        return tqdm
    except ImportError:  # pragma: no cover
        return None
