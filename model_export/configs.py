"""Every configuration of the offline side, as plain dataclasses with no torch: the models'
(`SINEConfig`, `SASRecConfig`), training's, the export's and the refresh cycle's. The `sine`
command takes its defaults from here, so they are written once."""
from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from index_builder.bundle import AGGREGATE, MERGES
from service.keys import DEFAULT_GROUP, DEFAULT_STREAM

# `sine export --serving`: pick on validation, the aggregate, or per_interest with a merge
SERVINGS = ("auto", AGGREGATE, *MERGES)
ACTIVATIONS = ("attention", "votes")   # SINEConfig.activation
AGGREGATIONS = ("adaptive", "mean", "latest")   # SINEConfig.aggregation
WINDOW_HOURS = 24.0 * 7               # the new clicks a refresh (or `train --clicks`) uses


def opt(default: Any, help: str, *, flag: str | None = None, choices: tuple[Any, ...] | None = None,
        ge: float | None = None, gt: float | None = None, lt: float | None = None,
        cli: bool = True, show_default: bool = True) -> Any:
    """A config field declared once: its default, its help, the values it takes (`choices`, and
    bounds `ge`, `gt`, `lt`, checked by `check_options`) and its `sine` flag (`--name` with `_`
    as `-` unless `flag` names it; `cli=False`: none; `show_default=False`: the help says the
    default itself). The CLI's flags are made from these."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "ge": ge, "gt": gt, "lt": lt, "cli": cli,
                                            "show_default": show_default})


def options(cls: type) -> list[Field[Any]]:
    """The fields of a config declared with `opt`, in order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_of(f: Field[Any]) -> str:
    return "--" + (f.metadata["flag"] or f.name.replace("_", "-"))


def default_of(f: Field[Any]) -> Any:
    return None if f.default is MISSING else f.default


def check_options(config: Any) -> None:
    """Every `opt` field of `config` within its choices and bounds (a ValueError that names it)."""
    for f in options(type(config)):
        v, m = getattr(config, f.name), f.metadata
        if v is None:
            continue
        if m["choices"] is not None and v not in m["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, m['choices']))}, "
                             f"not {v!r}")
        for bound, ok, word in (("ge", lambda x, b: x >= b, ">="), ("gt", lambda x, b: x > b, ">"),
                                ("lt", lambda x, b: x < b, "<")):
            if m[bound] is not None and not ok(v, m[bound]):
                raise ValueError(f"{f.name} must be {word} {m[bound]:g}, got {v}")


@dataclass
class SINEConfig:
    """SINE's hyperparameters, named after the paper's symbols (Table 3 defaults). Each field is
    declared once with `opt`: `sine train`'s model flags are made from these and SASRec's."""
    n_items: int               # M, real items; embedding rows are M + 1 (row 0 = padding)
    D: int = opt(128, "embedding size", ge=1)
    n: int = opt(20, "clicks per input window, the most recent n", flag="seq-len", ge=1)
    K: int = opt(4, "activated intentions per user (Table 3: 4; a data set's preset may differ)",
                 ge=1, show_default=False)
    L: int = opt(50, "prototype pool size (Table 3: ML-1M 50, Amazon 500)", ge=1,
                 show_default=False)
    tau: float = opt(0.1, "Eq. 7 temperature (the paper's)", gt=0)
    tau_assign: float = opt(0.1, "Eq. 3 temperature on the cosine (deviation 1)", gt=0)
    literal: bool = opt(False, "Eq. 3 and 7 as raw LayerNorm dot products, as printed in the "
                        "paper")
    share_w3: bool = opt(False, "Eq. 6 shares W3 with Eq. 3 (deviation 2)", cli=False)
    aggregation: str = opt("adaptive", "adaptive: Eq. 6-8; mean: the average of the K interests "
                           "(ablation); latest: Eq. 7's intention from the latest click's state "
                           "(deviation 9)", choices=AGGREGATIONS)
    activation: str = opt("attention", "attention: Eq. 1-2, the top K of <z_u, C>; votes: the K "
                          "prototypes Eq. 3 assigns the most clicks to (deviation 6)",
                          choices=ACTIVATIONS)
    residual: bool = opt(False, "every interest adds the normalised state of the latest click, "
                         "the vector SASRec scores with (deviation 10)")
    blocks: int = opt(0, "causal self-attention blocks under Eq. 1-6 (deviation 8; 0: none, "
                      "Eq. 1-6 on the item embeddings)", ge=0)
    heads: int = opt(1, "attention heads of those blocks", ge=1)
    dropout: float = opt(0.0, "dropout in those blocks", ge=0, lt=1)
    ln_eps: float = 1e-5

    def __post_init__(self):
        check_options(self)
        if self.K > self.L:
            raise ValueError(f"need 1 <= K <= L, got K={self.K}, L={self.L}")
        if self.D % self.heads:
            raise ValueError(f"need D a multiple of heads, got D={self.D}, heads={self.heads}")


@dataclass
class SASRecConfig:
    """The SASRec baseline's shape; K is 1 so that it exports as a one-vector bundle. Its flags
    are SINE's of the same name (`D`, `n`, `blocks`, `heads`, `dropout`)."""
    n_items: int               # M; embedding rows are M + 1 (row 0 = padding)
    D: int = opt(128, "embedding size (SINE's)", ge=1)
    n: int = opt(20, "sequence length (SINE's)", flag="seq-len", ge=1)
    blocks: int = opt(2, "self-attention blocks (the original's ML-1M setting)", ge=1)
    heads: int = opt(1, "attention heads (the original: 1)", ge=1)
    dropout: float = opt(0.2, "dropout: the original's ML-1M rate (0.5 on amazon-beauty)", ge=0,
                         lt=1)
    arch: str = "sasrec"
    K: int = 1                 # one vector: the bundle's K
    ln_eps: float = 1e-5

    def __post_init__(self):
        check_options(self)
        if self.D % self.heads:
            raise ValueError(f"D = {self.D} must be a multiple of heads = {self.heads}")
        if self.K != 1:
            raise ValueError("SASRec has one user vector: K must be 1")


