"""Could SINE's interests be distinct, and would distinct ones retrieve? Trained checkpoints read
against crisp interests cut from each user's clicks (`model_export.evaluation.partition`).

    python -m benchmarks.partition --run amazon-beauty=runs/interests/amazon-beauty/k8-beauty-3ep-s3/best.pt \\
        --run ml-1m=runs/interests/ml-1m/sine-ml1m-20min-s42/best.pt --tag interests

For each checkpoint, on the test split (history excluded): the aggregate's HR, SINE's own
per-interest retrieval and the k-means groups' under each merge of `service.merge`, each with
its binomial standard error, the groups' `max` paired by user against SINE's `max` and against
the aggregate; and the cosines and within-user NMI of `partition_diagnostics`. Nothing is
trained here: the checkpoint's own training command is recorded beside its rows. Results go to
`benchmarks/results/interests-partition.{json,md}`; a checkpoint's row replaces its earlier one.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit, machine, now, write_results
from benchmarks.interests import se

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KS = (50, 100)
MERGE_NAMES = ("max", "weighted", "quota")


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and standard error of a - b over users, in percent."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return {"diff": 100 * float(d.mean()), "se": 100 * float(d.std(ddof=1) / math.sqrt(len(d)))}


def measure(dataset: str, ckpt: Path, data_dir: str | None, K: int | None) -> dict:
    from model_export.data import load, split
    from model_export.evaluation.evaluate import evaluate_merge, evaluate_model
    from model_export.evaluation.partition import PartitionInterests, partition_diagnostics
    from model_export.training.checkpoints import load_checkpoint, model_from_checkpoint

    raw = load_checkpoint(ckpt)
    seed = raw["train_args"]["seed"]                       # synthetic data is drawn from it
    ds = load(dataset, data_dir, seed=seed)
    ck = load_checkpoint(ckpt, ds)
    model = model_from_checkpoint(ck)
    sp = split(ds, model.config.n)
    users = len(sp.test_targets)
    t0 = time.perf_counter()
    ranks: list[np.ndarray] = []
    agg = evaluate_model(model, ds, sp, ranks_out=ranks)
    hits = {"aggregate": {k: ranks[0] < k for k in KS}}
    rows = {"aggregate": {f"HR@{k}": 100 * agg[f"HR@{k}"] for k in KS}}
    groups = PartitionInterests(model, K)
    for who, m in (("sine", model), ("partition", groups)):
        for how in MERGE_NAMES:
            h: dict[int, np.ndarray] = {}
            r = evaluate_merge(m, ds, sp, how, hits_out=h)
            rows[f"{who}/{how}"] = {f"HR@{k}": 100 * r[f"HR@{k}"] for k in KS}
            hits[f"{who}/{how}"] = h
    for r in rows.values():
        for k in KS:
            r[f"se@{k}"] = 100 * se(r[f"HR@{k}"] / 100, users)
    pairs = {f"partition/max - {b}": {f"@{k}": paired(hits["partition/max"][k], hits[b][k]) for k in KS}
             for b in ("sine/max", "aggregate")}
    diag = partition_diagnostics(model, ds, sp, K)
    return {"dataset": dataset, "checkpoint": str(ckpt), "users": users,
            "model_args": ck["model_args"], "train_args": ck["train_args"],
            "epochs": ck["best_epoch"], "rows": rows, "paired": pairs, "diagnostics": diag,
            "seconds": time.perf_counter() - t0, "git_commit": git_commit(), "finished": now()}


def num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(payload: dict) -> list[str]:
    lines = [f"# Crisp interests against SINE's ({payload['tag']})", "",
             f"{payload['finished']}; commit {payload['git_commit']}; {payload['machine'].get('cpu')}; "
             f"`{payload['command']}`", "",
             "Test split, leave-one-out, full ranking, history excluded, percent ± the binomial standard "
             "error over test users. `sine/<merge>`: the checkpoint's own K interests, searched one by one "
             "and merged by `service.merge`; `partition/<merge>`: the k-means groups of each user's clicks "
             "on the checkpoint's item embeddings (LN3 of each group's mean, weighted by its share of the "
             "clicks), merged the same way. Cosines: mean pairwise cosine of a user's interests; "
             "\"one click each\" is the mean over pairs of a user's clicks, as if each click were an "
             "interest. NMI within users: a user's groups (or "
             "Eq. 3 picks) against the item labels of their own clicks, averaged over users; chance "
             "permutes each user's groups over their clicks (where a user has about as many clicks as "
             "groups, as on Beauty, chance is close to the groups' figure). Items: every labelled item's "
             "k-means cluster (L centres, on the unit sphere) or nearest prototype against its label.", ""]
    head = "| data set | checkpoint | K | aggregate | " + " | ".join(f"sine/{m}" for m in MERGE_NAMES) + " | " + \
        " | ".join(f"partition/{m}" for m in MERGE_NAMES) + " |"
    for k in KS:
        lines += [f"HR@{k}:", "", head, "|" + "---|" * (3 + 1 + 2 * len(MERGE_NAMES))]
        for r in payload["runs"]:
            cells = [f"{r['rows'][n][f'HR@{k}']:.2f} ± {r['rows'][n][f'se@{k}']:.2f}"
                     for n in ("aggregate", *[f"sine/{m}" for m in MERGE_NAMES],
                               *[f"partition/{m}" for m in MERGE_NAMES])]
            lines.append(f"| {r['dataset']} | `{Path(r['checkpoint']).parent.name}` | "
                         f"{r['model_args']['K']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Paired by user, `partition/max` minus:", "",
              "| data set | checkpoint | SINE's max @50 | SINE's max @100 | aggregate @50 | aggregate @100 |",
              "|---|---|---|---|---|---|"]
    for r in payload["runs"]:
        p = r["paired"]
        cells = [f"{p[f'partition/max - {b}'][f'@{k}']['diff']:+.2f} ± {p[f'partition/max - {b}'][f'@{k}']['se']:.2f}"
                 for b in ("sine/max", "aggregate") for k in KS]
        lines.append(f"| {r['dataset']} | `{Path(r['checkpoint']).parent.name}` | " + " | ".join(cells) + " |")
    lines += ["", "| data set | checkpoint | one click each | partition cosine | SINE interest cosine | "
              "NMI within users: partition | SINE Eq. 3 | chance | items: k-means | items: nearest prototype |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["runs"]:
        d = r["diagnostics"]
        lines.append(f"| {r['dataset']} | `{Path(r['checkpoint']).parent.name}` | {num(d['click_cosine'])} | "
                     f"{num(d['partition_cosine'])} | "
                     f"{num(d['interest_cosine'])} | {num(d.get('within_user_nmi_partition'))} | "
                     f"{num(d.get('within_user_nmi_sine'))} | {num(d.get('within_user_nmi_chance'))} | "
                     f"{num(d.get('item_kmeans_nmi'))} | {num(d.get('prototype_nmi'))} |")
    lines += ["", "Checkpoints (their full training settings are the `train_args` in the JSON file):", ""]
    for r in payload["runs"]:
        t = r["train_args"]
        extra = {k: t[k] for k in ("interest_weight", "cos_penalty", "weight_kl") if t.get(k)}
        lines.append(f"- {r['dataset']}: `{r['checkpoint']}`, K = {r['model_args']['K']}, "
                     f"best epoch {r['epochs']}, seed {t['seed']}" + (f", {extra}" if extra else ""))
    if payload.get("notes"):
        lines += ["", *(f"- {n}" for n in payload["notes"])]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.partition", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="DATASET=CHECKPOINT",
                   help="a data set name (or click-log path) and a SINE checkpoint trained on it; repeatable")
    p.add_argument("--K", type=int, default=None, help="groups per user (default: the checkpoint's K)")
    p.add_argument("--data-dir", default=None, help="folder holding the data sets (default ../shared/data)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tag", default="interests", help="results file stem suffix (default interests)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="how a checkpoint was trained, printed under the tables; repeatable")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    runs = []
    for spec in a.run:
        if "=" not in spec:
            p.error(f"--run {spec!r}: expected DATASET=CHECKPOINT")
        dataset, ckpt = spec.split("=", 1)
        if not Path(ckpt).is_file():
            p.error(f"--run {spec!r}: no checkpoint at {ckpt}")
        print(f"{dataset}: {ckpt}", file=sys.stderr)
        runs.append(measure(dataset, Path(ckpt), a.data_dir, a.K))
    stem = f"interests-partition-{a.tag}" if a.tag != "interests" else "interests-partition"
    old = a.out / f"{stem}.json"
    if old.exists():                                       # keep the data sets not rerun
        mine = {r["checkpoint"] for r in runs}
        earlier = json.loads(old.read_text())
        runs = [r for r in earlier["runs"] if r["checkpoint"] not in mine] + runs
        a.note = [n for n in earlier.get("notes", []) if n not in a.note] + a.note
    payload = {"tag": a.tag, "command": shlex.join(["python", "-m", "benchmarks.partition", *(argv or sys.argv[1:])]),
               "git_commit": git_commit(), "machine": machine(), "finished": now(), "runs": runs,
               "notes": a.note}
    write_results(a.out, stem, payload, markdown(payload))


if __name__ == "__main__":
    main()
