"""The artifact bundle: one versioned, self-describing folder the service loads, and nothing else.

    <root>/<version>/encoder.onnx     user encoder (item_ids [B, n] -> interests, user_vector, weights)
    <root>/<version>/index.faiss      item index, ids = internal item ids 1..M
    <root>/<version>/item_ids.json    external id of each internal id ([0] = "<pad>")
    <root>/<version>/popularity.npy   training click counts per internal id (cold-start fallback)
    <root>/<version>/manifest.json    dims, K, L, n, opset, vocabulary hash, faiss factory and search
                                      parameters, measured recall, offline metrics, the default
                                      search mode (`serving`), library versions, sha256 of every file
    <root>/<version>/model.pt         optional: the trained model, to warm-start the next one
    <root>/current                    the live version's name
    <root>/refresh.json               the last `sine refresh` outcome and its gate metrics
    <base url>/<version>.tar.gz       a published version on an object store (`fetch.py`)

Publishing writes the version under a temporary name, fsyncs it, renames it into place, then
replaces `current` by rename: a crash at any point leaves `current` naming a complete version.
`load` is shared by the offline tools and the service: it refuses a bundle with a missing file, a
hash mismatch, an unknown schema version or dimensions that disagree, with a message that says
which. A version name is one plain path component (`check_version`), wherever it comes from:
a flag, a manifest, the `current` pointer or a request. `set_search_params` applies the
manifest's faiss knobs to an opened index; `fetch.py` downloads a published archive.

This module is the contract between the builders and the service: both import it, it imports
neither (no torch, faiss only when an index is opened).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

SCHEMA_VERSION = 1
FILES = {"encoder": "encoder.onnx", "index": "index.faiss", "item_ids": "item_ids.json",
         "popularity": "popularity.npy"}
# optional: the trained model (config, weights, vocabulary), for `sine train --warm-start`
OPTIONAL_FILES = {"model": "model.pt"}
MANIFEST = "manifest.json"
CURRENT = "current"
REFRESH_REPORT = "refresh.json"      # the last `sine refresh` outcome, beside `current`
# how a bundle is searched by default (manifest `serving`, chosen by `sine export` on validation):
# the Eq. 8 user vector, or each interest with its K lists merged (`service.merge`)
MODES = ("aggregate", "per_interest")
MERGES = ("max", "weighted", "quota")


class SineError(Exception):
    """The base of every error a user can act on (bad input, a bad environment): the `sine`
    command prints its message as one line and exits 2. Here because this contract module is the
    one every package may import."""


class BundleError(SineError, RuntimeError):
    """A bundle cannot be used; the message names the bundle, the file and the problem."""


VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_version(name: str) -> str:
    """`name` if it can name a version folder: letters, digits, `.`, `_` and `-`, starting with a
    letter or digit, at most 128 characters (so never `..`, a path or an empty name)."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
        raise BundleError(f"{name!r} is not a version name (letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit, at most 128 characters).")
    return name


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
    default_search(m, where)


def default_search(m: dict[str, Any], where: Path | str = "manifest") -> tuple[str, str | None]:
    """The manifest's default search, (mode, merge): merge names one of MERGES for
    `per_interest` and is None for `aggregate`. A manifest without `serving` (built before
    it existed, or from a K = 1 model) is searched by its aggregate."""
    s = m.get("serving")
    if s is None:
        return "aggregate", None
    mode = s.get("mode") if isinstance(s, dict) else None
    merge = s.get("merge") if isinstance(s, dict) else None
    if mode not in MODES:
        raise BundleError(f"{where}: serving.mode is {mode!r}, not one of {', '.join(MODES)}.")
    if mode == "aggregate":
        if merge is not None:
            raise BundleError(f"{where}: serving.merge is {merge!r}, but an aggregate search "
                              "merges nothing (it must be null).")
        return mode, None
    if merge not in MERGES:
        raise BundleError(f"{where}: serving.merge is {merge!r}; per_interest needs one of "
                          f"{', '.join(MERGES)}.")
    if m["model"]["K"] < 2:
        raise BundleError(f"{where}: serving.mode is per_interest, but the model has K = "
                          f"{m['model']['K']} interest.")
    return mode, merge


Progress = Callable[[int, int], None]        # (done, total)


