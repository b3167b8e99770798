"""The refresh loop on real data, with new items: do they reach users after one refresh?

The data sets shipped here have each user's order but no times, so time is cut by position:
each user's first 90 % of clicks (at least 3) are the base data, the rest after it is "new". A
share of the items (`--hold-back`, 5 %) is held back, drawn evenly across five popularity bands
(equal numbers of items, by clicks in the whole data set): their clicks are dropped from the
base, as if the items appeared at the cut, so the stale model has never seen them. Of each
user's new clicks the last is the test target; the others, held-back items' among them, are
replayed through `POST /events` of a running service (which logs them to the Redis click log),
users interleaved as traffic would bring them. Then:

1. the **stale** bundle is the model trained on the base data only (`--base-minutes`);
2. for each lever and each budget (`--levers`, `--budgets`), `sine refresh` (the library call)
   on a copy of the stale bundle root: export the click log, warm-start on base + replayed
   clicks, gate, publish. Levers: `mean` (a new item's row starts at the mean of the old rows,
   as before), `neighbours` (at the mean of the rows of the items clicked just before and after
   it), `mean+oversample` and `neighbours+oversample` (each window ending in a new item drawn
   `--oversample` times an epoch), `rows-only` (neighbour rows fitted alone into the stale
   model, on the windows ending in a new item, everything else frozen). `--runs
   lever@minutes,...` picks cycles instead of the whole levers x budgets grid. The gate runs
   with tolerance 1 so that every candidate is kept for scoring; whether it would have passed
   at the default tolerance is reported.

Every bundle is scored on the test targets as the service answers (history = base + replayed
clicks, every seen item excluded): HR@10/50 over all users, and for the targets that are
held-back items beside those that are established items of the same popularity band. Their
ratio, weighted by the held-back targets' bands, is `new_item_hr50_ratio`. Also: the share of
held-back items with 5 or more replayed clicks that any test user gets in a top 50, and the time
from an item's first click to its first retrieval, counted as if the cycle started when the
replay ended (replay end minus the item's first click, plus the cycle's duration).

    python -m benchmarks.refresh --base-minutes 5 --budgets 3,10
    python -m benchmarks.refresh --dataset amazon-beauty --share 0.7 \
        --runs mean@3,neighbours+oversample@10 --work runs/bench-refresh-beauty
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

import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack
from model_export import data

N_BANDS = 5
# lever: (new_item_init, new_item_oversample (None: --oversample), new_rows_only)
LEVERS = {"mean": ("mean", 1, False), "neighbours": ("neighbours", 1, False),
          "mean+oversample": ("mean", None, False),
          "neighbours+oversample": ("neighbours", None, False),
          "rows-only": ("neighbours", None, True)}


def popularity_bands(ds) -> dict[str, int]:
    """{item: band 0..4}: items ranked by clicks in the whole data set, five equal-sized bands,
    0 the most popular."""
    counts = np.bincount(np.concatenate(ds.sequences), minlength=ds.n_items + 1)[1:]   # [M]
    order = np.argsort(-counts, kind="stable")                                          # [M]
    band = np.empty(ds.n_items, dtype=int)
    band[order] = np.arange(ds.n_items) * N_BANDS // ds.n_items
    return {ds.item_ids[j + 1]: int(band[j]) for j in range(ds.n_items)}


def hold_back(bands: dict[str, int], share: float, seed: int) -> set[str]:
    """`share` of the items of every band, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    for b in range(N_BANDS):
        members = sorted(i for i, x in bands.items() if x == b)
        out |= set(rng.choice(members, size=max(1, round(share * len(members))),
                              replace=False).tolist())
    return out


def cut(ds, share: float, held: set[str] = frozenset()):
    """(base sequences, replayed clicks per user, test target per user), external ids; the
    held-back items' clicks are left out of the base."""
    base, replay, target = {}, {}, {}
    for u, s in zip(ds.user_ids, ds.sequences):
        ext = [ds.item_ids[int(i)] for i in s]
        c = max(3, int(len(ext) * share))
        mine = [x for x in ext[:c] if x not in held]
        later = ext[c:]
        if len(mine) < 3:
            continue
        base[u] = mine
        if len(later) >= 2:
            replay[u], target[u] = later[:-1], later[-1]
    return base, replay, target


