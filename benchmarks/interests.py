"""Multi-interest screen: which training terms make SINE's K interests distinct, and which merge
of the K lists pays, on several data sets and seeds in one harness.

    python -m benchmarks.interests --datasets ml-100k,synthetic-mix,amazon-beauty \\
        --configs sine,k1,ia-argmax,ia-lse,cos,wkl,distinct --seeds 42 --max-minutes 3 --jobs 2

Each (data set, configuration, seed) is one `benchmarks.accuracy` run (its variants name the
configurations; `--set` adds a setting to all), `--jobs` of them side by side with one thread
each. Rows go to `benchmarks/results/accuracy-interests.{json,md}`: the aggregate's test HR and
NDCG, per-interest retrieval under each merge of `service.merge` (the service's own code), and
the interest diagnostics (pairwise cosine, Eq. 7 weight entropy, Eq. 3 assignment entropy, NMI
against item labels). Every HR carries its binomial standard error over test users,
sqrt(p (1 - p) / U); a difference of two rows is significant at 2 standard errors when it
exceeds 2 sqrt(se_a^2 + se_b^2) (unpaired, so conservative). Where a configuration ran with
several seeds, a table of seed means sets each beside K = 1 (`k1`) the same way, with the
per-seed differences as the spread, and, where the runs kept each test user's hits
(`test_hits.npz`), the difference paired by user: the mean over users of (hit - K = 1's hit),
averaged over seeds, with the standard error of that mean.

Rows already in the results file of the same `--tag` whose (data set, configuration, seed) is
not among the runs found are kept as they are, so a second seed can be launched on its own; its
paired figures are pooled with the file's (`pool_paired`), since the earlier runs' hits may be
gone.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import HITS_FILE
from benchmarks.common import git_commit, machine, now

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def job_name(dataset: str, config: str, seed: int) -> str:
    """A run's name in the launch's log folder: its log, and the `.launch` naming its launch."""
    return f"{dataset}-{config}-s{seed}"


def job_command(dataset: str, config: str, seed: int, a: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.accuracy", "--dataset", dataset, "--variants",
           config, "--seed", str(seed), "--max-minutes", str(a.max_minutes), "--threads",
           str(a.threads), "--no-progress", "--runs-dir", str(a.runs_dir), "--results-dir",
           str(a.runs_dir / "_merged"), "--tag", f"{a.tag}-s{seed}", "--epochs", str(a.epochs),
           "--patience", str(a.patience), "--resume"]
    if a.data_dir:
        cmd += ["--data-dir", a.data_dir]
    if a.device != "cpu":
        cmd += ["--device", a.device]
    for s in a.set or []:
        cmd += ["--set", s]
    return cmd


def run_jobs(cmds: list[tuple[str, list[str]]], jobs: int, log_dir: Path) -> None:
    """Run the commands `jobs` at a time; a failed one is reported and the rest go on."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            out = open(log_dir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                   cwd=ROOT), out, time.perf_counter()))
            print(f"started {name}", flush=True)
        for item in list(running):
            name, proc, out, t0 = item
            if proc.poll() is not None:
                out.close()
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
                print(f"{state} {name} in {time.perf_counter() - t0:.0f} s "
                      f"(log: {log_dir / (name + '.log')})", flush=True)
        time.sleep(1.0)


def se(p: float, users: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(users, 1))


def row_of(r: dict) -> dict:
    d = r.get("diagnostics", {})
    users = d.get("users") or r.get("test_users") or 0
    row = {"label": r["label"], "variant": r["variant"], "seed": r["train_args"]["seed"],
           "K": r["model_args"].get("K", 1), "seconds": round(r["seconds"]),
           "epochs": r["epochs"], "best_epoch": r["best_epoch"], "users": users,
           "aggregate": {k: v for k, v in r["test"].items()},
           "merges": r.get("test_merges", {}),
           "serving": r.get("serving"),
           "valid_by_epoch": [{"HR@50": h.get("valid_HR@50"), "NDCG@10": h.get("valid_NDCG@10"),
                               "samples_per_s": h.get("samples_per_s")}
                              for h in r.get("history") or []],
           "diagnostics": {**{k: d.get(k) for k in ("interest_cosine", "weight_entropy",
                                                    "assignment_entropy", "assignment_nmi")},
                           "prototype_nmi": r.get("concepts", {}).get("nmi")},
           "train_args": {k: r["train_args"].get(k) for k in
                          ("interest_loss", "interest_weight", "cos_penalty", "weight_kl")},
           "model_args": {k: r["model_args"].get(k) for k in ("K", "tau", "tau_assign", "n", "arch")},
           "command": r["command"], "git_commit": r["git_commit"], "machine": r["machine"],
           "finished": r["finished"]}
    return row


