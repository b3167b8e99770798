"""Accuracy benchmark: SINE, its ablations and SASRec under the paper's protocol.

    python -m benchmarks.accuracy --dataset ml-1m --variants sine,k1,sasrec --epochs 2
    python -m benchmarks.accuracy --dataset amazon-beauty --variants sine --set K=8 --tag K8

Each variant trains with early stopping on validation NDCG@10, is evaluated on test (full
ranking, history excluded) and leaves `<runs-dir>/<dataset>/<variant>/result.json`. The merge step
(run after every variant, or alone with `--merge-only`) collects every variant's result into
`benchmarks/results/accuracy-<dataset>.json` and `.md`: metrics in percent as the paper's Table 1,
seconds, epochs, the exact command, the git commit and the machine of each row. Rows already
in the results file whose run folder is gone are kept as they are.

Beside HR and NDCG, each trained row gets (`extra_metrics`): per-interest retrieval (the
service's `mode=per_interest`: K searches merged by best score), the beyond-accuracy figures of
its top-50 lists in both modes (catalog coverage, label diversity, novelty), and for SINE the
interest diagnostics (`model_export.evaluation.evaluate.interest_diagnostics`). `--set NAME=VALUE` changes
one model setting of every variant run (a sweep point; name its rows with `--tag`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import git_commit, machine, now
from model_export import data

ROOT = Path(__file__).resolve().parent.parent

# one knob each; the dropout preset is 0.2 on ML-1M and 0.5 on Beauty (SASREC_PRESETS), so d02
# and d05 each repeat `sasrec-dense` on one of them and are refused there (`sweep_repeats`)
SASREC_SWEEP = {"d0": {"dropout": 0.0}, "d02": {"dropout": 0.2}, "d05": {"dropout": 0.5},
                "D64": {"D": 64},
                "D256": {"D": 256}, "b1": {"blocks": 1}, "b3": {"blocks": 3},
                "h2": {"heads": 2}, "lr5e4": {"lr": 5e-4}, "lr2e3": {"lr": 2e-3},
                "bs64": {"batch_size": 64}, "bs256": {"batch_size": 256}}
VARIANTS = {
    "popularity": {},
    "sine": {},
    "k1": {"K": 1},
    "k2": {"K": 2},
    "k8": {"K": 8},
    "tau1": {"tau": 1.0},
    "tau-a07": {"tau_assign": 0.07},
    "tau-a05": {"tau_assign": 0.5},
    "lam0": {"lam": 0.0},
    "mean": {"aggregation": "mean"},
    "literal": {"literal": True},
    "sampled": {"loss": "sampled"},
    "sasrec": {"arch": "sasrec"},
    "sasrec-n50": {"arch": "sasrec", "n": 50},
    "sasrec-n200": {"arch": "sasrec", "n": 200},
    "ia-argmax": {"interest_weight": 1.0, "interest_loss": "argmax"},
    "ia-sample": {"interest_weight": 1.0, "interest_loss": "sample"},
    "ia-lse": {"interest_weight": 1.0, "interest_loss": "logsumexp"},
    "cos": {"cos_penalty": 0.5},
    "cos03": {"cos_penalty": 0.3},
    "cos025": {"cos_penalty": 0.25},
    "cos02": {"cos_penalty": 0.2},
    "cos015": {"cos_penalty": 0.15},
    "cos02-k8": {"cos_penalty": 0.2, "K": 8},
    "cos02-argmax": {"cos_penalty": 0.2, "interest_weight": 0.2, "interest_loss": "argmax"},
    "cos04-argmax": {"cos_penalty": 0.4, "interest_weight": 0.2, "interest_loss": "argmax"},
    "cos05-argmax": {"cos_penalty": 0.5, "interest_weight": 0.2, "interest_loss": "argmax"},
    "cos04-argmax05": {"cos_penalty": 0.4, "interest_weight": 0.5, "interest_loss": "argmax"},
    "wkl": {"weight_kl": 1.0},
    "distinct": {"interest_weight": 1.0, "interest_loss": "logsumexp", "cos_penalty": 0.5,
                 "weight_kl": 1.0},
    "wkl-cos": {"weight_kl": 1.0, "cos_penalty": 0.1},
    "votes": {"activation": "votes"},
    "votes-k8": {"activation": "votes", "K": 8},
    "refresh": {"prototype_refresh": True},
    "votes-refresh": {"activation": "votes", "prototype_refresh": True},
    "votes-refresh-cos02": {"activation": "votes", "prototype_refresh": True, "cos_penalty": 0.2},
    "sasrec-dense": {"arch": "sasrec", "targets": "dense"},
    "sine-dense": {"targets": "dense"},
    "sine-bb1-dense": {"blocks": 1, "targets": "dense"},
    "sine-bb2-dense": {"blocks": 2, "targets": "dense"},
    "k1-bb2-dense": {"K": 1, "blocks": 2, "targets": "dense"},
    "sine-bb2-latest-dense": {"blocks": 2, "aggregation": "latest", "targets": "dense"},
    "sine-bb2-d02-dense": {"blocks": 2, "dropout": 0.2, "targets": "dense"},
    "sine-bb2-d05-dense": {"blocks": 2, "dropout": 0.5, "targets": "dense"},
    "sine-bb2-d05-hr50-dense": {"blocks": 2, "dropout": 0.5, "targets": "dense",
                                "select_metric": "HR@50"},
    "sasrec-hr50-dense": {"arch": "sasrec", "targets": "dense", "select_metric": "HR@50"},
    "sine-bb2-res-d02-dense": {"blocks": 2, "dropout": 0.2, "residual": True, "targets": "dense"},
    "sine-bb2-res-d05-dense": {"blocks": 2, "dropout": 0.5, "residual": True, "targets": "dense"},
    # SASRec+'s tuning sweep (issue 38): one knob at a time around sasrec-dense
    **{f"sasrec-{tag}-dense": {"arch": "sasrec", "targets": "dense", **knob}
       for tag, knob in SASREC_SWEEP.items()},
}
# `--set` names that go to TrainConfig, not the model
TRAIN_SETTINGS = ("interest_weight", "interest_loss", "interest_T", "cos_penalty", "weight_kl",
                  "weight_kl_T", "prototype_refresh", "targets", "stride", "select_metric")
LABELS = {
    "popularity": "Popularity (training counts)",
    "sine": "SINE (this project, default)",
    "k1": "SINE, K = 1 (single interest)",
    "k2": "SINE, K = 2 (the authors' ML-1M setting)",
    "k8": "SINE, K = 8",
    "tau1": "SINE, Eq. 7 tau 1 (softer weights than 0.1)",
    "tau-a07": "SINE, Eq. 3 on cosine / 0.07 (the authors' code)",
    "tau-a05": "SINE, Eq. 3 on cosine / 0.5 (softer assignment)",
    "lam0": "SINE, lambda = 0 (no Eq. 10)",
    "mean": "SINE, mean of interests (no Eq. 6-8)",
    "literal": "SINE, Eq. 3/7 literal LN dot products",
    "sampled": "SINE, sampled softmax (1280 log-uniform negatives)",
    "sasrec": "SASRec (2 blocks, single vector, same harness)",
    "sasrec-n50": "SASRec on the 50 most recent clicks (the service reads 20)",
    "sasrec-n200": "SASRec on the 200 most recent clicks (the original's ML-1M input)",
    "ia-argmax": "SINE + its best interest's item loss (argmax, beta 1)",
    "ia-sample": "SINE + a sampled interest's item loss (BaM, T 1, beta 1)",
    "ia-lse": "SINE + logsumexp-over-interests item loss (beta 1)",
    "cos": "SINE + interest cosine penalty (alpha 0.5)",
    "cos03": "SINE + interest cosine penalty (alpha 0.3)",
    "cos025": "SINE + interest cosine penalty (alpha 0.25)",
    "cos02": "SINE + interest cosine penalty (alpha 0.2)",
    "cos015": "SINE + interest cosine penalty (alpha 0.15)",
    "cos02-k8": "SINE, K = 8 + interest cosine penalty (alpha 0.2)",
    "cos02-argmax": "SINE + cosine penalty 0.2 and its best interest's item loss (argmax, beta 0.2)",
    "cos04-argmax": "SINE + cosine penalty 0.4 and its best interest's item loss (argmax, beta 0.2)",
    "cos05-argmax": "SINE + cosine penalty 0.5 and its best interest's item loss (argmax, beta 0.2)",
    "cos04-argmax05": "SINE + cosine penalty 0.4 and its best interest's item loss (argmax, beta 0.5)",
    "wkl": "SINE + Eq. 7 weights taught the target's interest (KL, gamma 1, T 0.5)",
    "distinct": "SINE + logsumexp loss, cosine penalty 0.5, weight KL 1",
    "wkl-cos": "SINE + weight KL 1 and cosine penalty 0.1",
    "votes": "SINE, prototypes activated by the clicks' votes (deviation 6)",
    "votes-k8": "SINE, K = 8, prototypes activated by the clicks' votes",
    "refresh": "SINE, prototypes set to k-means centres of the items each epoch",
    "votes-refresh": "SINE, votes and k-means prototypes each epoch",
    "votes-refresh-cos02": "SINE, votes, k-means prototypes and cosine penalty 0.2",
    "sasrec-dense": "SASRec+ (2 blocks, a target at every slot, full softmax)",
    "sine-dense": "SINE, dense targets (every prefix of a window predicts its next click)",
    "sine-bb1-dense": "SINE on 1 causal self-attention block, dense targets",
    "sine-bb2-dense": "SINE on 2 causal self-attention blocks, dense targets",
    "k1-bb2-dense": "SINE, K = 1, on 2 causal self-attention blocks, dense targets",
    "sine-bb2-latest-dense": "SINE on 2 causal blocks, Eq. 7 intention from the latest state, dense targets",
    "sine-bb2-d02-dense": "SINE on 2 causal blocks with dropout 0.2 (SASRec's ML-1M rate), dense targets",
    "sine-bb2-d05-dense": "SINE on 2 causal blocks with dropout 0.5 (SASRec's Amazon rate), dense targets",
    "sine-bb2-d05-hr50-dense": "SINE on 2 causal blocks, dropout 0.5, dense targets, stopped on valid HR@50",
    "sasrec-hr50-dense": "SASRec+, stopped on valid HR@50",
    "sine-bb2-res-d02-dense": "SINE on 2 causal blocks, interests plus the latest state, dropout 0.2, dense targets",
    "sine-bb2-res-d05-dense": "SINE on 2 causal blocks, interests plus the latest state, dropout 0.5, dense targets",
    **{f"sasrec-{tag}-dense": "SASRec+, " + ", ".join(f"{k} {v:g}" for k, v in knob.items())
       for tag, knob in SASREC_SWEEP.items()},
}
def sweep_repeats(name: str, ds: data.Dataset) -> str | None:
    """`sasrec-dense` where the sweep variant `name` builds the same model on `ds` as it does
    (a model knob equal to the data set's preset), else None."""
    from model_export.training.workflow import model_config

    v = VARIANTS[name]
    knob = {k: x for k, x in v.items() if k not in ("arch", "targets")}
    if (v.get("arch") != "sasrec" or v.get("targets") != "dense" or not knob
            or set(knob) & {"lr", "batch_size"}):
        return None
    return "sasrec-dense" if model_config(ds, "sasrec", **knob) == model_config(ds, "sasrec") \
        else None


LIST_N = 50                  # the top-N of the beyond-accuracy figures
HIT_KS = (50, 100)           # each test user's hit at these cut-offs goes to HITS_FILE
HITS_FILE = "test_hits.npz"  # in the run folder: {"agg@50": [U] bool, "max@100": ..., ...}
PAPER = {"ml-1m": {"HR@10": 16.34, "NDCG@10": 7.06, "HR@50": 45.79, "NDCG@50": 13.50}}
AIM = {"ml-1m": {"HR@10": 21.5, "NDCG@10": 11.0, "HR@50": 49.0, "NDCG@50": 17.0}}


def run_variant(name: str, ds, args, command: str) -> dict:
    from model_export.data import split
    from model_export.evaluation.evaluate import beyond_accuracy, evaluate_popularity
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import evaluate_checkpoint, model_config

    out = Path(args.runs_dir) / ds.name / (f"{name}-{args.tag}" if args.tag else name)
    if args.resume and (out / "result.json").exists():   # finished: kept, never trained again
        print(f"{out}: finished before, its result.json kept", flush=True)
        return json.loads((out / "result.json").read_text())
    t0 = time.perf_counter()
    if name == "popularity":
        sp = split(ds)
        res = {"test": evaluate_popularity(ds, sp, "test"), "valid": evaluate_popularity(ds, sp, "valid"),
               "epochs": 0, "best_epoch": 0, "seconds": time.perf_counter() - t0,
               "beyond": {"popularity": beyond_accuracy(None, ds, sp, LIST_N)}}
    else:
        over = dict(VARIANTS[name])
        lam = over.pop("lam", args.lam)
        loss = over.pop("loss", args.loss)
        arch = over.pop("arch", "sine")
        lr, batch_size = over.pop("lr", args.lr), over.pop("batch_size", args.batch_size)
        over.update(args.set or {})
        terms = {k: over.pop(k) for k in TRAIN_SETTINGS if k in over}
        mcfg = model_config(ds, arch, **over)
        if (base := sweep_repeats(name, ds)) is not None:
            raise SystemExit(f"{name} on {ds.name} is {base} itself (SASRec's preset there); "
                             "it would repeat that run")
        tcfg = TrainConfig(batch_size=batch_size, lr=lr, lam=lam, loss=loss,
                           max_epochs=args.epochs, patience=args.patience,
                           max_minutes=args.max_minutes, seed=args.seed, threads=args.threads,
                           device=args.device, **terms)
        last = out / "last.pt"
        resume = last if args.resume and last.exists() else None
        tr = train(ds, mcfg, tcfg, out, resume=resume, progress=not args.no_progress)
        ev = evaluate_checkpoint(out / "best.pt", ds, out, with_popularity=False)
        res = {"test": ev["metrics"]["test"][ev["model_name"]],
               "valid": ev["metrics"]["valid"][ev["model_name"]],
               "test_keep_history": keep_history_metrics(out / "best.pt", ds),
               "epochs": tr.epochs_run, "best_epoch": tr.best_epoch, "seconds": tr.seconds,
               "stopped_because": tr.stopped_because, "model_args": ev["model_args"],
               "train_args": ev["train_args"], "loss_kind": ev["loss_kind"],
               "history": tr.history, "concepts": {k: v for k, v in ev["concepts"].items()
                                                   if k != "case_study"},
               **extra_metrics(out / "best.pt", ds)}
    label = LABELS[name] + "".join(f", {k} = {v}" for k, v in (args.set or {}).items())
    res.update({"variant": name, "label": label, "command": command,
                "git_commit": git_commit(), "machine": machine(args.device),
                "finished": now()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def keep_history_metrics(ck_path: Path, ds) -> dict:
    """Test metrics without excluding the user's past items (RecBole's and the authors' protocol)."""
    from model_export.data import split
    from model_export.evaluation.evaluate import evaluate_model
    from model_export.training import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ck_path, ds))
    return evaluate_model(model, ds, split(ds, model.config.n), "test", exclude_history=False)


def extra_metrics(ck_path: Path, ds) -> dict:
    """Per-interest test metrics, top-N list figures in both modes, interest diagnostics."""
    from index_builder.bundle import MERGES
    from model_export.data import split
    from model_export.evaluation.evaluate import (
        beyond_accuracy,
        evaluate_merge,
        evaluate_model,
        interest_diagnostics,
    )
    from model_export.export import choose_serving
    from model_export.models.sine import SINE
    from model_export.training import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ck_path, ds))
    sp = split(ds, model.config.n)
    ranks: list[np.ndarray] = []
    evaluate_model(model, ds, sp, "test", ranks_out=ranks)
    hits = {f"agg@{k}": ranks[0] < k for k in HIT_KS}     # per test user, for paired differences
    out: dict = {"test_users": int(len(ranks[0])),
                 "test_per_interest": evaluate_model(model, ds, sp, "test", mode="per_interest"),
                 "beyond": {m: beyond_accuracy(model, ds, sp, LIST_N, m)
                            for m in ("aggregate", "per_interest")}}
    if isinstance(model, SINE):
        out["diagnostics"] = interest_diagnostics(model, ds, sp)
        out["serving"] = choose_serving(model, ds, sp)      # what `sine export` would default to
        out["test_merges"] = {}
        for how in MERGES:
            at: dict[int, np.ndarray] = {}
            out["test_merges"][how] = evaluate_merge(model, ds, sp, how, hits_out=at)
            hits.update({f"{how}@{k}": at[k] for k in HIT_KS})
    np.savez_compressed(ck_path.parent / HITS_FILE, **hits)
    return out


