"""Export a trained SINE checkpoint: the user encoder to ONNX, the item table, ids and popularity.

The ONNX graph takes `item_ids` int64 [B, n] (most recent click first, 0 = padding at the end;
the convention of `model_export.data.window`, which the service's `Engine.windows` follows) and returns
`interests` [B, K, D], `user_vector` [B, D] and `weights` [B, K]. Only the batch axis is dynamic;
all weights live inside the one file.

SASRec checkpoints (`model_export.models.sasrec`) export the same way, with K = 1, as the plain graph.
The graph of a SINE is `FoldedSINE` (per-item tables of the item-side products, gathered per user) where
its tables fit `fold_budget_mb`, else the plain `SINE`; `graph` forces one. Either way it is
checked against the trained PyTorch model, and the manifest records which graph it is and what its
tables cost per item. The check's random histories leave out those whose top-K prototypes are a
near-tie (`ambiguous_rows`): there float32 rounding may pick or order other interests in ORT than
in torch, both correct, and a strict comparison would fail a sound export by chance.

The export folder also gets the item table (float32 [M, D], row j = internal id j + 1), the
external id of each internal id, the training popularity (the service's cold-start fallback),
and a sample of real user vectors from validation histories: the queries `sine build-index`
measures recall with.

`serving` (`choose_serving`) is the search a request that names no mode gets: for a SINE with
K > 1, the aggregate and each per-interest merge are scored on the validation split (HR@50, the
service's own merge code) and the best is kept; the aggregate wins ties, and is the only choice
for K = 1. The test split never takes part in the choice.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from index_builder.bundle import AGGREGATE, MERGES, PER_INTEREST, SineError

from .configs import SERVINGS
from .data import Split
from .models.sasrec import SASRec
from .models.sine import SINE, FoldedSINE

Encoder = SINE | SASRec

OPSET = 18
INPUT = "item_ids"
OUTPUTS = ("interests", "user_vector", "weights")


class ExportError(SineError, RuntimeError):
    """The exported graph does not reproduce the trained model; nothing is kept."""


SERVING_METRIC = "HR@50"


def choose_serving(model: Encoder, ds, sp: Split, serving: str = "auto",
                   valid_aggregate: dict[str, float] | None = None) -> dict:
    """The manifest's `serving` entry: {mode, merge, chosen_on, valid: {candidate: metrics}}.

    `auto` scores every candidate on validation and keeps the best by SERVING_METRIC (strictly
    better than the aggregate, else the aggregate); `aggregate` or a merge name fixes it."""
    from .evaluation.evaluate import evaluate_merge, evaluate_model

    if serving not in SERVINGS:
        raise ValueError(f"serving must be one of {', '.join(SERVINGS)}, not {serving!r}")
    K = model.config.K if isinstance(model, SINE) else 1
    if serving in MERGES and K < 2:
        raise ValueError(f"serving {serving!r} searches per interest; this model has K = {K}")
    valid: dict[str, dict[str, float]] = {
        AGGREGATE: valid_aggregate or evaluate_model(model, ds, sp, "valid")}
    for how in (MERGES if serving == "auto" and K > 1 else (serving,) if serving in MERGES else ()):
        valid[f"{PER_INTEREST}/{how}"] = evaluate_merge(model, ds, sp, how, "valid")
    if serving == "auto":
        best = max(valid, key=lambda c: (valid[c][SERVING_METRIC], c == AGGREGATE))
    else:
        best = AGGREGATE if serving == AGGREGATE else f"{PER_INTEREST}/{serving}"
    mode, _, merge = best.partition("/")
    return {"mode": mode, "merge": merge or None,
            "chosen_on": f"valid {SERVING_METRIC}" if serving == "auto" else "fixed at export",
            "valid": valid}


GRAPHS = ("auto", "folded", "plain")
FOLD_BUDGET_MB = 1024.0


def choose_graph(model: torch.nn.Module, graph: str = "auto", fold_budget_mb: float = FOLD_BUDGET_MB) -> str:
    """`folded` where the tables fit the budget (or when asked for), else `plain`."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, not {graph!r}")
    # SASRec, and a SINE on a backbone, have no item-side tables to fold
    if not isinstance(model, SINE) or model.config.blocks:
        if graph == "folded":
            what = "a SINE on a self-attention backbone" if isinstance(model, SINE) else \
                f"a {type(model).__name__}"
            raise ValueError(f"graph 'folded' is for SINE on item embeddings; {what} exports plain")
        return "plain"
    if graph != "auto":
        return graph
    table = (model.config.n_items + 1) * FoldedSINE.table_bytes_per_item(model.config)
    return "folded" if table <= fold_budget_mb * 2**20 else "plain"