def collect(runs_dir: Path, tag: str) -> tuple[dict[str, list[dict]], dict]:
    """The rows of the runs under `runs_dir`, and their differences from K = 1 paired by test
    user (`paired`)."""
    out: dict[str, list[dict]] = {}
    hits: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}
    for p in sorted(runs_dir.glob(f"*/*-{tag}-s*/result.json")):
        r = json.loads(p.read_text())
        if r["variant"] == "popularity":
            continue
        row = row_of(r)
        # the launch that ran it, which a later launch with the same tag must not take over
        name = job_name(p.parent.parent.name, row["variant"], row["seed"])
        launch = runs_dir / "_logs" / tag / f"{name}.launch"
        if launch.exists():
            row["launch"] = launch.read_text()
        out.setdefault(p.parent.parent.name, []).append(row)
        if (p.parent / HITS_FILE).exists():
            with np.load(p.parent / HITS_FILE) as z:
                hits[(p.parent.parent.name, row["variant"], row["seed"])] = dict(z)
    return out, paired(hits)


def paired(hits: dict[tuple[str, str, int], dict[str, np.ndarray]]) -> dict:
    """{data set: {configuration: {"max@50": {diff, se, seeds}, ...}}}: each mode's hit minus
    K = 1's on the same test user, averaged over the seeds both ran with, then over users; the
    standard error is that of the mean of those per-user differences. The same users answer
    both, so this is much tighter than the unpaired error of two separate runs."""
    out: dict = {}
    for ds, variant, _ in sorted(hits):
        if variant == "k1" or variant in out.get(ds, {}):
            continue
        seeds = sorted(sd for (d, v, sd) in hits if d == ds and v == variant
                       and (ds, "k1", sd) in hits)
        if not seeds:
            continue
        res = {}
        for key in hits[(ds, variant, seeds[0])]:
            k = key.split("@")[1]
            d = np.mean([hits[(ds, variant, sd)][key].astype(float)
                         - hits[(ds, "k1", sd)][f"agg@{k}"].astype(float) for sd in seeds],
                        axis=0)                                        # [U]
            res[key] = {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))),
                        "seeds": seeds}
        out.setdefault(ds, {})[variant] = res
    return out


def pool_paired(new: dict, old: dict) -> dict:
    """Paired figures of a new launch (`new`, from `paired`) joined with a results file's
    (`old`) for the same configuration, mode by mode. The per-user hits of earlier launches
    are gone, so each launch's figure is kept as a part: the pooled mean is the seed-weighted
    mean of the parts (exact, since all are means over the same users) and its standard error
    the seed-weighted sum of theirs (the bound for perfectly correlated differences, so never
    too small). An earlier part that shares a seed with the new one was rerun: it is dropped."""
    out = dict(old)
    for key, a in new.items():
        prev = old.get(key)
        earlier = prev.get("parts", [prev]) if prev else []
        parts = [q for q in earlier if not set(q["seeds"]) & set(a["seeds"])] + [a]
        if len(parts) == 1:
            out[key] = a
            continue
        n = [len(q["seeds"]) for q in parts]
        out[key] = {"diff": sum(w * q["diff"] for w, q in zip(n, parts)) / sum(n),
                    "se": sum(w * q["se"] for w, q in zip(n, parts)) / sum(n),
                    "seeds": sorted(sd for q in parts for sd in q["seeds"]),
                    "parts": [{k: q[k] for k in ("diff", "se", "seeds")} for q in parts]}
    return out


