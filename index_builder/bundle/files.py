"""Files written whole or not at all, file hashes, the vocabulary hash, and the project's commit."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


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
