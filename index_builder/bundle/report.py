"""`<root>/refresh.json`: the last `sine refresh` outcome, written by the refresh job and read by
the service and the next refresh."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import write_atomic
from .names import REFRESH_REPORT


@dataclass
class RefreshReport:
    """`<root>/refresh.json`: what the last `sine refresh` did (written by the refresh job, read
    by the service for /metrics and by the next refresh). `outcome` is published, refused or
    nothing_new; `gate["metrics"]` maps candidate and live to {metric: value}."""
    outcome: str
    version: str | None = None
    live: str | None = None
    clicks: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    stages_s: dict[str, float] = field(default_factory=dict)
    retention: dict[str, Any] = field(default_factory=dict)
    finished: str = ""
    finished_unix: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefreshReport:
        """The report, each field of another shape than its own recorded as unknown (its
        default): a report written by another version never fails whoever reads it."""
        out = cls(outcome=str(d.get("outcome")))
        for f in fields(cls):
            v = d.get(f.name)
            if f.name == "outcome" or v is None:
                continue
            default = getattr(out, f.name)
            if isinstance(default, dict) and isinstance(v, dict):
                setattr(out, f.name, v)
            elif isinstance(default, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(out, f.name, float(v))
            elif (isinstance(default, str) or default is None) and isinstance(v, (str, int)):
                setattr(out, f.name, str(v))
        gate = out.gate.get("metrics")
        if not (isinstance(gate, dict) and all(isinstance(m, dict) for m in gate.values())):
            out.gate = {k: v for k, v in out.gate.items() if k != "metrics"}
        return out


def write_refresh_report(root: Path, report: RefreshReport) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(root) / REFRESH_REPORT, json.dumps(asdict(report), indent=1).encode())


def read_refresh_report(root: Path) -> RefreshReport | None:
    """The last refresh's report, or None (absent or unreadable)."""
    try:
        d = json.loads((Path(root) / REFRESH_REPORT).read_text())
        return RefreshReport.from_dict(d) if isinstance(d, dict) and "outcome" in d else None
    except (OSError, ValueError, TypeError):
        return None
