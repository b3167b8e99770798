"""The served encoder against a converged SASRec+, per data set and seed, paired by test user.

    python -m benchmarks.quality --runs-dir /root/quality-runs [--default sine]

Reads the `benchmarks.accuracy` runs under `--runs-dir` (`<dataset>/<variant>-<tag>-s<seed>/`:
`result.json` and `test_hits.npz`, as `benchmarks.interests` launches them, to early stopping)
and writes `benchmarks/results/quality.{json,md}`:

- one row per (model, seed): the mode `sine export --serving auto` picks on validation and its
  test HR@10, NDCG@10 (the aggregate's: the per-interest merges keep hits at 50 and 100 only),
  HR@50 and HR@100, diversity@50 and coverage@50, whether early stopping ended it and its epochs;
- `default_vs_sasrec`: HR@50 of the bundle the defaults build (`--default`, the variant of
  `sine train`'s defaults) against the best converged SASRec+ configuration (by validation),
  the difference paired by test user with its standard error, per seed and pooled; null where
  the default has no run;
- `candidates_vs_sasrec`: the same for every other SINE variant that ran;
- HR@50 by how varied each test user's last 20 clicks are (distinct genres or categories among
  them, in three groups), for every row.

Only converged rows (stopped by early stopping) enter a comparison. Runs still training (a
`history.json` and no result yet) are listed under `in_progress` with their folder, validation
curve and the command that resumes them.

Run folders do not outlive the machine they trained on, so the rows of the `quality.json` already
in `--out` whose (model, seed) has no folder under `--runs-dir` are carried over as they were
(`kept`), with their comparisons: a pair whose per-user hits are both here is paired afresh; a
pair with a carried side takes the earlier file's paired figures where it compared the same two,
else the unpaired difference (binomial standard errors, `paired: false`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit, machine, now

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("ml-1m", "amazon-beauty")
MERGE_KEY = {"aggregate": "agg"}          # the served mode -> the test_hits.npz key prefix


def served(r: dict) -> tuple[str, str]:
    """(the mode `--serving auto` picks, its hits key prefix)."""
    s = r.get("serving")
    if not s or s.get("mode") == "aggregate":
        return "aggregate", "agg"
    return f"per_interest/{s['merge']}", s["merge"]


def variety_groups(dataset: str, data_dir: str | None) -> tuple[np.ndarray, list[str]] | None:
    """Each test user's group by the distinct labels among their last 20 clicks, in terciles
    of that count, and the groups' names; None without item labels."""
    from model_export import data

    ds = data.load(dataset, data_dir)
    if not ds.labels:
        return None
    sp = data.split(ds, 20)
    distinct = np.array([len({ds.labels.get(int(i), "?") for i in row if i})
                         for row in sp.test_inputs])
    lo, hi = np.quantile(distinct, [1 / 3, 2 / 3])
    group = np.where(distinct <= lo, 0, np.where(distinct <= hi, 1, 2))
    names = [f"<= {lo:g} {ds.label_kind} labels", f"{lo:g}-{hi:g}", f"> {hi:g}"]
    return group, names


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b over users, in points, and its standard error."""
    d = a.astype(float) - b.astype(float)
    return 100 * float(d.mean()), 100 * float(d.std(ddof=1) / math.sqrt(len(d)))


def collect(runs: Path, dataset: str) -> list[dict]:
    rows = []
    for p in sorted((runs / dataset).glob("*/result.json")):
        r = json.loads(p.read_text())
        hits_file = p.parent / "test_hits.npz"
        if not hits_file.exists():
            continue
        hits = dict(np.load(hits_file))
        mode, key = served(r)
        seed = int(r["train_args"]["seed"])
        beyond = r["beyond"]["per_interest" if mode != "aggregate" else "aggregate"]
        test = r["test"]
        hr50 = float(hits[f"{key}@50"].mean()) * 100
        hr100 = float(hits[f"{key}@100"].mean()) * 100
        rows.append({"model": r["variant"], "label": r["label"], "seed": seed,
                     "mode": mode, "converged": r.get("stopped_because") == "early_stopping",
                     "epochs": r["epochs"], "best_epoch": r["best_epoch"],
                     "seconds": round(r["seconds"]), "valid_HR@50": 100 * _valid(r, mode),
                     "HR@10": 100 * test["HR@10"], "NDCG@10": 100 * test["NDCG@10"],
                     "HR@50": hr50, "HR@100": hr100,
                     "diversity@50": 100 * beyond["diversity@50"],
                     "coverage@50": 100 * beyond["coverage@50"],
                     "valid_curve": [round(100 * h["valid_HR@50"], 2) for h in r["history"]],
                     "_hits": hits[f"{key}@50"], "folder": str(p.parent.name)})
    return rows


def in_progress(runs: Path, dataset: str) -> list[dict]:
    """Runs with a history and no result yet: where they stand, and how to go on."""
    out = []
    for h in sorted((runs / dataset).glob("*/history.json")):
        if (h.parent / "result.json").exists():
            continue
        hist = json.loads(h.read_text())
        variant, _, rest = h.parent.name.partition("-quality-")
        seed = rest.rsplit("-s", 1)[-1]
        tag = rest.rsplit("-s", 1)[0]
        out.append({"folder": str(h.parent), "model": variant, "seed": int(seed),
                    "epochs": len(hist),
                    "valid_HR@50": [round(100 * e["valid_HR@50"], 2) for e in hist],
                    "valid_NDCG@10": [round(100 * e["valid_NDCG@10"], 2) for e in hist],
                    "resume": f"python -m benchmarks.interests --datasets {dataset} --configs "
                              f"{variant} --seeds {seed} --max-minutes 100000 --epochs 300 "
                              f"--patience 3 --jobs 1 --tag quality-{tag} --runs-dir {runs}"})
    return out


def _valid(r: dict, mode: str) -> float:
    s = r.get("serving")
    if s and "valid" in s:
        return float(s["valid"][mode]["HR@50"])
    return float(r["valid"]["HR@50"])


def unpaired(a: dict, b: dict, users: int) -> tuple[float, float]:
    """HR@50 of rows a - b, in points, with the standard error of two independent binomials."""
    p, q = a["HR@50"] / 100, b["HR@50"] / 100
    return 100 * (p - q), 100 * math.sqrt((p * (1 - p) + q * (1 - q)) / users)


def compare(rows: list[dict], model: str, sasrec: str, users: int,
            before: dict | None = None) -> dict | None:
    """`model` against `sasrec` on HR@50, paired by user, per seed both ran (converged).
    `before`: the earlier file's comparison of `model`, whose per-seed figures stand in where a
    side's hits are gone (its rows were carried over)."""
    per_seed, diffs = [], []
    by = {(r["model"], r["seed"]): r for r in rows if r["converged"]}
    old = ({s["seed"]: s for s in before["per_seed"]}
           if before and before.get("against") == sasrec else {})
    for (m, seed), r in sorted(by.items()):
        if m != model or (sasrec, seed) not in by:
            continue
        s = by[(sasrec, seed)]
        if "_hits" in r and "_hits" in s:
            d, se = paired(r["_hits"], s["_hits"])
            diffs.append(r["_hits"].astype(float) - s["_hits"].astype(float))
            entry = {"seed": seed, "diff": round(d, 2), "paired_se": round(se, 2)}
        elif seed in old:
            entry = {**old[seed], "kept": True}
        else:
            d, se = unpaired(r, s, users)
            entry = {"seed": seed, "diff": round(d, 2), "paired_se": round(se, 2),
                     "paired": False}
        if "kept" not in entry:                      # a carried z stays as computed then
            entry["z"] = round(d / se, 2) if se else None
        per_seed.append(entry)
    if not per_seed:
        return None
    if len(diffs) == len(per_seed):
        pooled = np.mean(diffs, axis=0)             # per user, the seeds' mean difference
        diff = round(100 * float(pooled.mean()), 2)
        se = round(100 * float(pooled.std(ddof=1) / math.sqrt(len(pooled))), 2)
    elif all(s.get("kept") for s in per_seed) and {s["seed"] for s in per_seed} == set(old):
        diff, se = before["diff"], before["paired_se"]
    else:                       # mixed: the seeds' mean, their errors as if independent
        diff = round(float(np.mean([s["diff"] for s in per_seed])), 2)
        se = round(math.sqrt(sum(s["paired_se"] ** 2 for s in per_seed)) / len(per_seed), 2)
    return {"metric": "HR@50", "against": sasrec, "diff": diff, "paired_se": se,
            "per_seed": per_seed,
            "met": all(s["z"] is not None and s["z"] >= 2 for s in per_seed)}


