"""Does `gc.freeze()` on every reload pin garbage for good? The service's RSS over many reloads,
with `gc_freeze` on (the default) and off, each its own `sine serve` on the same bundle root.

Each reload alternates between two versions of the root (`POST /admin/reload`), and the RSS is
read after every one of them; a few requests between reloads keep the request path warm.

    python -m benchmarks.reload_rss --bundle runs/lt/bundles --versions A,B --reloads 50
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack

TOKEN = "reload-rss"


def run(root: Path, versions: list[str], reloads: int, freeze: bool, log: Path) -> list[float]:
    """RSS MiB before the first reload, then after each."""
    with Stack() as stack:
        srv = stack.serve(root, log_path=log, watch_interval_s=0, admin_token=TOKEN,
                          gc_freeze=freeze)
        rss = [srv.rss_bytes() / 2**20]
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            for i in range(reloads):
                c.post("/admin/reload", json={"version": versions[i % len(versions)]}
                       ).raise_for_status()
                for u in range(20):
                    c.post("/recommend", json={"user_id": f"u{u}", "n": 10}).raise_for_status()
                time.sleep(0.2)
                rss.append(srv.rss_bytes() / 2**20)
    return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a bundle root holding --versions")
    p.add_argument("--versions", required=True, help="two (or more) versions to alternate")
    p.add_argument("--reloads", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    root, versions = Path(a.bundle), a.versions.split(",")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    log = Path(a.out) / ".server.log"
    series = {mode: run(root, versions, a.reloads, mode == "on", log) for mode in ("on", "off")}
    log.unlink(missing_ok=True)
    cmd = (f"python -m benchmarks.reload_rss --bundle {a.bundle} --versions {a.versions} "
           f"--reloads {a.reloads}")
    marks = sorted({0, *range(10, a.reloads + 1, 10), a.reloads})
    md = [f"# RSS over {a.reloads} reloads, gc.freeze on and off", "",
          f"{now()}; commit {git_commit()[:10]}; `{cmd}`; {machine()['cpus']} CPUs. Reloads "
          f"alternate between {', '.join(f'`{v}`' for v in versions)}; 20 requests between "
          "reloads.", "",
          "| gc_freeze | " + " | ".join(f"after {m}" for m in marks) + " | growth from reload "
          f"10 to {a.reloads} |", "|---|" + "---|" * (len(marks) + 1)]
    for mode, rss in series.items():
        md.append(f"| {mode} | " + " | ".join(f"{rss[m]:,.0f}" for m in marks)
                  + f" | {rss[a.reloads] - rss[min(10, a.reloads)]:+,.0f} MiB |")
    md += ["", "MiB. The first reloads grow RSS as the allocator takes pages for two bundles at "
           "once (the new one loads beside the served one); what counts is whether it keeps "
           "growing after."]
    write_results(a.out, "reload-rss", {"series_mib": series, "versions": versions,
                                        "command": cmd, "machine": machine(),
                                        "commit": git_commit(), "when": now()}, md)


if __name__ == "__main__":
    main()