def export_onnx(model: Encoder | FoldedSINE, path: Path, opset: int = OPSET) -> Path:
    """Trace the encoder into one self-contained ONNX file with a dynamic batch axis."""
    model = model.eval()
    n = model.config.n
    example = torch.zeros(2, n, dtype=torch.long)
    example[:, 0] = 1
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    # the exporter logs that torchvision ops are skipped and warns about pytree internals
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT],
                                 output_names=list(OUTPUTS), opset_version=opset,
                                 dynamic_shapes={"item_ids": {0: batch}}, verbose=False)
    assert prog is not None                      # the dynamo exporter returns its program
    prog.save(str(path), external_data=False)
    return path


def item_table(model: Encoder) -> np.ndarray:
    return model.item_table().detach().cpu().numpy().astype(np.float32)   # [M, D]


@torch.no_grad()
def validation_queries(model: Encoder, sp: Split, max_users: int = 2000, seed: int = 0) -> np.ndarray:
    """User vectors [q, D] from the validation histories of up to `max_users` random users."""
    U = len(sp.valid_targets)
    rows = np.sort(np.random.default_rng(seed).choice(U, size=min(max_users, U), replace=False))
    _, v, _ = model.eval()(torch.from_numpy(sp.valid_inputs[rows]))
    return v.numpy().astype(np.float32)


TIE_TOL = 1e-5          # relative: keys closer than this may order differently in ORT and torch


def ambiguous_rows(model: Encoder, x: torch.Tensor, tol: float = TIE_TOL) -> torch.Tensor:
    """bool [B]: rows of `x` whose K activated prototypes are not fixed by float32 (two of the
    top K + 1 activation keys within `tol` of the row's largest key), so that ORT and torch may
    both be right yet pick or order different interests. All False for a model without a top-K."""
    if not isinstance(model, SINE):
        return torch.zeros(len(x), dtype=torch.bool)
    key = model.activation_keys(x)                                     # [B, L]
    K1 = min(model.config.K + 1, key.shape[1])
    top = torch.topk(key, K1, dim=1).values                            # [B, K + 1], descending
    gap = (top[:, :-1] - top[:, 1:]).min(1).values                     # [B]
    return gap <= tol * top.abs().max(1).values.clamp_min(1.0)


def probe_histories(model: Encoder, B: int, generator: torch.Generator) -> torch.Tensor:
    """[B, n] random padded histories, the first of length 1, none `ambiguous_rows` (while
    enough clear ones turn up in a few draws: a model whose keys all tie keeps its ties)."""
    n, M = model.config.n, model.config.n_items
    clear, tied = torch.zeros(0, n, dtype=torch.long), torch.zeros(0, n, dtype=torch.long)
    for _ in range(8):
        x = torch.randint(1, M + 1, (2 * B + 8, n), generator=generator)  # [2B + 8, n]
        lengths = torch.randint(1, n + 1, (len(x),), generator=generator)
        lengths[:8] = 1
        x = x.masked_fill(torch.arange(n)[None] >= lengths[:, None], 0)
        amb = ambiguous_rows(model, x)                                 # [2B + 8]
        clear, tied = torch.cat([clear, x[~amb]]), torch.cat([tied, x[amb]])
        if len(clear) >= B and bool(((clear > 0).sum(1) == 1).any()):
            break
    rows = torch.cat([clear, tied])                                    # clear ones first
    first = int(((rows > 0).sum(1) == 1).nonzero()[0])                 # a length-1 row
    return torch.cat([rows[first:first + 1], rows[:first], rows[first + 1:]])[:B]   # [B, n]