def best_sasrec(rows: list[dict]) -> str | None:
    """The converged SASRec+ configuration of the best validation HR@50, averaged over the
    seeds every configuration ran (a sweep runs one seed: the baseline's other seeds do not
    count for it), or over each one's own seeds where they share none."""
    valid: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["model"].startswith("sasrec") and r["converged"]:
            valid.setdefault(r["model"], {})[r["seed"]] = r["valid_HR@50"]
    if not valid:
        return None
    common = set.intersection(*(set(v) for v in valid.values()))
    return max(sorted(valid), key=lambda m: float(np.mean(
        [valid[m][s] for s in (common or valid[m])])))


def carried(before: dict | None, rows: list[dict]) -> list[dict]:
    """The earlier file's rows whose (model, seed) has no run folder now, marked `kept`."""
    here = {(r["model"], r["seed"]) for r in rows}
    return [{**r, "kept": True} for r in (before or {}).get("rows", [])
            if (r["model"], r["seed"]) not in here]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, required=True)
    p.add_argument("--default", default="sine",
                   help="the variant `sine train`'s defaults train (default: sine)")
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    out: dict = {"protocol": "leave-one-out, full ranking over all items, history excluded, the "
                 "20 most recent clicks as input; test split, percent",
                 "default_model": a.default, "command": "python -m benchmarks.quality "
                 + " ".join(argv if argv is not None else sys.argv[1:]),
                 "git_commit": git_commit(), "machine": machine("cpu"), "written": now()}
    prev_file = a.out / "quality.json"
    prev = json.loads(prev_file.read_text()) if prev_file.exists() else {}
    for dataset in DATASETS:
        fresh = collect(a.runs_dir, dataset)
        before = prev.get(dataset)
        rows = fresh + carried(before, fresh)
        if not rows:
            continue
        going = in_progress(a.runs_dir, dataset)
        groups = variety_groups(dataset, a.data_dir) if fresh else None
        for r in rows:
            r["default"] = r["model"] == a.default
            if groups is not None and "_hits" in r:
                g, names = groups
                r["HR@50_by_variety"] = {names[k]: round(100 * float(r["_hits"][g == k].mean()), 2)
                                         for k in range(3)}
        users = int(len(fresh[0]["_hits"])) if fresh else int(before["users"])
        best = best_sasrec(rows)
        old = (before or {}).get("candidates_vs_sasrec", {})
        entry = {"users": users, "best_sasrec": best,
                 "default_vs_sasrec": compare(rows, a.default, best, users,
                                              (before or {}).get("default_vs_sasrec"))
                 if best else None,
                 "candidates_vs_sasrec": {m: compare(rows, m, best, users, old.get(m)) for m in
                                          sorted({r["model"] for r in rows})
                                          if best and m != a.default
                                          and not m.startswith("sasrec")}}
        group_names = groups[1] if groups is not None else (before or {}).get("variety_groups")
        if group_names is not None:
            entry["variety_groups"] = group_names
        entry["rows"] = [{k: (round(v, 2) if isinstance(v, float) else v)
                          for k, v in r.items() if not k.startswith("_")} for r in rows]
        entry["in_progress"] = going
        out[dataset] = entry
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quality.json").write_text(json.dumps(out, indent=1))
    (a.out / "quality.md").write_text(render(out))
    print(render(out))
    return 0