def replay_events(url: str, replay: dict[str, list[str]], threads: int = 8,
                  first_click: dict[str, float] | None = None) -> tuple[int, float]:
    """POST every replayed click, users interleaved, each user's clicks in order; the wall time
    of each item's first click goes into `first_click` when given."""
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
        elif first_click is not None and ev[1] not in first_click:
            first_click.setdefault(ev[1], time.time())

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


def top_lists(path, hist: dict[str, list[str]], users: list[str], k: int = 50,
              batch: int = 512) -> dict[str, list[str]]:
    """Each user's top k external ids as the service answers (its engine and stages)."""
    from service.engine import load_engine
    from service.merge import top_n
    from service.stages import compute, window

    eng = load_engine(path, providers="cpu", faiss_gpu="off", warm_batch=1)
    names = eng.bundle.item_ids()
    out: dict[str, list[str]] = {}
    for s in range(0, len(users), batch):
        part = users[s: s + batch]
        win = window(eng, [hist[u][::-1] for u in part])             # newest first
        rows = np.flatnonzero(win.known > 0)
        if not len(rows):
            continue
        c = compute(eng, win.window[rows], np.zeros(len(rows), dtype=bool),
                    int(k + win.known[rows].max()))
        found = c.hits["aggregate"]                                   # [P, 1, k]
        top = top_n(found.scores, found.ids, win.seen[rows], k)
        for p, r in enumerate(rows):
            out[part[r]] = [names[int(j)] for j in top.ids[p, : int(top.count[p])]]
    return out