def git_commit() -> str:
    """The project's commit, for manifests and benchmark rows."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).resolve().parent,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_COMMIT", "unknown")   # a copy of the tree without .git


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocab_sha256(item_ids: list[str]) -> str:
    """Same hash as `model_export.data.Dataset.vocab_sha256`."""
    h = hashlib.sha256()
    for x in item_ids:
        h.update(x.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears at `path` whole or not at all: written under a temporary name in the
    same folder, fsynced, made world-readable, renamed over `path`, and the folder fsynced.
    An exception inside the block leaves `path` as it was and no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                    # mkstemp makes 0600; a service user must read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def publish(staging: Path, root: Path, version: str, make_current: bool = True) -> Path:
    """Move a complete staging folder to `<root>/<version>` and point `current` at it."""
    check_version(version)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise BundleError(f"{final}: version {version!r} already exists; versions are immutable, "
                          "choose another --version.")
    for p in staging.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(staging)
    os.rename(staging, final)
    _fsync_dir(root)
    if make_current:
        set_current(root, version)
    return final


def set_current(root: Path, version: str) -> None:
    check_version(version)
    if not (root / version / MANIFEST).exists():
        raise BundleError(f"{root / version}: no such bundle version (no {MANIFEST}).")
    write_atomic(root / CURRENT, (version + "\n").encode())
    _fsync_dir(root)


def current_version(root: Path) -> str:
    p = root / CURRENT
    if not p.exists():
        raise BundleError(f"{root}: no `{CURRENT}` pointer; publish a bundle with `sine build-index` "
                          "or name a version folder directly.")
    name = p.read_text().strip()
    try:
        return check_version(name)
    except BundleError as e:
        raise BundleError(f"{p}: {e}") from None


def staging_dir(root: Path, version: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=root, prefix=f".staging-{version}-"))
    d.chmod(0o755)                              # mkdtemp makes 0700
    return d


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def versions(root: Path) -> list[Path]:
    """The published versions under a root, oldest first (by their manifest's mtime)."""
    found = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")
             and VERSION_RE.fullmatch(p.name) and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))


def prune_versions(root: Path, keep: int, protect: set[str] | frozenset[str] = frozenset()
                   ) -> list[str]:
    """Delete all but the newest `keep` versions (0: keep all), never `current` nor those in
    `protect`; returns the names deleted. A pod serving a deleted version keeps its open files."""
    if keep <= 0:
        return []
    try:
        live = {current_version(Path(root))}
    except BundleError:
        live = set()
    old = [p for p in versions(root)[:-keep] if p.name not in live | set(protect)]
    for p in old:
        shutil.rmtree(p)
    if old:
        _fsync_dir(Path(root))
    return [p.name for p in old]


def sweep_staging(root: Path, older_than_s: float) -> list[str]:
    """Delete the staging folders and downloads that builds or fetches killed midway left
    (`.staging-*`, untouched for `older_than_s`); returns their names."""
    now, gone = time.time(), []
    for p in Path(root).glob(".staging-*"):
        if now - p.stat().st_mtime > older_than_s:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


@dataclass
class RefreshReport:
    """`<root>/refresh.json`: what the last `sine refresh` did (written by the refresh job, read
    by the service for /metrics and by the next refresh). `outcome` is published, refused or
    nothing_new; `gate["metrics"]` maps candidate and live to {metric: value}."""
    outcome: str
    version: str | None = None
    live: str | None = None
    clicks: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    stages_s: dict[str, float] = field(default_factory=dict)
    retention: dict[str, Any] = field(default_factory=dict)
    finished: str = ""
    finished_unix: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefreshReport:
        """The report, each field of another shape than its own recorded as unknown (its
        default): a report written by another version never fails whoever reads it."""
        out = cls(outcome=str(d.get("outcome")))
        for f in fields(cls):
            v = d.get(f.name)
            if f.name == "outcome" or v is None:
                continue
            default = getattr(out, f.name)
            if isinstance(default, dict) and isinstance(v, dict):
                setattr(out, f.name, v)
            elif isinstance(default, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(out, f.name, float(v))
            elif (isinstance(default, str) or default is None) and isinstance(v, (str, int)):
                setattr(out, f.name, str(v))
        gate = out.gate.get("metrics")
        if not (isinstance(gate, dict) and all(isinstance(m, dict) for m in gate.values())):
            out.gate = {k: v for k, v in out.gate.items() if k != "metrics"}
        return out


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


def write_refresh_report(root: Path, report: RefreshReport) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(root) / REFRESH_REPORT, json.dumps(asdict(report), indent=1).encode())


def read_refresh_report(root: Path) -> RefreshReport | None:
    """The last refresh's report, or None (absent or unreadable)."""
    try:
        d = json.loads((Path(root) / REFRESH_REPORT).read_text())
        return RefreshReport.from_dict(d) if isinstance(d, dict) and "outcome" in d else None
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class Bundle:
    """One validated bundle version: its folder and its manifest. Its id map and popularity are
    read once (by the validation `load` does) and kept: a bundle's files never change."""
    path: Path
    manifest: dict[str, Any]
    _read: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def file(self, key: str) -> Path:
        return self.path / (FILES.get(key) or OPTIONAL_FILES[key])

    def item_ids(self) -> list[str]:
        if "item_ids" not in self._read:
            self._read["item_ids"] = json.loads(self.file("item_ids").read_text())
        ids: list[str] = self._read["item_ids"]
        return ids

    def popularity(self) -> np.ndarray:
        if "popularity" not in self._read:
            self._read["popularity"] = np.load(self.file("popularity"))
        pop: np.ndarray = self._read["popularity"]
        return pop

    @property
    def default_search(self) -> tuple[str, str | None]:
        """(mode, merge) a request that names neither is answered with (manifest `serving`)."""
        return default_search(self.manifest)

    def has(self, key: str) -> bool:
        return key in OPTIONAL_FILES and OPTIONAL_FILES[key] in self.manifest["files"]

    def read_index(self, mmap: bool = False) -> Any:
        """The faiss index; `mmap`: mapped read-only where its type allows (the codes of flat,
        scalar-quantizer and IVF indexes stay in the page cache, shared by every process that
        maps the file), else read into memory. A bundle file is never rewritten in place."""
        import faiss
        path = str(self.file("index"))
        if mmap:
            try:
                return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                pass
        return faiss.read_index(path)