def render(out: dict) -> str:
    md = ["# The served encoder against a converged SASRec+", "",
          f"{out['written']}; commit `{out['git_commit'][:10]}`; {out['machine'].get('cpu', '?')}; "
          f"`{out['command']}`.", "",
          f"Protocol: {out['protocol']}. Each row trained to early stopping on validation "
          "NDCG@10 (patience 3) on one thread, beside one other run; `s` is wall time, pauses "
          "included (the runs were stopped while timed benchmarks ran); `mode` is what `sine export "
          "--serving auto` picks on validation; HR@10 and NDCG@10 are the aggregate's. "
          f"The defaults of `sine train` build `{out['default_model']}`.", ""]
    for dataset in DATASETS:
        if dataset not in out:
            continue
        e = out[dataset]
        md += [f"## {dataset} ({e['users']:,} test users)", "",
               "| model | seed | mode | converged, epochs (best) | HR@10 | NDCG@10 | HR@50 | HR@100 "
               "| diversity@50 | coverage@50 | s |", "|---" * 11 + "|"]
        for r in e["rows"]:
            mark = " (default)" if r["default"] and "default" not in r["label"] else ""
            mark += " †" if r.get("kept") else ""
            md.append(f"| {r['label']}{mark} | {r['seed']} | "
                      f"{r['mode']} | {'yes' if r['converged'] else 'no'}, {r['epochs']} "
                      f"({r['best_epoch']}) | {r['HR@10']:.2f} | {r['NDCG@10']:.2f} | "
                      f"{r['HR@50']:.2f} | {r['HR@100']:.2f} | {r['diversity@50']:.2f} | "
                      f"{r['coverage@50']:.2f} | {r['seconds']} |")
        if any(r.get("kept") for r in e["rows"]):
            md += ["", "† carried over from the previous file: the run folder is gone (it "
                   "trained on another machine), the figures are as measured then."]
        sweep = sorted((r for r in e["rows"] if r["model"].startswith("sasrec")),
                       key=lambda r: (-r["valid_HR@50"], r["model"], r["seed"]))
        if sweep:
            md += ["", "SASRec+'s configurations by validation HR@50 (the best converged one, "
                   "on the seeds they all ran, is what every SINE row is compared with):", "",
                   "| configuration | seed | converged, epochs (best) | valid HR@50 | test HR@50 "
                   "| s |", "|---|---|---|---|---|---|"]
            for r in sweep:
                md.append(f"| `{r['model']}` | {r['seed']} | "
                          f"{'yes' if r['converged'] else 'no'}, {r['epochs']} "
                          f"({r['best_epoch']}) | {r['valid_HR@50']:.2f} | {r['HR@50']:.2f} | "
                          f"{r['seconds']} |")
        md += ["", f"Against the best converged SASRec+ configuration (`{e['best_sasrec']}`), "
               "HR@50 paired by test user where both runs' hits are at hand, else unpaired "
               "(marked; binomial standard errors) (points, ± its standard error; z = diff / "
               "SE):", ""]
        comps = {f"default ({out['default_model']})": e["default_vs_sasrec"],
                 **e["candidates_vs_sasrec"]}
        for name, c in comps.items():
            if c is None:
                md.append(f"- {name}: no converged run beside SASRec+ yet.")
                continue
            seeds = "; ".join(f"seed {s['seed']}: {s['diff']:+.2f} ± {s['paired_se']:.2f} "
                              f"(z {s['z']}{', unpaired' if s.get('paired') is False else ''}"
                              f"{', as measured before' if s.get('kept') else ''})"
                              for s in c["per_seed"])
            md.append(f"- {name}: {c['diff']:+.2f} ± {c['paired_se']:.2f} over "
                      f"{len(c['per_seed'])} seed(s) ({seeds}); the goal (z >= 2 in every seed) "
                      f"is {'met' if c['met'] else '**not met**'}.")
        if "variety_groups" in e:
            g = e["variety_groups"]
            md += ["", "HR@50 by how varied each user's last 20 clicks are (distinct "
                   "labels among them, terciles):", "",
                   "| model | seed | " + " | ".join(g) + " |", "|---" * (len(g) + 2) + "|"]
            for r in e["rows"]:
                md.append(f"| {r['label']} | {r['seed']} | " + " | ".join(
                    f"{r['HR@50_by_variety'][k]:.2f}" for k in g) + " |")
        md += ["", "Validation HR@50 after each epoch:", ""]
        for r in e["rows"]:
            md.append(f"- {r['label']}, seed {r['seed']}: " + ", ".join(map(str, r["valid_curve"])))
        if e.get("in_progress"):
            md += ["", "Still training when this was written (not converged, no test figures): "
                   "validation HR@50 / NDCG@10 after each epoch, and the command that resumes "
                   "the run from its `last.pt`:", ""]
            for r in e["in_progress"]:
                md.append(f"- `{r['model']}`, seed {r['seed']}, {r['epochs']} epochs in "
                          f"`{r['folder']}`: HR@50 " + ", ".join(map(str, r["valid_HR@50"]))
                          + "; NDCG@10 " + ", ".join(map(str, r["valid_NDCG@10"]))
                          + f". Resume: `{r['resume']}`")
        md.append("")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