def keep_earlier(found: dict[str, list[dict]], path: Path,
                 pairs: dict | None = None) -> tuple[dict[str, list[dict]], list]:
    """`found` plus the rows of the results file at `path` that no run found replaces, and the
    commands that launched those earlier rows; `pairs` (from `collect`) gains the file's paired
    figures, pooled with its own over seeds by `pool_paired`."""
    if not path.exists():
        return found, []
    old = json.loads(path.read_text())
    if pairs is not None:
        for ds, by in old.get("paired", {}).items():
            for variant, res in by.items():
                mine = pairs.setdefault(ds, {})
                mine[variant] = pool_paired(mine[variant], res) if variant in mine else res
    out = {ds: list(rows) for ds, rows in found.items()}
    commands = []
    for ds, rows in old.get("datasets", {}).items():
        have = {(r["variant"], r["seed"]) for r in out.get(ds, [])}
        kept = [r for r in rows if (r["variant"], r["seed"]) not in have]
        if kept:
            out.setdefault(ds, []).extend(kept)
        commands += [r.get("launch", old["meta"].get("command")) for r in kept]
    if any("launch" not in r for rows in old.get("datasets", {}).values() for r in rows):
        # written before rows named their launch: any of the file's launches may own a row
        commands += old.get("meta", {}).get("earlier_commands", [])
    return out, sorted({c for c in commands if c})


