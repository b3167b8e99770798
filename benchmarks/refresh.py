"""The refresh loop simulated on MovieLens-1M: stale, refreshed and retrained from scratch.

ML-1M as shipped here has each user's order but no times, so time is cut by position: each
user's first 90 % of clicks (at least 3) are the base data, the rest after it is "new". Of the
new clicks the last one is the test target; the others are replayed through `POST /events` of a
running service (which logs them to the Redis click log) in an interleaved order, as traffic
would bring them. Then:

1. the **stale** bundle is the model trained on the base data only (`--base-minutes`);
2. `sine refresh` (the library call) exports the click log, warm-starts from the stale bundle
   on base + replayed clicks within `--refresh-minutes`, gates and publishes: its stages are
   timed;
3. the same cycle **from scratch** at the same budget, on a copy of the stale bundle root.

All three are scored on the test targets as the service answers (history = base + replayed
clicks, every seen item excluded): HR and NDCG at 10 and 50.

    python -m benchmarks.refresh --base-minutes 6 --refresh-minutes 3
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import shutil
import threading
import time
from pathlib import Path

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack
from index_builder import bundle as bundle_mod
from model_export import data


def cut(ds, share: float):
    """(base sequences, replayed clicks per user, test target per user), external ids."""
    base, replay, target = {}, {}, {}
    for u, s in zip(ds.user_ids, ds.sequences):
        ext = [ds.item_ids[int(i)] for i in s]
        c = max(3, int(len(ext) * share))
        base[u] = ext[:c]
        later = ext[c:]
        if len(later) >= 2:
            replay[u], target[u] = later[:-1], later[-1]
    return base, replay, target


def replay_events(url: str, replay: dict[str, list[str]], threads: int = 8) -> tuple[int, float]:
    """POST every replayed click, users interleaved, each user's clicks in order."""
    order = []
    longest = max(len(v) for v in replay.values())
    for step in range(longest):
        order += [(u, v[step]) for u, v in replay.items() if step < len(v)]
    host, port = url.split("//")[1].split(":")
    local = threading.local()
    errors = []

    def post(ev):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("POST", "/events", json.dumps({"user_id": ev[0], "item_id": ev[1]}),
                  {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            errors.append(r.status)

    t0 = time.perf_counter()
    # chunks keep each user's clicks in order: a user's step k+1 is posted after step k
    with cf.ThreadPoolExecutor(threads) as ex:
        step_start = 0
        for step in range(longest):
            n = sum(1 for v in replay.values() if step < len(v))
            list(ex.map(post, order[step_start: step_start + n]))
            step_start += n
    if errors:
        raise SystemExit(f"{len(errors)} events refused: {errors[:5]}")
    return len(order), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir")
    p.add_argument("--share", type=float, default=0.9, help="base share of each sequence")
    p.add_argument("--base-minutes", type=float, default=6.0)
    p.add_argument("--refresh-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/bench-refresh"))
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()

    from index_builder.make import make_bundle
    from model_export.export import export
    from model_export.freshness.refresh import RefreshConfig, refresh, score_bundle
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config

    ml = data.load("ml-1m", a.data_dir)
    base, replay, target = cut(ml, a.share)
    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_csv = work / "ml-1m-base.csv"
    with open(base_csv, "w") as f:
        f.write("user_id,item_id,timestamp\n")
        for u, s in base.items():
            f.writelines(f"{u},{i},{t}\n" for t, i in enumerate(s))
    ds = data.load(str(base_csv))
    timings = {}
    t0 = time.perf_counter()
    train(ds, model_config(ds), TrainConfig(max_epochs=20, max_minutes=a.base_minutes,
                                            patience=2, threads=a.threads), work / "base-train",
          progress=False)
    export(work / "base-train" / "best.pt", ds, work / "base-export", log=lambda *x: None)
    stale = make_bundle(work / "base-export", work / "bundles", version="stale",
                        log=lambda *x: None)
    shutil.copytree(work / "bundles", work / "bundles-scratch")
    timings["stale_bundle_s"] = time.perf_counter() - t0

    with Stack(((u, s) for u, s in base.items())) as stack:
        srv = stack.serve(work / "bundles", log_path=work / "server.log", watch_interval_s=1,
                          redis_write_timeout_ms=2000)
        n_events, secs = replay_events(srv.url, replay)
        timings["replay"] = {"events": n_events, "seconds": secs, "per_s": n_events / secs}
        print(f"replayed {n_events} events in {secs:.0f} s", flush=True)
        common = dict(dataset=str(base_csv), redis_url=stack.redis_url,
                      clicks_dir=work / "clicks", train_minutes=a.refresh_minutes,
                      max_epochs=20, threads=a.threads, tolerance=0.005)
        warm = refresh(RefreshConfig(bundle_root=work / "bundles", work_dir=work / "w-warm",
                                     **common))
        deadline = time.monotonic() + 60          # the running service picks the new version up
        while (served := get_json(srv.url + "/readyz").get("version")) != warm.version \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        scratch = refresh(RefreshConfig(bundle_root=work / "bundles-scratch",
                                        work_dir=work / "w-scratch", from_scratch=True, **common))

    hist = {u: base[u] + replay[u] for u in target}     # all a request would see
    scores = {}
    bundles = {"stale": stale.path, "warm-start refresh": work / "bundles" / warm.version,
               "from-scratch refresh": work / "bundles-scratch" / scratch.version}
    for name, path in bundles.items():
        if not (Path(path) / bundle_mod.MANIFEST).exists():
            scores[name] = None                   # refused by its gate and removed
            continue
        s10, s50 = score_bundle(path, hist, target, 10), score_bundle(path, hist, target, 50)
        scores[name] = {**s10, **s50}
        print(name, scores[name], flush=True)

    cmd = (f"python -m benchmarks.refresh --base-minutes {a.base_minutes} --refresh-minutes "
           f"{a.refresh_minutes}")
    md = ["# The refresh loop on MovieLens-1M (simulated in time by position)", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"`{cmd}`", "",
          f"Each user's first {a.share:.0%} of clicks (at least 3) are the base data; of the rest, "
          f"the last click is the test target and the others ({n_events:,} clicks of "
          f"{len(replay):,} users) were replayed through `POST /events` of the running service "
          f"at {timings['replay']['per_s']:.0f} events/s (8 client threads on the same machine). "
          f"The stale bundle trained {a.base_minutes:g} min on the base data; each refresh "
          f"trained {a.refresh_minutes:g} min on base + replayed clicks. The service that "
          f"served the stale bundle was serving `{served}` after the warm-start refresh.", "",
          "| bundle | HR@10 | NDCG@10 | HR@50 | NDCG@50 | test users |", "|---|---|---|---|---|---|"]
    for name, sc in scores.items():
        if sc is None:
            md.append(f"| {name} | refused by its gate | | | | |")
        else:
            md.append(f"| {name} | {100 * sc['HR@10']:.2f} | {100 * sc['NDCG@10']:.2f} | "
                      f"{100 * sc['HR@50']:.2f} | {100 * sc['NDCG@50']:.2f} | {sc['users']:,} |")
    md += ["", "Refresh wall time by stage (seconds):", "",
           "| refresh | " + " | ".join(warm.stages_s) + " | total | outcome |",
           "|---|" + "---|" * (len(warm.stages_s) + 2)]
    for name, r in (("warm start", warm), ("from scratch", scratch)):
        md.append(f"| {name} | " + " | ".join(f"{r.stages_s.get(k, 0):.1f}" for k in warm.stages_s)
                  + f" | {sum(r.stages_s.values()):.1f} | {r.outcome} |")
    md += ["", "The gates (HR@50 on each replaying user's last replayed click, which training "
           "left out):", ""]
    for name, r in (("warm start", warm), ("from scratch", scratch)):
        g = r.gate.get("metrics", {})
        md.append(f"- {name}: candidate {100 * g.get('candidate', {}).get('HR@50', 0):.2f}, "
                  f"live {100 * g.get('live', {}).get('HR@50', 0):.2f} -> {r.outcome}")
    write_results(a.out, "refresh", {"scores": scores, "warm": vars(warm),
                                     "scratch": vars(scratch), "timings": timings,
                                     "command": cmd, "machine": machine(),
                                     "commit": git_commit(), "when": now()}, md)


def get_json(url: str) -> dict:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    main()