def new_item_scores(lists: dict[str, list[str]], target: dict[str, str], held: set[str],
                    bands: dict[str, int], replay_clicks: dict[str, int]) -> dict:
    """HR@10/50 overall; HR@50 of held-back and of established targets by band, their ratio
    weighted by the held-back targets' bands; the share of held-back items (5+ replayed clicks)
    anyone gets in a top 50."""
    hit50 = {u: target[u] in lists.get(u, []) for u in target}
    hit10 = {u: target[u] in lists.get(u, [])[:10] for u in target}
    n = len(target)
    by = {"new": [[] for _ in range(N_BANDS)], "established": [[] for _ in range(N_BANDS)]}
    for u, t in target.items():
        by["new" if t in held else "established"][bands[t]].append(hit50[u])
    band_rows = []
    num = den = 0.0
    for b in range(N_BANDS):
        new, est = by["new"][b], by["established"][b]
        hr_new = float(np.mean(new)) if new else None
        hr_est = float(np.mean(est)) if est else None
        band_rows.append({"band": b, "new_targets": len(new), "new_hr50": hr_new,
                          "established_targets": len(est), "established_hr50": hr_est})
        if new and est:
            num += len(new) * hr_new
            den += len(new) * hr_est
    retrieved = set().union(*(set(v) for v in lists.values())) if lists else set()
    eligible = {i for i in held if replay_clicks.get(i, 0) >= 5}
    new_all = [hit50[u] for u, t in target.items() if t in held]
    return {"HR@10": sum(hit10.values()) / n, "HR@50": sum(hit50.values()) / n, "users": n,
            "new_targets": len(new_all),
            "new_hr50": float(np.mean(new_all)) if new_all else None,
            "established_hr50_same_bands": den / max(sum(len(x) for x in by["new"]), 1),
            "new_item_hr50_ratio": num / den if den else None, "bands": band_rows,
            "held_back_with_5_clicks": len(eligible),
            "retrieved_share": len(eligible & retrieved) / max(len(eligible), 1),
            "retrieved": sorted(eligible & retrieved)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir")
    p.add_argument("--share", type=float, default=0.9, help="base share of each sequence")
    p.add_argument("--hold-back", type=float, default=0.05, help="share of items held back")
    p.add_argument("--base-minutes", type=float, default=6.0)
    p.add_argument("--budgets", default="3,10", help="refresh training minutes, comma-separated")
    p.add_argument("--levers", default=",".join(LEVERS), help=f"of {', '.join(LEVERS)}")
    p.add_argument("--oversample", type=int, default=8,
                   help="neighbours+oversample: draws of a new item's window an epoch")
    p.add_argument("--rows-replay", type=float, default=4.0,  # the value of the first rows
                   help="rows-only: other windows drawn per new-item draw (new_rows_replay)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/bench-refresh"))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="refresh")
    p.add_argument("--runs", help="lever@minutes,... instead of the --levers x --budgets grid")
    p.add_argument("--reuse-stale", action="store_true",
                   help="keep the work folder's stale bundle and add to this data set's rows")
    a = p.parse_args()
    cycles = plan(a)

    from index_builder.make import make_bundle
    from model_export.export import export
    from model_export.freshness.refresh import RefreshConfig, refresh
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config

    full = data.load(a.dataset, a.data_dir)
    bands = popularity_bands(full)
    held = hold_back(bands, a.hold_back, a.seed)
    base, replay, target = cut(full, a.share, held)
    replay_clicks: dict[str, int] = {}
    for v in replay.values():
        for x in v:
            replay_clicks[x] = replay_clicks.get(x, 0) + 1
    work = a.work
    earlier = earlier_rows(Path(a.out) / f"{a.stem}.json", a, held) if a.reuse_stale else None
    if earlier is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    else:
        # a fresh Redis gets the replay again: its export must not meet the earlier one's
        shutil.rmtree(work / "clicks", ignore_errors=True)
        for lever, minutes in cycles:
            name = cycle_name(lever, minutes, a)
            for d in (f"bundles-{name}", f"w-{name}"):
                shutil.rmtree(work / d, ignore_errors=True)
    base_csv = work / f"{a.dataset}-base.csv"
    with open(base_csv, "w") as f:
        f.write("user_id,item_id,timestamp\n")
        for u, s in base.items():
            f.writelines(f"{u},{i},{t}\n" for t, i in enumerate(s))
    ds = data.load(str(base_csv))
    assert not held & set(ds.item_ids), "a held-back item reached the base data"
    timings: dict = {}
    t0 = time.perf_counter()
    if earlier is None:
        train(ds, model_config(ds), TrainConfig(max_epochs=20, max_minutes=a.base_minutes,
                                                patience=2, threads=a.threads, seed=a.seed),
              work / "base-train", progress=False)
        export(work / "base-train" / "best.pt", ds, work / "base-export", log=lambda *x: None)
        make_bundle(work / "base-export", work / "stale", version="stale", log=lambda *x: None)
        timings["stale_bundle_s"] = time.perf_counter() - t0
    else:
        timings["stale_bundle_s"] = earlier["timings"].get("stale_bundle_s")
    stale_path = work / "stale" / "stale"

    first_click: dict[str, float] = {}
    runs: list[dict] = []
    with Stack(((u, s) for u, s in base.items())) as stack:
        srv = stack.serve(work / "stale", log_path=work / "server.log", watch_interval_s=1,
                          redis_write_timeout_ms=2000)
        n_events, secs = replay_events(srv.url, replay, first_click=first_click)
        replay_end = time.time()
        timings["replay"] = {"events": n_events, "seconds": secs, "per_s": n_events / secs}
        print(f"replayed {n_events} events in {secs:.0f} s", flush=True)
        for lever, minutes in cycles:
            init, over, rows_only = LEVERS[lever]
            name = cycle_name(lever, minutes, a)
            root = work / f"bundles-{name}"
            shutil.copytree(work / "stale", root)
            # one clicks folder for every cycle: the first exports the log, the others find
            # it exported and read the same window
            rep = refresh(RefreshConfig(
                bundle_root=root, work_dir=work / f"w-{name}", dataset=str(base_csv),
                redis_url=stack.redis_url, clicks_dir=work / "clicks",
                train_minutes=minutes, max_epochs=50, threads=a.threads, seed=a.seed,
                tolerance=1.0, new_item_init=init,
                new_item_oversample=over or a.oversample, new_rows_only=rows_only,
                new_rows_replay=a.rows_replay),
                log=lambda *x: None)
            g = rep.gate["metrics"]
            runs.append({"name": name, "lever": lever, "minutes": minutes,
                         "version": rep.version, "root": str(root),
                         "cycle_s": sum(rep.stages_s.values()), "stages_s": rep.stages_s,
                         "gate": rep.gate,
                         "passes_default_tolerance": g["candidate"]["HR@50"]
                         >= g["live"]["HR@50"] - 0.005,
                         "commit": git_commit(), "command": command(a)})
            print(name, rep.outcome, {k: round(v["HR@50"], 4) for k, v in g.items()},
                  flush=True)

    hist = {u: base[u] + replay[u] for u in target}     # all a request would see
    users = sorted(target)
    results = {"stale": new_item_scores(top_lists(stale_path, hist, users), target, held,
                                        bands, replay_clicks)}
    for r in runs:
        sc = new_item_scores(top_lists(Path(r["root"]) / r["version"], hist, users), target,
                             held, bands, replay_clicks)
        delays = sorted(replay_end - first_click[i] + r["cycle_s"] for i in sc["retrieved"])
        sc["first_click_to_retrieval_s"] = (
            {"median": float(np.median(delays)), "max": delays[-1], "items": len(delays)}
            if delays else None)
        results[r["name"]] = sc
        print(r["name"], {k: sc[k] for k in ("HR@50", "new_hr50", "new_item_hr50_ratio",
                                             "retrieved_share")}, flush=True)
    if earlier is not None:
        rerun = {r["name"] for r in runs}
        kept = [r for r in earlier["runs"] if r["name"] not in rerun]
        runs = kept + runs
        results.update({r["name"]: earlier["results"][r["name"]] for r in kept})
    report(a, held, replay_clicks, n_events, timings, runs, results)