def check_parity(model: Encoder, onnx_path: Path, batch_sizes=(1, 7, 256), seed: int = 0) -> dict:
    """Max |ORT - torch| per output on random padded batches (with a length-1 row; see
    `probe_histories`); `model` is the trained (unfolded) reference."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(OUTPUTS, 0.0)
    for B in batch_sizes:
        x = probe_histories(model, B, g)                               # [B, n]
        with torch.no_grad():
            ref = model(x)
        got = sess.run(list(OUTPUTS), {INPUT: x.numpy()})
        for k, r, o in zip(OUTPUTS, ref, got):
            worst[k] = max(worst[k], float(np.abs(r.numpy() - o).max()))
    return worst


PARITY_TOL = {"interests": 1e-5, "user_vector": 1e-3, "weights": 1e-4}


def library_versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "faiss-cpu",
                "faiss-gpu", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def export(ck_path: Path, ds, out_dir: Path, opset: int = OPSET, n_queries: int = 2000,
           graph: str = "auto", fold_budget_mb: float = FOLD_BUDGET_MB, serving: str = "auto",
           provenance: dict | None = None, log=print) -> dict:
    """Write encoder.onnx, items.npy, item_ids.json, popularity.npy, queries.npy, model.pt
    (weights, config and vocabulary, for a warm start), titles.json (where the data set has
    titles) and export.json (with `serving`, as
    `choose_serving` picks it)."""
    from .data import split
    from .evaluation.evaluate import evaluate_model
    from .training import atomic_save, atomic_write_text, load_checkpoint, model_from_checkpoint

    if serving not in SERVINGS:              # before the minutes of tracing and checking
        raise ValueError(f"serving must be one of {', '.join(SERVINGS)}, not {serving!r}")
    ck = load_checkpoint(ck_path, ds)
    model = model_from_checkpoint(ck)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = choose_graph(model, graph, fold_budget_mb)
    encoder = FoldedSINE(model) if chosen == "folded" and isinstance(model, SINE) else model
    onnx_path = export_onnx(encoder, out_dir / "encoder.onnx", opset)
    parity = check_parity(model, onnx_path)
    bad = {k: v for k, v in parity.items() if v > PARITY_TOL[k]}
    if bad:
        onnx_path.unlink()
        raise ExportError(f"ONNX and PyTorch disagree beyond tolerance {PARITY_TOL}: {bad}; "
                          "the export was not kept.")
    sp = split(ds, model.config.n)
    np.save(out_dir / "items.npy", item_table(model))
    np.save(out_dir / "popularity.npy", sp.train_counts)
    np.save(out_dir / "queries.npy", validation_queries(model, sp, n_queries))
    atomic_write_text(json.dumps(ds.item_ids), out_dir / "item_ids.json")
    # the items' titles where the data has them (the inspector page shows them)
    titles = {ds.item_ids[i]: t for i, t in sorted(ds.titles.items()) if 0 < i <= ds.n_items}
    if titles:
        atomic_write_text(json.dumps(titles), out_dir / "titles.json")
    else:
        (out_dir / "titles.json").unlink(missing_ok=True)
    # the model itself, so that the next training can start from the published bundle
    atomic_save({"format": ck["format"], "model_args": ck["model_args"], "model": ck["model"],
                 "item_ids": ck["item_ids"], "dataset": ck["dataset"]}, out_dir / "model.pt")
    metrics = {w: evaluate_model(model, ds, sp, w) for w in ("valid", "test")}
    chosen_search = choose_serving(model, ds, sp, serving, valid_aggregate=metrics["valid"])
    info = {"model": ck["model_args"], "dataset": ck["dataset"],
            "onnx": {"file": "encoder.onnx", "opset": opset, "input": INPUT, "outputs": list(OUTPUTS),
                     "input_layout": "[B, n] int64, most recent click first, 0 = padding at the end",
                     "parity_max_abs_diff": parity, "graph": chosen,
                     "table_bytes_per_item": FoldedSINE.table_bytes_per_item(encoder.config)
                     if isinstance(encoder, FoldedSINE) else 0,
                     "fold_budget_mb": fold_budget_mb},
            "items": {"count": ds.n_items, "vocab_sha256": ds.vocab_sha256()},
            "offline_metrics": metrics, "serving": chosen_search,
            "checkpoint": {"best_epoch": ck["best_epoch"], "train_args": ck["train_args"]},
            "libraries": library_versions(), "provenance": provenance or {}}
    atomic_write_text(json.dumps(info, indent=1), out_dir / "export.json")
    how = chosen_search["mode"] + (f" ({chosen_search['merge']})" if chosen_search["merge"] else "")
    log(f"exported to {out_dir}: {chosen} graph, opset {opset}, parity {parity}; serves {how} "
        f"by default ({chosen_search['chosen_on']})")
    return info
