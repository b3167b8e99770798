"""A sampling profile of the server under load: py-spy on `sine serve` while wrk drives it.

The same set-up as `benchmarks.serving` (embedded Redis with every ML-1M user's history, one
server, wrk on one thread, `{"user_id": <random user>, "n": 100}`), `--conns` connections for
`--seconds`. py-spy samples the server's threads (`--nonblocking`, so that sampling does not
pause it) and the summary groups the stacks two ways: the top frames by their own (self) share
and by their inclusive share, and the share of each component (ONNX Runtime, faiss, redis-py,
numpy, the HTTP stack, the service's own code, the event loop). `--tree` profiles another
checkout's server (an older commit) the same way.

    python -m benchmarks.profile_service --bundle runs/demo/bundles --stem service-profile
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.serving import write_lua, wrk
from devtools.local import Stack
from model_export import data

# component of a frame, by its file: the first pattern that matches
COMPONENTS = [
    ("ONNX Runtime", r"onnxruntime"),
    ("faiss", r"faiss"),
    ("redis-py", r"redis[/\\]|hiredis"),
    ("numpy", r"numpy"),
    ("prometheus-client", r"prometheus_client"),
    ("orjson / JSON", r"orjson|json[/\\]"),
    ("pydantic", r"pydantic"),
    ("FastAPI / Starlette", r"fastapi|starlette"),
    ("uvicorn / httptools", r"uvicorn|httptools|h11"),
    ("service (this project)", r"service[/\\]|index_builder[/\\]"),
    ("asyncio / uvloop", r"asyncio|uvloop|selectors"),
]
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def parse(raw: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: `frame;frame;...;frame count` per line, root first."""
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    f = re.sub(r".*site-packages[/\\]", "", f)
    f = re.sub(r".*[/\\]lib[/\\]python3\.\d+[/\\]", "", f)
    f = re.sub(r".*[/\\](service|index_builder|devtools)[/\\]", r"\1/", f)
    return f"{m.group('func')} ({f})"


def component(frame: str) -> str:
    for name, pat in COMPONENTS:
        if re.search(pat, frame):
            return name
    return "other Python"


def summarize(stacks: list[tuple[list[str], int]], top: int = 20) -> dict:
    total = sum(c for _, c in stacks)
    self_share: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    comp: collections.Counter[str] = collections.Counter()
    for frames, c in stacks:
        names = [short(f) for f in frames]
        self_share[names[-1]] += c
        for n in set(names):
            incl[n] += c
        # a sample belongs to the innermost frame that is not the interpreter's own glue
        comp[component(frames[-1])] += c
    pct = lambda n: 100.0 * n / total if total else 0.0
    return {"samples": total,
            "self": [(f, pct(n)) for f, n in self_share.most_common(top)],
            "inclusive": [(f, pct(n)) for f, n in incl.most_common(top)],
            "components": [(k, pct(n)) for k, n in comp.most_common()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles")
    p.add_argument("--data-dir")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--tree", type=Path, help="profile the server of another checkout")
    p.add_argument("--batching", choices=["true", "false"], default="true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="service-profile")
    p.add_argument("--keep-raw", type=Path, help="also keep py-spy's raw stacks here")
    a = p.parse_args()
    # py-spy comes with the dev extra, beside this interpreter
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if shutil.which("wrk") is None or pyspy is None:
        raise SystemExit("needs wrk (apt-get install wrk) and py-spy (the dev extra)")
    ds = data.load("ml-1m", a.data_dir)
    tmp = Path(tempfile.mkdtemp())
    lua = write_lua(ds.user_ids, tmp)
    raw = tmp / "profile.txt"
    with Stack(data.histories(ds, holdout=1)) as stack:
        srv = stack.serve(a.bundle, log_path=tmp / "server.log", tree=a.tree,
                          batching=a.batching == "true", watch_interval_s=0, max_in_flight=1024,
                          redis_timeout_ms=1000)
        wrk(srv.url + "/recommend", lua, a.conns, 3)                # warm-up
        load: dict = {}
        t = threading.Thread(target=lambda: load.update(
            wrk(srv.url + "/recommend", lua, a.conns, a.seconds + 2)))
        t.start()
        assert srv.proc is not None
        subprocess.run([pyspy, "record", "--pid", str(srv.proc.pid), "--format", "raw",
                        "--output", str(raw), "--rate", str(a.rate), "--duration",
                        str(a.seconds), "--nonblocking"], check=True, capture_output=True)
        t.join()
    summary = summarize(parse(raw))
    if a.keep_raw:
        shutil.copyfile(raw, a.keep_raw)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = (f"python -m benchmarks.profile_service --bundle {a.bundle} --seconds {a.seconds} "
           f"--conns {a.conns} --stem {a.stem}" + (f" --tree {a.tree}" if a.tree else "")
           + (" --batching false" if a.batching == "false" else ""))
    who = f"the server of {a.tree}" if a.tree else f"commit {git_commit()[:10]}"
    md = [f"# Where the server's time goes under {a.conns} connections (py-spy)", "",
          f"{now()}; {who}; {machine()['cpu']}, {machine()['cpus']} cores; `{cmd}`", "",
          f"{summary['samples']:,} samples of the busy server threads at {a.rate}/s over "
          f"{a.seconds} s, while wrk sent {load.get('rps', 0):.0f} req/s (p50 "
          f"{load.get('p50_ms', 0):.2f} ms, p99 {load.get('p99_ms', 0):.2f} ms). "
          "Shares are of the samples in which the server was running Python or native code "
          "called from it.", "",
          "| component (innermost frame) | share % |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in summary["components"]]
    md += ["", "Top frames by self share (where the time is spent):", "",
           "| frame | self % |", "|---|---|"]
    md += [f"| `{f}` | {v:.1f} |" for f, v in summary["self"]]
    md += ["", "Top frames by inclusive share (what the time is spent for):", "",
           "| frame | inclusive % |", "|---|---|"]
    md += [f"| `{f}` | {v:.1f} |" for f, v in summary["inclusive"]]
    write_results(a.out, a.stem, {"summary": summary, "load": load, "command": cmd,
                                  "tree": str(a.tree) if a.tree else None,
                                  "machine": machine(), "commit": git_commit(), "when": now()},
                  md)
    print(json.dumps(summary["components"]))


if __name__ == "__main__":
    main()
