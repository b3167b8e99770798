"""Fetch a published bundle version from an object store (any HTTP(S) URL) into a bundle root.

The archive is `<version>.tar.gz` holding the bundle's files, at the top level or under a
`<version>/` folder (`tar -C <root> -czf <version>.tar.gz <version>` makes one). It is
downloaded and unpacked beside the root, validated (hashes, schema, vocabulary), and only then
renamed into place; `current` moves last. Used by the Helm chart's init container.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from . import bundle


def archive_url(base: str, version: str) -> str:
    if "{version}" in base:
        return base.format(version=version)
    return base.rstrip("/") + f"/{version}.tar.gz"


def fetch(base_url: str, version: str, root: Path, timeout_s: float = 60.0,
          progress=None) -> bundle.Bundle:
    root = Path(root)
    if (root / version / bundle.MANIFEST).exists():
        b = bundle.load(root / version, deep=False)
        bundle.set_current(root, version)
        return b
    url = archive_url(base_url, version)
    staging = bundle.staging_dir(root, version)
    try:
        with tempfile.TemporaryFile() as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as r:
                    total = int(r.headers.get("Content-Length") or 0)
                    done = 0
                    while chunk := r.read(1 << 20):
                        tmp.write(chunk)
                        done += len(chunk)
                        if progress and total:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise bundle.BundleError(f"{url}: download failed ({e}).") from e
            tmp.seek(0)
            try:
                with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                    tar.extractall(staging, filter="data")   # no absolute paths, links or devices
            except (tarfile.TarError, OSError) as e:
                raise bundle.BundleError(f"{url}: not a readable .tar.gz ({e}).") from e
        entries = list(staging.iterdir())
        if len(entries) == 1 and entries[0].is_dir() and not (staging / bundle.MANIFEST).exists():
            inner = entries[0]                  # the archive holds one <version>/ folder
            for p in inner.iterdir():
                p.rename(staging / p.name)
            inner.rmdir()
        b = bundle.load(staging, verify_hashes=True, deep=False)
        if b.version != version:
            raise bundle.BundleError(f"{url}: the archive holds version {b.version!r}, "
                                     f"not {version!r}.")
        bundle.publish(staging, root, version, make_current=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return bundle.load(root / version, deep=False)
