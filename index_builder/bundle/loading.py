"""One bundle opened and validated: the `Bundle` record, `resolve` (a folder or a root's
`current`), `load`, the dimension checks, and the index's search knobs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError
from .files import sha256_file, vocab_sha256
from .manifest import check_manifest, read_serving
from .names import CURRENT, FILES, MANIFEST, OPTIONAL_FILES, SCHEMA_VERSION, Search
from .publishing import current_version


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

    def titles(self) -> dict[str, str]:
        """{external id: title} where the bundle carries titles, else {}. Read once, on first
        use, and checked against the manifest's hash (a mismatch reads as no titles: they are
        for people, never for the answers)."""
        if "titles" not in self._read:
            got: dict[str, str] = {}
            want = self.manifest["files"].get(OPTIONAL_FILES["titles"])
            path = self.file("titles")
            if want is not None and path.exists() and sha256_file(path) == want:
                try:
                    raw = json.loads(path.read_text())
                    got = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
                except (OSError, ValueError):
                    got = {}
            self._read["titles"] = got
        titles: dict[str, str] = self._read["titles"]
        return titles

    @property
    def serving(self) -> Search:
        """The search the manifest names for requests that name none (`serving`)."""
        return read_serving(self.manifest)

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
    m = read_manifest(d)
    extra = [n for n in OPTIONAL_FILES.values() if n in m["files"]]
    checked = [*FILES.values(), *(extra if (deep if optional is None else optional) else [])]
    for name in checked:
        _check_file(d, m, name, verify_hashes)
    b = Bundle(d, m)
    _check_vocabulary(b)
    if deep:
        check_dimensions(b)
    return b


def read_manifest(d: Path) -> dict[str, Any]:
    """A bundle folder's manifest, of this schema version and with every field readers use."""
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
    return m


# sha256 by (device, inode, size, mtime): a bundle's files are written once and replaced only by
# a new file (a new inode), so a process hashes each file once however often it loads the bundle
# (`sine serve`'s check, then the app's engine, then every reload of the same version)
_HASHED: dict[tuple[int, int, int, int], str] = {}


def hashed(p: Path) -> str:
    st = p.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(p)
    return _HASHED[key]


def _check_file(d: Path, m: dict[str, Any], name: str, verify_hash: bool) -> None:
    """The file is there, the manifest records its sha256, and (`verify_hash`) they agree."""
    p = d / name
    if not p.exists():
        raise BundleError(f"{d}: file {name} is missing.")
    want = m["files"].get(name)
    if want is None:
        raise BundleError(f"{d / MANIFEST}: no sha256 recorded for {name}.")
    if verify_hash:
        got = hashed(p)
        if got != want:
            raise BundleError(f"{p}: sha256 {got[:12]}... does not match the manifest's "
                              f"{want[:12]}...: the file is corrupt or was replaced.")


def _check_vocabulary(b: Bundle) -> None:
    """The id map is a list of strings of the manifest's count and hash; popularity has a count
    per id. Both stay read in `b`."""
    try:
        ids = b.item_ids()
        pop = b.popularity()
    except (OSError, ValueError) as e:       # not JSON, not an .npy (pickles are never loaded)
        raise BundleError(f"{b.path}: item_ids.json or popularity.npy is unreadable ({e}).") from e
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise BundleError(f"{b.file('item_ids')}: not a JSON list of item id strings.")
    items = b.manifest["items"]
    if len(ids) - 1 != items["count"] or vocab_sha256(ids) != items["vocab_sha256"]:
        raise BundleError(f"{b.file('item_ids')}: {len(ids) - 1} items / vocabulary hash differ from "
                          f"the manifest ({items['count']} items).")
    if pop.shape != (len(ids),):
        raise BundleError(f"{b.file('popularity')}: shape {pop.shape}, expected ({len(ids)},).")


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
