"""The manifest: the fields readers rely on and their types, what each field means, the default
search, and when a bundle was built."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import BundleError
from .names import AGGREGATE, MERGES, MODES, PER_INTEREST, Search, check_version

# what the service and the tools read from a manifest, with the type each must have
MANIFEST_FIELDS: dict[tuple[str, ...], type | tuple[type, ...]] = {
    ("version",): str, ("files",): dict, ("model",): dict, ("model", "D"): int,
    ("model", "n"): int, ("model", "K"): int, ("items",): dict, ("items", "count"): int,
    ("items", "vocab_sha256"): str, ("index",): dict, ("index", "factory"): str,
    ("onnx",): dict}


# every field `make_bundle` writes, with what it means (the reference page on the manifest is
# generated from this and MANIFEST_FIELDS; a test holds it to a built manifest's keys)
MANIFEST_DOC: dict[str, str] = {
    "schema_version": "The bundle format's version; the service refuses any other than its own.",
    "version": "The version's name (a plain path component): build time and vocabulary hash.",
    "created": "When the bundle was built, ISO-8601 UTC (`sine_bundle_age_seconds` counts from it).",
    "git_commit": "The project's commit that built it, or null outside a git checkout.",
    "model": "The encoder's configuration: `arch`, `D`, `n` (input length), `K`, `L` and the "
             "rest of the model's settings, as trained.",
    "model.D": "Embedding width: the encoder's output and the index's dimension.",
    "model.n": "How many recent clicks the encoder reads.",
    "model.K": "Interests per user (1 for SASRec).",
    "dataset": "The training data: name, users, items, interactions, vocabulary hash.",
    "onnx": "The encoder graph: file, opset, input and outputs, the graph kind (`plain` or "
            "`folded`), and the largest difference from PyTorch measured at export.",
    "items": "`count` (items in the vocabulary and the index) and `vocab_sha256` (the hash of "
             "the item id list, compared with the index and the histories).",
    "items.count": "Items in the vocabulary, each one in the index.",
    "items.vocab_sha256": "The hash of the ordered external item ids.",
    "index": "The faiss index: file, `factory` string, metric, `search_params` (applied at "
             "load), the recall gate (`recall`: k, value, floor, queries, every setting tried), "
             "build time and whether a GPU built it.",
    "index.factory": "The faiss factory string the index was built with.",
    "offline_metrics": "HR and NDCG at 10, 50 and 100 on validation and test, history excluded.",
    "serving": "The default search chosen on validation: `mode` (aggregate or per_interest), "
               "`merge`, what it was chosen on, and every candidate's validation metrics.",
    "provenance": "Where the model came from: for a refresh, the newest click it trained on and "
                  "its window.",
    "libraries": "The versions of torch, onnx, onnxruntime, faiss and numpy that built it.",
    "files": "The sha256 of every file of the version; checked at load.",
}


def check_manifest(m: Any, where: Path) -> None:
    """Every field the readers use is present with its type (else a BundleError naming it)."""
    if not isinstance(m, dict):
        raise BundleError(f"{where}: the manifest is not a JSON object.")
    for path, kind in MANIFEST_FIELDS.items():
        v: Any = m
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is None or not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise BundleError(f"{where}: field {'.'.join(path)!r} is missing or not "
                              f"{getattr(kind, '__name__', kind)}.")
    for k in ("D", "n", "K"):
        if m["model"][k] < 1:
            raise BundleError(f"{where}: model.{k} = {m['model'][k]} must be positive.")
    check_version(m["version"])
    read_serving(m, where)


def read_serving(m: dict[str, Any], where: Path | str = "manifest") -> Search:
    """The manifest's default search, checked: merge names one of MERGES for `per_interest`
    and is None for `aggregate`. A manifest without `serving` (built before it existed, or from
    a K = 1 model) is searched by its aggregate."""
    s = m.get("serving")
    if s is None:
        return Search(AGGREGATE)
    mode = s.get("mode") if isinstance(s, dict) else None
    merge = s.get("merge") if isinstance(s, dict) else None
    if mode not in MODES:
        raise BundleError(f"{where}: serving.mode is {mode!r}, not one of {', '.join(MODES)}.")
    if mode == AGGREGATE:
        if merge is not None:
            raise BundleError(f"{where}: serving.merge is {merge!r}, but an aggregate search "
                              "merges nothing (it must be null).")
        return Search(AGGREGATE)
    if merge not in MERGES:
        raise BundleError(f"{where}: serving.merge is {merge!r}; per_interest needs one of "
                          f"{', '.join(MERGES)}.")
    if m["model"]["K"] < 2:
        raise BundleError(f"{where}: serving.mode is per_interest, but the model has K = "
                          f"{m['model']['K']} interest.")
    return Search(PER_INTEREST, merge)


def created_unix(manifest: dict[str, Any]) -> float | None:
    """When a bundle was built (its manifest's ISO-8601 `created`, UTC when no zone is given,
    fractional seconds allowed), or None when it says nothing readable."""
    created = manifest.get("created")
    if not isinstance(created, str):
        return None
    try:
        t = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
