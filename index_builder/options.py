"""What a build is asked for, with its defaults, written once: `sine build-index` reads them
from here, and `make_bundle` and `build_and_gate` take them. No faiss here, so the command's
parser builds without it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuildOptions:
    """The build's choices: the factory, the recall check and floor, the memory budget."""
    factory: str = "auto"              # a faiss factory string, or auto (see build.resolve_factory)
    recall_k: int = 100                # k of the recall check
    recall_floor: float = 0.95         # below it at recall_k, the index is refused
    memory_budget_mb: float = 1024.0   # the chart's 2 GiB pod limit, less the process and room
    auto_exact_max_items: int = 50_000  # auto: exact search up to this many items


DEFAULTS = BuildOptions()
