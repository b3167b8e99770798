"""Every configuration of the offline side, as plain dataclasses with no torch: the models'
(`SINEConfig`, `SASRecConfig`), training's, the export's and the refresh cycle's. The `sine`
command takes its defaults from here, so they are written once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from index_builder.bundle import MERGES
from service.keys import DEFAULT_GROUP, DEFAULT_STREAM

# `sine export --serving`: pick on validation, the aggregate, or per_interest with a merge
SERVINGS = ("auto", "aggregate", *MERGES)
ACTIVATIONS = ("attention", "votes")   # SINEConfig.activation
AGGREGATIONS = ("adaptive", "mean", "latest")   # SINEConfig.aggregation
WINDOW_HOURS = 24.0 * 7               # the new clicks a refresh (or `train --clicks`) uses


@dataclass
class SINEConfig:
    """SINE's hyperparameters, named after the paper's symbols (Table 3 defaults)."""
    n_items: int               # M, real items; embedding rows are M + 1 (row 0 = padding)
    D: int = 128               # embedding size
    n: int = 20                # sequence length (most recent n clicks)
    K: int = 4                 # activated intentions per user (Table 3)
    L: int = 50                # prototype pool size (Table 3)
    tau: float = 0.1           # Eq. 7 temperature (paper: 0.1)
    tau_assign: float = 0.1    # Eq. 3 temperature on the cosine (deviation 1)
    literal: bool = False      # Eq. 3 / Eq. 7 as raw LN dot products (paper as written)
    share_w3: bool = False     # Eq. 6 shares W3 with Eq. 3 (deviation 2)
    aggregation: str = "adaptive"   # "adaptive" (Eq. 6-8), "mean" (ablation) or "latest" (Eq. 7's
    #                                 intention from the latest click's state, deviation 9)
    activation: str = "attention"   # Eq. 1-2 as written, or "votes": the K prototypes Eq. 3
    #                                 assigns the most clicks to (deviation 6)
    blocks: int = 0            # causal self-attention blocks under Eq. 1-6 (deviation 8; 0: none)
    heads: int = 1             # their attention heads
    dropout: float = 0.0       # their dropout
    ln_eps: float = 1e-5

    def __post_init__(self):
        if not 1 <= self.K <= self.L:
            raise ValueError(f"need 1 <= K <= L, got K={self.K}, L={self.L}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"not {self.aggregation!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.blocks < 0 or self.D % self.heads:
            raise ValueError(f"need blocks >= 0 and D a multiple of heads, got blocks={self.blocks}, "
                             f"D={self.D}, heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SASRecConfig:
    """The SASRec baseline's shape; K is 1 so that it exports as a one-vector bundle."""
    n_items: int               # M; embedding rows are M + 1 (row 0 = padding)
    D: int = 128               # embedding size (SINE's)
    n: int = 20                # sequence length (SINE's)
    blocks: int = 2            # self-attention blocks (the original's ML-1M setting)
    heads: int = 1             # attention heads (the original: 1)
    dropout: float = 0.2       # the original's ML-1M rate
    arch: str = "sasrec"
    K: int = 1                 # one vector: the bundle's K
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.D % self.heads:
            raise ValueError(f"D = {self.D} must be a multiple of heads = {self.heads}")
        if self.K != 1:
            raise ValueError("SASRec has one user vector: K must be 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


FULL_SOFTMAX_MAX_ITEMS = 50_000
INTEREST_LOSSES = ("argmax", "sample", "logsumexp")
TARGETS = ("last", "dense")   # TrainConfig.targets


NEW_ITEM_INITS = ("mean", "neighbours")
GATE_NEW_ITEMS = ("exclude", "count")


@dataclass
class TrainConfig:
    """The optimizer, the loss, the budget and the early stopping of one training run."""
    batch_size: int = 128            # windows a step
    lr: float = 1e-3
    # "last": one target per sliding window (the paper's); "dense": strided windows, each slot
    # predicting the click after it (SASRec+), every (prefix, target) pair once an epoch
    targets: str = "last"
    stride: int | None = None        # dense: clicks between window ends (None: the window, n)
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
    # interest-aware terms added to Eq. 11, each off at 0 (see `model_export.training.interests`)
    interest_loss: str = "argmax"    # the item loss on interests: argmax, sample or logsumexp
    interest_weight: float = 0.0     # beta: its weight beside Eq. 9 on the aggregate
    interest_T: float = 1.0          # `sample`: k drawn from softmax(T <phi_k, h_target>)
    cos_penalty: float = 0.0         # alpha: mean pairwise cosine of a user's K interests
    weight_kl: float = 0.0           # gamma: KL from the target's interest to the Eq. 7 weights
    weight_kl_T: float = 0.5         # that target's temperature on cos(phi_k, h_target)
    prototype_refresh: bool = False  # before every epoch but the first, the L prototypes C set
    #                                  to the spherical k-means centres of LN1(H W3), the item
    #                                  rows as Eq. 3 sees them
    # warm starts: items the starting model does not know (`training.checkpoints.warm_start`)
    # (the defaults measured best on ML-1M and Beauty: benchmarks/results/refresh.md)
    new_item_init: str = "neighbours"  # neighbours: the mean of the rows of the items clicked
    #                                    just before and after it; mean: the old rows' mean
    new_item_oversample: int = 8     # windows whose target is a new item, this many times an epoch
    new_rows_only: bool = False      # fit the new items' rows alone: every other parameter and
    #                                  every known row frozen, an epoch drawing the windows that
    #                                  end in a new item (new_item_oversample times each) ...
    new_rows_replay: float = 24.0    # ... and this many other windows per such draw, at random:
    #                                  without them nothing teaches a new row where it does not
    #                                  belong, and new items flood every list

    def __post_init__(self):
        if self.new_item_init not in NEW_ITEM_INITS:
            raise ValueError(f"new_item_init must be one of {', '.join(NEW_ITEM_INITS)}, "
                             f"not {self.new_item_init!r}")
        if self.new_item_oversample < 1:
            raise ValueError(f"new_item_oversample must be >= 1, got {self.new_item_oversample}")
        if self.new_rows_replay < 0:
            raise ValueError(f"new_rows_replay must be >= 0, got {self.new_rows_replay}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, not {self.targets!r}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.interest_loss not in INTEREST_LOSSES:
            raise ValueError(f"interest_loss must be one of {', '.join(INTEREST_LOSSES)}, "
                             f"not {self.interest_loss!r}")
        for name in ("interest_weight", "cos_penalty", "weight_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("interest_T", "weight_kl_T"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def resolved_loss(self, n_items: int) -> str:
        if self.loss == "auto":
            return "full" if n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be auto, full or sampled, not {self.loss!r}")
        return self.loss


@dataclass(frozen=True)
class ExportConfig:
    """What `sine export` writes: the ONNX opset, the graph and the recall-check queries."""
    opset: int = 18                   # ONNX opset (>= 17)
    n_queries: int = 2000             # real user vectors kept for the index's recall check
    graph: str = "auto"               # "auto", "folded" or "plain"
    fold_budget_mb: float = 1024.0    # the largest item tables `auto` folds
    serving: str = "auto"             # the default search: "auto" (best on validation),
                                      # "aggregate", or a merge: "max", "weighted", "quota"


@dataclass
class RefreshConfig:
    """One refresh cycle: where the bundles, clicks and base data are, and its budgets."""
    bundle_root: Path
    dataset: str                          # the base data set: a name or a click-log path
    redis_url: str
    clicks_dir: Path
    work_dir: Path
    data_dir: str | None = None
    redis_password: str | None = None
    streams: tuple[str, ...] = (DEFAULT_STREAM,)   # service.keys.Keys.streams_of(...)
    redis_cluster: bool = False
    group: str = DEFAULT_GROUP
    window_hours: float = WINDOW_HOURS
    train_minutes: float = 10.0
    max_epochs: int = 20
    from_scratch: bool = False
    tolerance: float = 0.005               # HR@k, as a fraction (0.005 = half a point)
    k: int = 50
    archive_dir: Path | None = None
    threads: int | None = None
    seed: int = 42
    keep_versions: int = 5                 # 0: keep every version
    pinned: tuple[str, ...] = ()           # versions retention never removes (pods pinned to
    #                                        one, as the chart's bundle.version pins them)
    clicks_retention_hours: float | None = None   # None: keep every exported click
    staging_max_age_h: float = 6.0         # staging folders untouched this long are swept
    new_item_init: str = "neighbours"      # TrainConfig.new_item_init for the warm start
    new_item_oversample: int = 8           # TrainConfig.new_item_oversample
    new_rows_only: bool = False            # TrainConfig.new_rows_only: the cheap cycle between
    #                                        full refreshes (needs a live bundle to start from)
    new_rows_replay: float = 24.0          # TrainConfig.new_rows_replay
    # held-out clicks on items the live bundle does not know: "exclude" leaves them out of the
    # gate's comparison (the live one cannot score them: counting them is a free win for the
    # candidate), "count" scores them as the live bundle's misses
    gate_new_items: str = "exclude"
