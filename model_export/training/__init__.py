"""Training: the loop (`loop`: early stopping, time budgets, torchrun), checkpoints and warm
starts (`checkpoints`), the torchrun collectives (`distributed`), and train-then-report
(`workflow`)."""
from ..configs import FULL_SOFTMAX_MAX_ITEMS, TrainConfig
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    Encoder,
    ModelConfig,
    atomic_save,
    atomic_write_text,
    build_model,
    config_from_args,
    describe,
    load_checkpoint,
    model_from_checkpoint,
    warm_start,
    warm_start_source,
)
from .loop import RunState, TrainResult, train

__all__ = ["CHECKPOINT_FORMAT", "FULL_SOFTMAX_MAX_ITEMS", "CheckpointError", "Encoder",
           "ModelConfig", "RunState", "TrainConfig", "TrainResult", "atomic_save",
           "atomic_write_text", "build_model", "config_from_args", "describe", "load_checkpoint",
           "model_from_checkpoint", "train", "warm_start", "warm_start_source"]