def plan(a) -> list[tuple[str, float]]:
    """(lever, minutes) per cycle, from --runs or the --levers x --budgets grid."""
    if a.runs:
        cycles = []
        for part in a.runs.split(","):
            lever, _, minutes = part.partition("@")
            try:
                cycles.append((lever, float(minutes)))
            except ValueError:
                raise SystemExit(f"--runs: {part!r} is not lever@minutes") from None
    else:
        cycles = [(lv, float(b)) for lv in a.levers.split(",") for b in a.budgets.split(",")]
    for lever, _ in cycles:
        if lever not in LEVERS:
            raise SystemExit(f"unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    return cycles


def cycle_name(lever: str, minutes: float, a) -> str:
    """`rows-only-3min`; a replay share other than the default is in the name."""
    replay = f"-replay{a.rows_replay:g}" if LEVERS[lever][2] and a.rows_replay != 4.0 else ""
    return f"{lever}{replay}-{minutes:g}min"


def command(a) -> str:
    what = f"--runs {a.runs}" if a.runs else f"--budgets {a.budgets} --levers {a.levers}"
    return (f"python -m benchmarks.refresh --dataset {a.dataset} --share {a.share} "
            f"--hold-back {a.hold_back} --base-minutes {a.base_minutes} {what} "
            f"--oversample {a.oversample} --rows-replay {a.rows_replay:g} --seed {a.seed}"
            + (" --reuse-stale" if a.reuse_stale else ""))


def load_sections(path: Path) -> dict:
    """{data set: its payload} from the results file; a file of one data set's run (the
    earlier layout) is that data set's section."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if "datasets" in old:
        return old["datasets"]
    for r in old["runs"]:
        r.setdefault("commit", old["commit"])
        r.setdefault("command", old["command"])
    return {old["dataset"]: old}


def earlier_rows(path: Path, a, held: set[str]) -> dict | None:
    """This data set's earlier section when its stale bundle can be reused: same held-back
    items, and the bundle still in the work folder."""
    sec = load_sections(path).get(a.dataset)
    if sec is None or set(sec["held_back"]) != held or not (a.work / "stale" / "stale").is_dir():
        raise SystemExit(f"--reuse-stale: no earlier {a.dataset} run with the same held-back "
                         f"items in {path}, or its stale bundle is gone from {a.work}/stale")
    return sec


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def report(a, held, replay_clicks, n_events, timings, runs, results) -> None:
    cmd = command(a)
    st = results["stale"]
    md = [f"## {a.dataset}", "",
          f"{now()}; commit {git_commit()[:10]}; {machine()['cpu']}, {machine()['cpus']} cores; "
          f"`{cmd}`", ""]
    earlier = sorted({(r["commit"], r["command"]) for r in runs if r.get("command") != cmd})
    if earlier:
        md += [f"Rows not from this run came from commit {c[:10]}: `{k}`."
               for c, k in earlier] + [""]
    md += [
          f"Each user's first {a.share:.0%} of clicks (at least 3) are the base data. "
          f"{len(held)} items ({a.hold_back:.0%}, drawn evenly across {N_BANDS} popularity bands) "
          f"are held back: their base clicks are dropped, so the stale model never saw them. Of "
          f"the rest, each user's last click is the test target ({st['users']:,} users; "
          f"{st['new_targets']} targets are held-back items) and the others ({n_events:,} "
          f"clicks, {sum(replay_clicks.get(i, 0) for i in held):,} on held-back items) were "
          f"replayed through `POST /events` at {timings['replay']['per_s']:.0f} events/s. The "
          f"stale bundle trained {a.base_minutes:g} min on the base data; each refresh "
          f"warm-started from it on base + replayed clicks for the budget shown.", "",
          "`new HR@50`: over the targets that are held-back items; `established`: over "
          "established targets of the same popularity bands, weighted as the held-back targets "
          "are; `ratio` = new / established (`new_item_hr50_ratio`); `retrieved`: the share of "
          f"the {st['held_back_with_5_clicks']} held-back items with 5 or more replayed clicks "
          "that some test user gets in a top 50; `first click -> retrieved`: median seconds, as "
          "if the cycle started when the replay ended.", "",
          "| bundle | lever | train min | HR@10 | HR@50 | new HR@50 | established | ratio | "
          "retrieved | first click -> retrieved s | gate at 0.005 |",
          "|---|---|---|---|---|---|---|---|---|---|---|",
          f"| stale | - | - | {_pct(st['HR@10'])} | {_pct(st['HR@50'])} | {_pct(st['new_hr50'])} "
          f"| {_pct(st['established_hr50_same_bands'])} | 0 | {_pct(st['retrieved_share'])} | "
          f"never | - |"]
    for r in runs:
        sc = results[r["name"]]
        d = sc["first_click_to_retrieval_s"]
        delay = "-" if d is None else f"{d['median']:.0f}"
        ratio = sc["new_item_hr50_ratio"]
        md.append(f"| {r['name']} | {r['lever']} | {r['minutes']:g} | {_pct(sc['HR@10'])} | "
                  f"{_pct(sc['HR@50'])} | {_pct(sc['new_hr50'])} | "
                  f"{_pct(sc['established_hr50_same_bands'])} | "
                  f"{'-' if ratio is None else f'{ratio:.2f}'} | {_pct(sc['retrieved_share'])} | "
                  f"{delay} | "
                  f"{'passes' if r['passes_default_tolerance'] else 'refused'} |")
    md += ["", "By popularity band (0 the most popular), HR@50 of held-back vs established "
           "targets:", "", "| bundle | " + " | ".join(f"band {b}" for b in range(N_BANDS)) + " |",
           "|---|" + "---|" * N_BANDS]
    for name, sc in results.items():
        md.append(f"| {name} | " + " | ".join(
            f"{_pct(b['new_hr50'])} / {_pct(b['established_hr50'])} ({b['new_targets']})"
            for b in sc["bands"]) + " |")
    md += ["", "The gate (each replaying user's last replayed click, held out from training; "
           "clicks on items the stale bundle does not know are left out of the comparison and "
           "scored beside):", "",
           "| cycle | candidate HR@50 | live HR@50 | holdout share on new items | candidate HR@50 "
           "on them | cycle s |", "|---|---|---|---|---|---|"]
    for r in runs:
        g = r["gate"]["metrics"]
        on_new = g.get("candidate_on_new_items", {}).get("HR@50")
        md.append(f"| {r['name']} | {_pct(g['candidate']['HR@50'])} | {_pct(g['live']['HR@50'])} "
                  f"| {_pct(r['gate']['holdout_new_item_share'])} | {_pct(on_new)} | "
                  f"{r['cycle_s']:.0f} |")
    section = {"command": cmd, "commit": git_commit(), "machine": machine(), "when": now(),
               "dataset": a.dataset, "held_back": sorted(held), "timings": timings,
               "runs": runs, "results": {k: {kk: vv for kk, vv in v.items() if kk != "retrieved"}
                                         for k, v in results.items()},
               "new_item_hr50_ratio": {r["name"]: results[r["name"]]["new_item_hr50_ratio"]
                                       for r in runs},
               "markdown": md}
    sections = load_sections(Path(a.out) / f"{a.stem}.json")
    sections[a.dataset] = section
    payload = {"new_item_hr50_ratio": {d: v["new_item_hr50_ratio"] for d, v in sections.items()},
               "datasets": sections}
    lines = ["# New items after one refresh (simulated in time by position)", ""]
    for d, v in sections.items():
        lines += v.get("markdown") or [f"## {d}", "", f"`{v['command']}`: see the JSON.", ""]
        lines.append("")
    write_results(a.out, a.stem, payload, lines[:-1])


if __name__ == "__main__":
    main()
