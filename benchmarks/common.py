"""What every benchmark records beside its figures: the machine, the commit, the result files."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from index_builder.bundle import git_commit  # noqa: F401  (re-exported for the scripts)


def machine(device: str = "cpu") -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": device}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "?"
    if device.startswith("cuda"):
        try:
            import torch
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
    return info


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_results(out: Path | str, stem: str, payload: dict, md_lines: list[str]) -> None:
    """`<out>/<stem>.json` and `<out>/<stem>.md`, and the markdown on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text("\n".join(md_lines) + "\n")
    print("\n".join(md_lines))
