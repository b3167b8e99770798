"""Build time and size of the container images, built from nothing (no cached layers) by
deploy/build-images.sh with podman.

    python -m benchmarks.images [--what all] [--keep-base]

Writes benchmarks/results/images.{json,md}. Without --keep-base the stand-in base image is
made again too, so the figures are those of a fresh CI machine."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from .common import git_commit, machine, now, write_results

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="all", choices=["cpu", "train", "all"])
    ap.add_argument("--keep-base", action="store_true",
                    help="reuse the base image already in local storage")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get(
        "CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))}
    base = next(ln.split()[1] for ln in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
                if ln.startswith("FROM "))
    images = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                            env=env, capture_output=True, text=True, check=True).stdout.split()
    drop = [i for i in images if "sine-retrieval" in i]
    if not a.keep_base:
        drop += [i for i in images if i.endswith(base)]
    if drop:
        subprocess.run(["podman", "rmi", "-f", *drop], env=env, capture_output=True, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        subprocess.run(["bash", str(ROOT / "deploy" / "build-images.sh"), a.what], env={
            **env, "SINE_BUILD_DIR": tmp}, check=True, cwd=ROOT)
        total = time.monotonic() - t0
        rows = json.loads((Path(tmp) / "build.json").read_text())
    payload = {"command": "python -m benchmarks.images " + " ".join(argv or []),
               "commit": git_commit(), "machine": machine(), "when": now(),
               "base": base, "base_made_here": not a.keep_base, "total_s": round(total, 1),
               "images": rows}
    md = ["# Container images, built with podman from nothing", "",
          f"`{payload['command'].strip()}` at {payload['commit']}, {payload['when']}, on "
          f"{payload['machine']['cpus']} x {payload['machine']['cpu']}.", "",
          f"Base `{base}`: " + ("made from Debian's archive with mmdebstrap (no registry), "
                                "inside the total" if not a.keep_base else "already present"),
          "", "| image | Dockerfile | build s | size MB |", "|---|---|---:|---:|"]
    md += [f"| `{r['image']}` | {r['dockerfile']} | {r['build_s']:.1f} | "
           f"{r['size_bytes'] / 1e6:.0f} |" for r in rows]
    md += ["", f"All of it, base included: {total:.1f} s."]
    write_results(a.out, "images", payload, md)


if __name__ == "__main__":
    main()
