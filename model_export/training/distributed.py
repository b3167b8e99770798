"""Where a process stands in a `torchrun` job, and the two collectives the training loop needs:
a flag true on one rank made true on all, and rank 0's value on every rank."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Dist:
    """Where this process stands in a `torchrun` job: rank 0 of 1 when run alone."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_launched() -> bool:
    """True in a process that `torchrun` started."""
    import torch.distributed as td

    return td.is_available() and td.is_torchelastic_launched()


def dist_context(device: str = "cpu") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as td

    if not torchrun_launched():
        return Dist()
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), td.get_node_local_rank(fallback_rank=0))


def leave(code: int) -> NoReturn:
    """End a torchrun rank whose work is written, skipping the interpreter's finalization.

    After `destroy_process_group`, gloo's worker threads may still hold finished work whose
    tensors refer to Python objects; freed while the interpreter tears down, they abort the
    process ("terminate called without an active exception", SIGABRT), and torchrun then
    reports a failed job for a run whose checkpoints and report are complete."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when it is true on one (a time budget read off each rank's clock)."""
    if dist.world == 1:
        return flag
    import torch.distributed as td
    t = torch.tensor([int(flag)])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def from_main(value: T, dist: Dist) -> T:
    """Rank 0's `value` on every rank."""
    if dist.world == 1:
        return value
    import torch.distributed as td
    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]