FULL_SOFTMAX_MAX_ITEMS = 50_000
INTEREST_LOSSES = ("argmax", "sample", "logsumexp")
TARGETS = ("last", "dense")   # TrainConfig.targets


NEW_ITEM_INITS = ("mean", "neighbours")
GATE_NEW_ITEMS = ("exclude", "count")


@dataclass
class TrainConfig:
    """The optimizer, the loss, the budget and the early stopping of one training run. Each
    field is declared once with `opt`: `sine train`'s flags are made from these."""
    batch_size: int = opt(128, "training windows a step", ge=1)
    lr: float = opt(1e-3, "Adam learning rate", ge=0)
    targets: str = opt("last", "last: one target per sliding window (the paper's); dense: strided "
                       "windows whose every slot predicts the click after it, as SASRec+ trains",
                       choices=TARGETS)
    stride: int | None = opt(None, "with --targets dense, clicks between window ends "
                             "(default: --seq-len)", ge=1)
    lam: float = opt(0.5, "Eq. 11 lambda, the covariance regularizer's weight", ge=0)
    loss: str = opt("auto", "full softmax, sampled softmax with logQ correction, or auto: full up "
                    f"to {FULL_SOFTMAX_MAX_ITEMS:,} items", choices=("auto", "full", "sampled"))
    num_negatives: int = opt(1280, "shared negatives per batch for the sampled loss", ge=1)
    max_epochs: int = opt(30, "maximum epochs (0: none)", flag="epochs", ge=0)
    patience: int = opt(3, "stop after this many epochs without a validation gain", ge=1)
    select_metric: str = opt("NDCG@10", "validation metric for early stopping", cli=False)
    max_minutes: float | None = opt(None, "wall-clock budget; once spent, the epoch ends, is "
                                    "validated and checkpointed", gt=0)
    seed: int = opt(42, "random seed", cli=False)      # `sine train --seed` is the data's too
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)", ge=1)
    eval_batch_size: int = opt(1024, "users a validation batch", cli=False)
    device: str = opt("cpu", "cpu or cuda")
    # interest-aware terms added to Eq. 11, each off at 0 (see `model_export.training.interests`)
    interest_loss: str = opt("argmax", "argmax: the target against its best-matching interest; "
                             "sample: an interest drawn from softmax(T <phi_k, h>); logsumexp: "
                             "items scored by logsumexp over the interests", choices=INTEREST_LOSSES)
    interest_weight: float = opt(0.0, "beta: weight of an item loss on the interests themselves "
                                 "beside Eq. 9 on the aggregate (0: off)", ge=0)
    interest_T: float = opt(1.0, "T of --interest-loss sample", gt=0)
    cos_penalty: float = opt(0.0, "alpha: weight of the mean pairwise cosine of a user's "
                             "interests (0: off)", ge=0)
    weight_kl: float = opt(0.0, "gamma: weight of the KL that teaches the Eq. 7 weights the "
                           "target's interest (0: off)", ge=0)
    weight_kl_T: float = opt(0.5, "temperature of that KL's target, on cos(phi_k, h_target)", gt=0)
    prototype_refresh: bool = opt(False, "before every epoch but the first, set the L prototypes "
                                  "to the spherical k-means centres of the item embeddings as "
                                  "Eq. 3 compares them")
    # warm starts: items the starting model does not know (`training.checkpoints.warm_start`)
    # (the defaults measured best on ML-1M and Beauty: benchmarks/results/refresh.md)
    new_item_init: str = opt("neighbours", "with a warm start, a new item's first row: the old "
                             "rows' mean plus noise, or the mean of the rows of the items clicked "
                             "just before and after it", choices=NEW_ITEM_INITS)
    new_item_oversample: int = opt(8, "with a warm start, draw each window that ends in a new "
                                   "item this many times an epoch", ge=1)
    # without the replayed windows nothing teaches a new row where it does not belong, and new
    # items flood every list
    new_rows_only: bool = opt(False, "with a warm start, fit the new items' rows alone: every "
                              "other parameter and every known row stays as it was, and an epoch "
                              "draws the windows that end in a new item (--new-item-oversample "
                              "times each) and --new-rows-replay times as many others")
    new_rows_replay: float = opt(24.0, "with --new-rows-only, other windows drawn at random per "
                                 "new-item draw", ge=0)

    def __post_init__(self):
        check_options(self)

    def resolved_loss(self, n_items: int) -> str:
        if self.loss == "auto":
            return "full" if n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be auto, full or sampled, not {self.loss!r}")
        return self.loss


# the TrainConfig fields of a warm start: `sine train`'s and `sine refresh`'s flags, RefreshConfig's
WARM_START_OPTIONS = ("new_item_init", "new_item_oversample", "new_rows_only", "new_rows_replay")


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
    # the warm start's TrainConfig fields (WARM_START_OPTIONS), their defaults taken from it;
    # new_rows_only is the cheap cycle between full refreshes (it needs a live bundle)
    new_item_init: str = TrainConfig.new_item_init
    new_item_oversample: int = TrainConfig.new_item_oversample
    new_rows_only: bool = TrainConfig.new_rows_only
    new_rows_replay: float = TrainConfig.new_rows_replay
    # held-out clicks on items the live bundle does not know: "exclude" leaves them out of the
    # gate's comparison (the live one cannot score them: counting them is a free win for the
    # candidate), "count" scores them as the live bundle's misses
    gate_new_items: str = "exclude"
