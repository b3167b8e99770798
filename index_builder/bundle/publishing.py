"""Versions under a root: published by rename, `current` moved atomically, old versions pruned,
killed builds swept, archives for `sine fetch-bundle`."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import BundleError
from .files import _fsync_dir, atomic_open, write_atomic
from .names import CURRENT, MANIFEST, VERSION_RE, check_version


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