def seed_means(rows: list[dict], pairs: dict | None = None) -> list[str]:
    """Markdown rows: each configuration's mean over seeds beside K = 1's, when some ran with
    more than one seed: HR@50 and HR@100 of the aggregate and of each merge."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    if "k1" not in by or max(len(v) for v in by.values()) < 2:
        return []

    base = {r["seed"]: r for r in by["k1"]}
    out = ["Seed means beside K = 1 (`k1`): the difference of the means, in units of the "
           "unpaired standard error sqrt(se_a^2 + se_b^2) of one run each, then the per-seed "
           "differences (seeds both ran with), then `paired`: the mean per-user difference in "
           "hits from K = 1 on the same test users (averaged over the seeds both ran with) ± "
           "its standard error, where the runs kept their per-user hits (`pooled`: launches "
           "of different seeds joined, the mean weighted by seeds and the standard errors "
           "added the same way, an upper bound):", "",
           "| configuration | seeds | mode | HR@50 | vs K = 1 | per seed | paired | HR@100 | "
           "vs K = 1 | per seed | paired |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, rs in sorted(by.items()):
        users = rs[0]["users"]
        modes = ["agg"] + ([] if variant == "k1" else   # K = 1: every merge is the aggregate
                           sorted({k for r in rs for k in (r["merges"] or {})}))
        for mode in modes:
            cells = []
            for metric in ("HR@50", "HR@100"):
                vals = {r["seed"]: (r["aggregate"][metric] if mode == "agg"
                                    else (r["merges"].get(mode) or {}).get(metric)) for r in rs}
                if any(v is None for v in vals.values()):
                    cells += ["-", "-", "-", "-"]
                    continue
                mean = sum(vals.values()) / len(vals)
                ref = {sd: base[sd]["aggregate"][metric] for sd in base}   # K = 1: one list
                kmean = sum(ref.values()) / len(ref)
                err = math.sqrt(se(mean, users) ** 2 + se(kmean, users) ** 2)
                per = [f"{100 * (vals[sd] - ref[sd]):+.2f}" for sd in sorted(vals) if sd in ref]
                pr = (pairs or {}).get(variant, {}).get(f"{mode}@{metric.split('@')[1]}")
                cells += [f"{100 * mean:.2f}", f"{100 * (mean - kmean):+.2f} "
                          f"({(mean - kmean) / err:+.1f} SE)" if variant != "k1" else "-",
                          ", ".join(per) if variant != "k1" else "-",
                          f"{100 * pr['diff']:+.2f} ± {100 * pr['se']:.2f} "
                          f"({pr['diff'] / max(pr['se'], 1e-12):+.1f} SE, seeds "
                          f"{','.join(map(str, pr['seeds']))}"
                          f"{', pooled' if pr.get('parts') else ''})" if pr else "-"]
            out.append(f"| {rs[0]['label']} | {len(rs)} | {mode} | " + " | ".join(cells) + " |")
    return out + [""]


def fmt(p: float | None, users: int) -> str:
    return "-" if p is None else f"{100 * p:.2f} ± {100 * se(p, users):.2f}"


def serving_table(rows: list[dict]) -> list[str]:
    """The default search `sine export` picks for each run (validation HR@50 of the aggregate
    and each merge), beside the test HR@50 of what it picked and of the best on test."""
    chosen = [r for r in rows if r.get("serving") and len(r["serving"]["valid"]) > 1]
    if not chosen:
        return []
    cands = list(chosen[0]["serving"]["valid"])
    out = ["Default search chosen on validation (`sine export --serving auto`): validation HR@50 "
           "of each candidate, the pick, and the test HR@50 of the pick and of the best on test:",
           "", "| configuration | seed | " + " | ".join(f"valid {c}" for c in cands)
           + " | picked | test HR@50 of the pick | best on test |", "|---" * (len(cands) + 5) + "|"]
    for r in sorted(chosen, key=lambda r: (r["variant"], r["seed"])):
        sv, u = r["serving"], r["users"]
        test = {"aggregate": r["aggregate"]["HR@50"],
                **{f"per_interest/{h}": v["HR@50"] for h, v in r["merges"].items()}}
        pick = sv["mode"] + (f"/{sv['merge']}" if sv["merge"] else "")
        best = max(test, key=lambda c: test[c])
        out.append(f"| {r['label']} | {r['seed']} | " + " | ".join(
            f"{100 * sv['valid'][c]['HR@50']:.2f}" for c in cands)
            + f" | {pick} | {fmt(test.get(pick), u)} | {best} ({100 * test[best]:.2f}) |")
    return out + [""]


def write(results: dict, stem: str, meta: dict, results_dir: Path = RESULTS,
          pairs: dict | None = None) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    jpath = results_dir / f"{stem}.json"
    jpath.write_text(json.dumps({"meta": meta, "datasets": results, "paired": pairs or {}},
                                indent=1))
    md = [f"# Multi-interest screen ({meta['tag']})", "",
          f"{meta['finished']}; commit {meta['git_commit'][:10]}; {meta['machine'].get('cpu', '?')}; "
          f"`{meta['command']}`", ""]
    if meta.get("earlier_commands"):
        md += [f"Rows of earlier launches kept from the file: `{c}`."
               for c in meta["earlier_commands"]] + [""]
    md += [
          "Test split, leave-one-out, full ranking, history excluded, in percent ± the binomial "
          "standard error over test users. `agg`: the Eq. 8 user vector; `max`, `weighted`, "
          "`quota`: `mode=per_interest` merged by `service.merge`. Diagnostics: mean pairwise "
          "cosine of a user's interests; entropy of the Eq. 7 weights and of the Eq. 3 "
          "assignment over log K (1 = uniform); assign NMI: a history click's Eq. 3 prototype "
          "against its label; prototype NMI: each item's nearest prototype against its label. "
          f"Each run trained with early stopping for at most {meta['epochs']} epochs and "
          f"{meta['max_minutes']:g} minutes, {meta['jobs']} runs side by side on one thread each.",
          ""]
    for ds, rows in results.items():
        md += [f"## {ds}", "",
               "| configuration | seed | agg HR@50 | agg HR@100 | max HR@50 | weighted HR@50 | "
               "quota HR@50 | max HR@100 | cosine | weight H | assign H | assign NMI | "
               "prototype NMI | epochs | s |",
               "|---" * 15 + "|"]
        for r in sorted(rows, key=lambda r: (r["variant"], r["seed"])):
            u, m, d = r["users"], r["merges"], r["diagnostics"]

            def g(name: str, metric: str) -> float | None:
                return (m.get(name) or {}).get(metric)

            def num(x: float | None) -> str:
                return "-" if x is None else f"{x:.3f}"
            md.append(f"| {r['label']} [`{r['variant']}`] | {r['seed']} | "
                      f"{fmt(r['aggregate']['HR@50'], u)} | {fmt(r['aggregate']['HR@100'], u)} | "
                      f"{fmt(g('max', 'HR@50'), u)} | {fmt(g('weighted', 'HR@50'), u)} | "
                      f"{fmt(g('quota', 'HR@50'), u)} | {fmt(g('max', 'HR@100'), u)} | "
                      f"{num(d['interest_cosine'])} | {num(d['weight_entropy'])} | "
                      f"{num(d['assignment_entropy'])} | {num(d['assignment_nmi'])} | "
                      f"{num(d.get('prototype_nmi'))} | "
                      f"{r['epochs']} ({r['best_epoch']}) | {r['seconds']} |")
        md += ["", "Equal epochs: validation HR@50 of the aggregate after each epoch (training "
               "samples per second in brackets, one thread, beside another run):", "",
               "| configuration | seed | " + " | ".join(f"epoch {e + 1}" for e in range(
                   max(len(r["valid_by_epoch"]) for r in rows))) + " |",
               "|---|---|" + "---|" * max(len(r["valid_by_epoch"]) for r in rows)]
        for r in sorted(rows, key=lambda r: (r["variant"], r["seed"])):
            md.append(f"| {r['label']} | {r['seed']} | " + " | ".join(
                f"{100 * h['HR@50']:.2f} ({h['samples_per_s']:,.0f}/s)"
                for h in r["valid_by_epoch"]) + " |")
        md.append("")
        md += serving_table(rows)
        md += seed_means(rows, (pairs or {}).get(ds))
    (results_dir / f"{stem}.md").write_text("\n".join(md))
    return jpath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ml-100k,synthetic-mix,amazon-beauty")
    p.add_argument("--configs", default="sine,k1,ia-argmax,ia-lse,cos,wkl,distinct",
                   help="benchmarks.accuracy variants")
    p.add_argument("--seeds", default="42")
    p.add_argument("--max-minutes", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=30,
                   help="at most this many epochs (equal epochs: a small number and a large "
                        "--max-minutes)")
    p.add_argument("--patience", type=int, default=3,
                   help="epochs without a validation gain before a run stops")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="torch device of every run (cuda: all jobs share the one GPU; the runs "
                        "need torch and numpy, not faiss)")
    p.add_argument("--data-dir")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="passed to every run (benchmarks.accuracy --set)")
    p.add_argument("--tag", default="screen", help="names the runs and the results file")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "interests")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--collect-only", action="store_true",
                   help="write the results file from the runs already under --runs-dir")
    a = p.parse_args(argv)
    command = "python -m benchmarks.interests " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    launch = a.runs_dir / "_logs" / a.tag / "launch.json"   # what started the runs
    if not a.collect_only:
        cmds = [(job_name(ds, c, int(s)), job_command(ds, c, int(s), a))
                for s in a.seeds.split(",") for ds in a.datasets.split(",")
                for c in a.configs.split(",")]
        launch.parent.mkdir(parents=True, exist_ok=True)
        launch.write_text(json.dumps({"command": command, "jobs": a.jobs,
                                      "max_minutes": a.max_minutes, "epochs": a.epochs}))
        for name, _ in cmds:
            (launch.parent / f"{name}.launch").write_text(command)
        run_jobs(cmds, a.jobs, launch.parent)
    started = json.loads(launch.read_text()) if launch.exists() else {
        "command": command, "jobs": a.jobs, "max_minutes": a.max_minutes, "epochs": a.epochs}
    meta = {"tag": a.tag, **started, "git_commit": git_commit(), "machine": machine("cpu"),
            "finished": now()}
    stem = f"accuracy-interests-{a.tag}"
    found, pairs = collect(a.runs_dir, a.tag)
    rows, earlier = keep_earlier(found, a.results_dir / f"{stem}.json", pairs)
    launches = {r["launch"] for rs in found.values() for r in rs if "launch" in r}
    meta["earlier_commands"] = sorted((launches | set(earlier)) - {meta["command"]})
    path = write(rows, stem, meta, a.results_dir, pairs)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
