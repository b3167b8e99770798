"""`summary.md`: every scenario's pass rules, figures, repeats and stage timings."""
from __future__ import annotations

import os
from pathlib import Path


def write_markdown(summary: dict, path: Path, cmd: str) -> None:
    import platform
    lines = ["# Load, soak and fault runs", "",
             f"`{cmd}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores); the "
             "server, redis-server and locust share the machine.", "",
             "| scenario | rule | result |", "|---|---|---|"]
    for name, r in summary.items():
        for rule, ok in r["rules"].items():
            lines.append(f"| {name} | {rule} | {'pass' if ok else '**FAIL**'} |")
    lines += ["", "| scenario | requests | failures | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, r in summary.items():
        rec = r["record"]
        if "requests" in rec:
            lines.append(f"| {name} | {rec['requests']} | {rec['failures']} | {rec['rps']:.0f} | "
                         f"{rec['p50_ms']} | {rec['p99_ms']} |")
    if "max" in summary:
        lines += ["", "Closed-loop step ramp (`max`):", "",
                  "| clients | req/s | p50 ms | p99 ms | failures |", "|---|---|---|---|---|"]
        for st in summary["max"]["record"]["steps"]:
            lines.append(f"| {st['users']} | {st['rps']:.0f} | {st['p50_ms']} | {st['p99_ms']} | "
                         f"{st['failures']} |")
    for name, key in (("soak", "rss"), ("redis-fault", "fault"),
                      ("redis-cluster-failover", "failover"), ("reload", "reload"),
                      ("overload", "overload"), ("ci-redis-fault", "fault"),
                      ("hostile", "hostile_summary")):
        if name in summary and key in summary[name]["record"]:
            lines += ["", f"`{name}`: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in summary[name]["record"][key].items())]
    for name, r in summary.items():
        reps = r["record"].get("repeats")
        if not reps:
            continue
        key = next((k for k in ("failover", "fault", "hostile_summary", "overload")
                    if k in reps[0]), None)
        cols = [k for k, v in (reps[0].get(key) or {}).items()
                if isinstance(v, (int, float))] if key else []
        lines += ["", f"`{name}`, each of {len(reps)} runs:", "",
                  "| run | rules held | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for k, rep in enumerate(reps, 1):
            held = sum(bool(v) for v in rep["rules"].values())
            vals = [f"{rep[key][c]:.3g}" if isinstance(rep[key][c], float) else str(rep[key][c])
                    for c in cols]
            lines.append(f"| {k} | {held} of {len(rep['rules'])} | " + " | ".join(vals) + " |")
    stages = {n: r["record"].get("stages") for n, r in summary.items() if r["record"].get("stages")}
    if stages:
        lines += ["", "Server-side stage timings (ms, from `Server-Timing`):", "",
                  "| scenario | stage | p50 | p90 | p99 |", "|---|---|---|---|---|"]
        for n, st in stages.items():
            for k, v in st.items():
                lines.append(f"| {n} | {k} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p99_ms']:.3f} |")
    path.write_text("\n".join(lines) + "\n")