def resolve(path: Path | str) -> Path:
    """A bundle folder, or a root with a `current` pointer."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / CURRENT).exists():
        return path / current_version(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle or bundle root.")
    raise BundleError(f"{path}: neither a bundle (no {MANIFEST}) nor a bundle root (no {CURRENT}).")


def load(path: Path | str, verify_hashes: bool = True, deep: bool = True,
         optional: bool | None = None) -> Bundle:
    """Open and validate a bundle. `deep` opens the index and the encoder to check dimensions;
    `optional` (default: as `deep`) also checks the optional files the manifest lists (the
    service skips them: it never reads model.pt)."""
    d = resolve(path)
    mpath = d / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{d}: {MANIFEST} is missing; this is not a complete bundle.")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}).") from e
    if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
        got = m.get("schema_version") if isinstance(m, dict) else None
        raise BundleError(f"{mpath}: schema version {got!r} is not supported "
                          f"(this code reads {SCHEMA_VERSION}); rebuild the bundle with this version.")
    check_manifest(m, mpath)
    extra = [n for n in OPTIONAL_FILES.values() if n in m["files"]]
    for name in [*FILES.values(), *(extra if (deep if optional is None else optional) else [])]:
        p = d / name
        if not p.exists():
            raise BundleError(f"{d}: file {name} is missing.")
        want = m["files"].get(name)
        if want is None:
            raise BundleError(f"{mpath}: no sha256 recorded for {name}.")
        if verify_hashes:
            got = sha256_file(p)
            if got != want:
                raise BundleError(f"{p}: sha256 {got[:12]}... does not match the manifest's "
                                  f"{want[:12]}...: the file is corrupt or was replaced.")
    b = Bundle(d, m)
    try:
        ids = b.item_ids()
        pop = b.popularity()
    except (OSError, ValueError) as e:       # not JSON, not an .npy (pickles are never loaded)
        raise BundleError(f"{d}: item_ids.json or popularity.npy is unreadable ({e}).") from e
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise BundleError(f"{b.file('item_ids')}: not a JSON list of item id strings.")
    if len(ids) - 1 != m["items"]["count"] or vocab_sha256(ids) != m["items"]["vocab_sha256"]:
        raise BundleError(f"{b.file('item_ids')}: {len(ids) - 1} items / vocabulary hash differ from "
                          f"the manifest ({m['items']['count']} items).")
    if pop.shape != (len(ids),):
        raise BundleError(f"{b.file('popularity')}: shape {pop.shape}, expected ({len(ids)},).")
    if deep:
        check_dimensions(b)
    return b


def check_dimensions(b: Bundle, index: Any = None, session: Any = None) -> None:
    """Encoder output dim == index dim == manifest D; index holds every item; seq len agrees.

    `index` and `session` are the caller's already opened faiss index and ONNX Runtime session;
    the ones missing are opened here (on CPU)."""
    D, n, K = b.manifest["model"]["D"], b.manifest["model"]["n"], b.manifest["model"]["K"]
    index = index if index is not None else b.read_index()
    if index.d != D:
        raise BundleError(f"{b.path}: the index has dimension {index.d} but the encoder's user "
                          f"vector has {D}.")
    if index.ntotal != b.manifest["items"]["count"]:
        raise BundleError(f"{b.path}: the index holds {index.ntotal} items, the manifest "
                          f"{b.manifest['items']['count']}.")
    sess = session if session is not None else _cpu_session(b.file("encoder"))
    inp = sess.get_inputs()[0]
    outs = {o.name: o.shape for o in sess.get_outputs()}
    if inp.shape[1] != n:
        raise BundleError(f"{b.file('encoder')}: input length {inp.shape[1]}, manifest n = {n}.")
    if outs.get("user_vector", [None, None])[-1] != D or outs.get("interests", [None] * 3)[1:] != [K, D]:
        raise BundleError(f"{b.file('encoder')}: outputs {outs} do not match D = {D}, K = {K}.")


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def set_search_params(index: Any, params: dict[str, int]) -> None:
    """Apply faiss search knobs (`nprobe`, `efSearch`, ...) as the manifest records them.

    faiss raises RuntimeError with its own text for a knob the index does not have."""
    import faiss

    ps = faiss.ParameterSpace()
    for k, v in params.items():
        ps.set_index_parameter(index, k, v)


def archive(root: Path, version: str, out_dir: Path) -> Path:
    """Write `<out_dir>/<version>.tar.gz` of a published version (what `fetch` reads), under a
    temporary name first: a reader never sees half an archive."""
    src = Path(root) / version
    if not (src / MANIFEST).exists():
        raise BundleError(f"{src}: no such bundle version (no {MANIFEST}).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{version}.tar.gz"
    with atomic_open(final) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        tar.add(src, arcname=version)
    return final