def reevaluate(dataset: str, ds, runs_dir: Path) -> None:
    """Add the keep-history and extra metrics to finished runs whose checkpoint is still there."""
    from model_export.data import split
    from model_export.evaluation.evaluate import beyond_accuracy

    for p in sorted((runs_dir / dataset).glob("*/result.json")):
        r = json.loads(p.read_text())
        ck = p.parent / "best.pt"
        if r["variant"] == "popularity" and "beyond" not in r:
            r["beyond"] = {"popularity": beyond_accuracy(None, ds, split(ds), LIST_N)}
        if "test_keep_history" not in r and ck.exists():
            r["test_keep_history"] = keep_history_metrics(ck, ds)
        if "beyond" not in r and ck.exists():
            r.update(extra_metrics(ck, ds))
        p.write_text(json.dumps(r, indent=1))


def pct(m: dict) -> dict:
    return {k: round(100 * v, 2) for k, v in m.items()}


def merge(dataset: str, runs_dir: Path, results_dir: Path) -> Path:
    # every run folder of the data set: `<variant>` or `<variant>-<tag>` (e.g. a GPU run), over
    # the rows of the results file whose folders are elsewhere
    jpath = results_dir / f"accuracy-{dataset}.json"
    known = json.loads(jpath.read_text())["rows"] if jpath.exists() else {}
    for p in sorted((runs_dir / dataset).glob("*/result.json")):
        r = json.loads(p.read_text())
        for part in ("test", "valid", "test_keep_history", "test_per_interest"):
            if part in r:
                r[f"{part}_percent"] = pct(r.pop(part))
        known[p.parent.name] = r
    order = sorted(known, key=lambda k: (list(VARIANTS).index(known[k]["variant"]),
                                         "gpu" in known[k]["machine"], k))
    rows = {k: known[k] for k in order}
    out = {"dataset": dataset, "protocol": "leave-one-out; full ranking over all items; items the "
           "user interacted with before the target excluded; metrics in percent",
           "paper_sine_row": PAPER.get(dataset), "aim": AIM.get(dataset), "rows": rows}
    results_dir.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(out, indent=1))
    cols = ["HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@100", "NDCG@100"]
    md = [f"# Accuracy on {dataset}", "",
          "Test split, " + out["protocol"] + ". Written by `benchmarks/accuracy.py`. Each row "
          "trained with early stopping on validation NDCG@10 inside the wall-clock budget in "
          "`seconds`, on the machine named; compare ablations only between rows of one machine "
          "and budget (the GPU rows trained side by side, one process each, on one GPU; the "
          "`-side` rows side by side on the 2-core CPU, one single-threaded process each, "
          "`benchmarks/side_by_side.sh`). `samples`: training windows seen up to the best "
          "epoch.", "",
          "| model | " + " | ".join(cols) + " | epochs (best) | samples | seconds | machine |",
          "|---" * (len(cols) + 5) + "|"]
    if dataset in PAPER:
        md.append("| paper, Table 1 SINE row | " + " | ".join(
            f"{PAPER[dataset].get(c, '-')}" for c in cols) + " | | | | |")
        md.append("| aim (above single-vector SASRec) | " + " | ".join(
            f"{AIM[dataset].get(c, '-')}" for c in cols) + " | | | | |")
    for key, r in rows.items():
        m = r["test_percent"]
        mach = r["machine"].get("gpu") or f"{r['machine'].get('cpus')} CPU cores"
        md.append(f"| {r['label']} [`{key}`] | " + " | ".join(f"{m[c]:.2f}" for c in cols)
                  + f" | {r['epochs']} ({r['best_epoch']}) | {samples_trained(r)} | "
                  f"{r['seconds']:.0f} | {mach} |")
    kept = {k: r for k, r in rows.items() if "test_keep_history_percent" in r}
    if kept:
        md += ["", "The same checkpoints **without** excluding the user's past items (the protocol "
               "of the authors' code and of RecBole's full-sort evaluation):", "",
               "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in kept.values():
            m = r["test_keep_history_percent"]
            md.append(f"| {r['label']} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + " |")
    md += extra_sections(rows)
    md += ["", "Commands, commits and machines of each row:", ""]
    for name, r in rows.items():
        md.append(f"- {name}: `{r['command']}` at `{r['git_commit'][:10]}` on "
                  f"{r['machine'].get('gpu') or r['machine'].get('cpu', '?')}, {r['finished']}"
                  + (f", stopped by {r['stopped_because']}" if r.get("stopped_because") else ""))
        if "concepts" in r and "nmi" in r["concepts"]:
            md[-1] += f"; NMI vs {r['concepts']['label_kind']} {r['concepts']['nmi']:.3f}"
    (results_dir / f"accuracy-{dataset}.md").write_text("\n".join(md) + "\n")
    return jpath


def samples_trained(r: dict) -> str:
    """Training windows seen up to the best epoch (a time budget can cut an epoch short)."""
    hist = r.get("history") or []
    if not hist or "train_seconds" not in hist[0]:
        return "-"
    seen = sum(h["samples_per_s"] * h["train_seconds"] for h in hist[:max(r["best_epoch"], 1)])
    return f"{seen / 1e6:.2f}M"


def extra_sections(rows: dict) -> list[str]:
    """The per-interest, beyond-accuracy and diagnostics tables of the rows that have them."""
    md: list[str] = []
    per = {k: r for k, r in rows.items() if "test_per_interest_percent" in r
           and r.get("model_args", {}).get("K", 1) > 1}
    if per:
        cols = ["HR@50", "NDCG@50", "HR@100", "NDCG@100"]
        md += ["", "Per-interest retrieval (the service's `mode=per_interest`: one search per "
               "interest, merged by best score) against the aggregated vector, same checkpoints, "
               "history excluded:", "",
               "| model | mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for r in per.values():
            for mode, m in (("aggregate", r["test_percent"]),
                            ("per_interest", r["test_per_interest_percent"])):
                md.append(f"| {r['label']} | {mode} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + " |")
    beyond = [(r, mode, m) for r in rows.values() for mode, m in r.get("beyond", {}).items()
              if not (mode == "per_interest" and r.get("model_args", {}).get("K", 1) == 1)]
    if beyond:
        N = LIST_N
        cols = [f"HR@{N}", f"coverage@{N}", f"diversity@{N}", f"labels@{N}", f"novelty@{N}"]
        md += ["", f"Beyond accuracy, the top {N} of every test user (history excluded): HR; "
               "catalog coverage (share of all items in some list, %); diversity (share of pairs "
               "in a list with different labels, %); distinct labels per list; novelty (mean "
               "-log2 of an item's share of training clicks, bits):", "",
               "| model | mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for r, mode, m in beyond:
            cells = ["-" if c not in m                       # a log without item labels
                     else f"{100 * m[c]:.2f}" if c.split("@")[0] in ("HR", "coverage", "diversity")
                     else f"{m[c]:.2f}" for c in cols]
            md.append(f"| {r['label']} | {mode} | " + " | ".join(cells) + " |")
    diag = {k: r for k, r in rows.items() if "diagnostics" in r}
    if diag:
        md += ["", "Interest diagnostics on the test inputs: mean pairwise cosine of a user's K "
               "interests; entropy of the Eq. 7 weights over log K (1 = uniform); effective "
               "number of interests exp(H(e)); mean largest weight; prototypes activated by any "
               "user, and their effective number; NMI between a click's label and the "
               "prototype Eq. 3 assigns it to:", "",
               "| model | cosine | weight entropy | effective K | max weight | prototypes used "
               "| effective prototypes | assignment NMI |", "|---" * 8 + "|"]
        for r in diag.values():
            d = r["diagnostics"]
            cos = "-" if d["interest_cosine"] is None else f"{d['interest_cosine']:.3f}"
            nmi_ = f"{d['assignment_nmi']:.3f}" if "assignment_nmi" in d else "-"
            md.append(f"| {r['label']} | {cos} | {d['weight_entropy']:.3f} | "
                      f"{d['effective_interests']:.2f} | {d['max_weight']:.3f} | "
                      f"{d['prototypes_used']} of {d['L']} | {d['prototypes_effective']:.1f} | {nmi_} |")
    return md


def _setting(text: str) -> tuple[str, object]:
    name, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir", default=os.environ.get("SINE_DATA_DIR"))
    p.add_argument("--variants", default="popularity,sine,k1,lam0,mean",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--loss", default="auto")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="wall-clock budget per variant (default 30)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", help="run folder <variant>-<tag>, so runs on another machine sit beside")
    p.add_argument("--merge-only", action="store_true")
    p.add_argument("--reevaluate", action="store_true",
                   help="add keep-history test metrics to finished runs that still have best.pt")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE",
                   help="a model or interest-term setting for every variant run (K, L, tau, "
                        f"tau_assign, dropout, ..., {', '.join(TRAIN_SETTINGS)})")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue a variant's run from its last.pt; a run with a result.json is kept "
                        "as it is, not trained again")
    args = p.parse_args(argv)
    args.set = dict(args.set or [])
    command = "python -m benchmarks.accuracy " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    ds = None
    if not args.merge_only:
        ds = data.load(args.dataset, args.data_dir, seed=args.seed)
        for name in args.variants.split(","):
            if name not in VARIANTS:
                p.error(f"unknown variant {name!r}")
            r = run_variant(name, ds, args, command)
            print(f"{name}: test {pct(r['test'])} in {r['seconds']:.0f} s", flush=True)
            merge(ds.name, Path(args.runs_dir), Path(args.results_dir))
    if args.reevaluate:
        ds = ds or data.load(args.dataset, args.data_dir, seed=args.seed)
        reevaluate(ds.name, ds, Path(args.runs_dir))
    name = ds.name if ds else args.dataset
    path = merge(name, Path(args.runs_dir), Path(args.results_dir))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
