"""`sine fetch-bundle`: a published `<version>.tar.gz` downloaded into a bundle root, checked,
unpacked by this module's own reader and published atomically.

What an archive from an object store can do to the host is bounded here, not by `tarfile`:

- only `https://` URLs are opened (`http://` only when the caller allows it; never `file://`),
  and every redirect is checked the same way, with plain http refused after any https hop (a
  redirect cannot downgrade the transport); URLs in messages have their signatures masked;
- the download goes into the bundle root itself (the volume that holds the bundles, not a
  small `/tmp`), under one total deadline, with a cap on its size and, optionally, the
  expected sha256 of the archive checked before anything is unpacked;
- members are read one by one: only regular files and folders, names of plain path components
  (no absolute path, no `..`, at most one folder level), limits on the member count, on each
  file's size and on the total unpacked size, every file created new (`O_EXCL | O_NOFOLLOW`).
  No link of any kind is accepted and `TarFile.extract*` is never called, so the filter bypasses
  of CVE-2025-4517 and its kin do not apply, whatever the Python;
- the unpacked folder is validated as a bundle (every hash) before it is published.

Every refusal is a `BundleError` naming the URL and the problem (`sine` exits 2).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urlsplit

from service.redact import redact_url

from .bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    Progress,
    check_version,
    discard,
    load,
    publish,
    set_current,
    staging_dir,
)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one archive may hold. The defaults fit a catalog of tens of millions of items."""
    archive_bytes: int = 16 << 30          # the download itself
    total_bytes: int = 32 << 30            # every member, unpacked
    file_bytes: int = 16 << 30             # one member, unpacked
    members: int = 64
    timeout_s: float = 1800.0              # the whole download, connection included
    socket_timeout_s: float = 30.0         # one read or connect (within what is left of the above)


def archive_url(base: str, version: str) -> str:
    """`<base>/<version>.tar.gz`, or `base` with `{version}` filled in; other braces (a signed
    URL's) are left as they are."""
    if "{version}" in base:
        return base.replace("{version}", version)
    return base.rstrip("/") + f"/{version}.tar.gz"


def _check_scheme(url: str, allow_http: bool) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and allow_http):
        return
    if scheme == "http":
        raise BundleError(f"{redact_url(url)}: plain http is refused (the archive could be "
                          "altered on the way); use https, or pass --allow-http on a network "
                          "you trust.")
    raise BundleError(f"{redact_url(url)}: only https:// URLs are fetched (http:// with "
                      f"--allow-http), not {scheme or 'a path'}.")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the first one could have been (`_check_scheme`), and
    never from https to plain http, whatever `allow_http` says."""

    def __init__(self, allow_http: bool):
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = urllib.parse.urljoin(req.full_url, newurl)
        _check_scheme(new, self.allow_http)
        was = [urlsplit(u).scheme.lower() for u in (*getattr(req, "sine_hops", ()), req.full_url)]
        if "https" in was and urlsplit(new).scheme.lower() != "https":
            raise BundleError(f"{redact_url(req.full_url)} redirected to plain http "
                              f"({redact_url(new)}): refused, a redirect may not drop https.")
        out = super().redirect_request(req, fp, code, msg, headers, newurl)
        if out is not None:
            out.sine_hops = (*getattr(req, "sine_hops", ()), req.full_url)  # type: ignore[attr-defined]
        return out


def _open(url: str, timeout: float, allow_http: bool):  # type: ignore[no-untyped-def]
    return urllib.request.build_opener(_CheckedRedirects(allow_http)).open(url, timeout=timeout)


def _download(url: str, into: IO[bytes], limits: Limits, progress: Progress | None,
              allow_http: bool = False) -> str:
    """Stream `url` into `into` within the limits; returns the sha256 of what came."""
    h = hashlib.sha256()
    shown = redact_url(url)
    deadline = time.monotonic() + limits.timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BundleError(f"{shown}: the download took longer than {limits.timeout_s:g} s.")
        return min(remaining, limits.socket_timeout_s)

    try:
        with _open(url, left(), allow_http) as r:
            total = int(r.headers.get("Content-Length") or 0)
            if total > limits.archive_bytes:
                raise BundleError(f"{shown}: the archive has {total} bytes, more than the limit "
                                  f"of {limits.archive_bytes} (--max-archive-bytes).")
            done = 0
            sock = getattr(getattr(getattr(r, "fp", None), "raw", None), "_sock", None)
            while True:
                # one receive at a time, each within what is left of the deadline: a server
                # that trickles cannot hold a read past it
                t = left()
                if sock is not None:
                    sock.settimeout(t)
                chunk = r.read1(CHUNK)
                if not chunk:
                    break
                done += len(chunk)
                if done > limits.archive_bytes:
                    raise BundleError(f"{shown}: the archive is larger than the limit of "
                                      f"{limits.archive_bytes} bytes (--max-archive-bytes).")
                h.update(chunk)
                into.write(chunk)
                if progress and total:
                    progress(done, total)
            if total and done != total:
                raise BundleError(f"{shown}: the download ended after {done} of {total} bytes.")
    except BundleError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        if time.monotonic() >= deadline:     # the last read was cut at the deadline
            raise BundleError(f"{shown}: the download took longer than {limits.timeout_s:g} s."
                              ) from e
        raise BundleError(f"{shown}: download failed ({e}).") from e
    into.flush()
    os.fsync(into.fileno())
    return h.hexdigest()


def _member_path(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    parts = [x for x in p.parts if x != "."]
    if p.is_absolute() or not parts or len(parts) > 2 or any(
            x == ".." or "\\" in x or "\x00" in x for x in parts):
        raise BundleError(f"member {name!r}: not a plain file or folder name of a bundle "
                          "(absolute, '..', or nested deeper than <version>/<file>).")
    return PurePosixPath(*parts)


def _kind(m: tarfile.TarInfo) -> str:
    return {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
            tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "fifo"}.get(m.type, f"member of type {m.type!r}")


MAX_HEADER_PAYLOAD = 64 << 10   # a long name or a pax header: a bundle's need a few hundred bytes


class _BoundedTarInfo(tarfile.TarInfo):
    """`tarfile` reads a long-name (GNU) or pax header's whole payload into memory before any
    member is seen, so its size is checked first: a 2 MiB archive could otherwise announce a
    header of gigabytes."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_PAYLOAD:
            raise BundleError(f"a long-name or pax header of {self.size} bytes, more than "
                              f"{MAX_HEADER_PAYLOAD}: not a bundle archive.")
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def unpack(archive: Path, into: Path, limits: Limits) -> None:
    """Write the regular files and folders of a .tar.gz under `into`, within the limits."""
    members = total = 0
    try:
        with tarfile.open(archive, mode="r:gz", tarinfo=_BoundedTarInfo) as tar:
            for m in tar:                                   # streamed: one header at a time
                members += 1
                if members > limits.members:
                    raise BundleError(f"the archive has more than {limits.members} members "
                                      "(--max-members).")
                rel = _member_path(m.name)
                dest = into / rel
                if m.isdir():
                    dest.mkdir(exist_ok=True)
                    continue
                if not m.isfile():
                    raise BundleError(f"member {m.name!r} is a {_kind(m)}; a bundle archive "
                                      "holds regular files and folders only.")
                if m.size > limits.file_bytes:
                    raise BundleError(f"member {m.name!r} has {m.size} bytes, more than the "
                                      f"limit of {limits.file_bytes} (--max-file-bytes).")
                total += m.size
                if total > limits.total_bytes:
                    raise BundleError(f"the archive unpacks to more than {limits.total_bytes} "
                                      "bytes (--max-unpacked-bytes).")
                dest.parent.mkdir(exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None                      # a regular file
                try:            # new files only: a second member of one name cannot
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644)          # replace the first after it was checked
                except FileExistsError:
                    raise BundleError(f"member {m.name!r} appears twice; a bundle archive "
                                      "holds regular files only, each once.") from None
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise BundleError(f"not a complete, readable .tar.gz ({type(e).__name__}: {e}); the "
                          "download may be truncated.") from e


def _flatten(staging: Path) -> None:
    """An archive of one `<version>/` folder: its files moved up to the staging folder."""
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (staging / MANIFEST).exists():
        inner = entries[0]
        for p in inner.iterdir():
            if not p.is_file() or p.is_symlink():
                raise BundleError(f"{p.name}: a bundle version holds regular files only.")
            p.rename(staging / p.name)
        inner.rmdir()
    for p in staging.iterdir():
        if not p.is_file() or p.is_symlink():
            raise BundleError(f"{p.name}: a bundle version holds regular files only.")


def fetch(base_url: str, version: str, root: Path | str, *, sha256: str | None = None,
          allow_http: bool = False, limits: Limits | None = None,
          progress: Progress | None = None) -> Bundle:
    """Download `<version>.tar.gz` (its files at the top level or under one `<version>/`),
    check it, unpack it beside the live versions, validate it, and only then publish it and
    point `current` at it. A version already present is only re-pointed.

    `tar -C <root> -czf <version>.tar.gz <version>` makes such an archive (`bundle.archive`)."""
    limits = limits or Limits()
    check_version(version)
    root = Path(root)
    if (root / version / MANIFEST).exists():
        b = load(root / version, deep=False)
        set_current(root, version)
        return b
    url = archive_url(base_url, version)
    _check_scheme(url, allow_http)
    shown = redact_url(url)
    if sha256 is not None and (len(sha256) != 64 or not all(c in "0123456789abcdef"
                                                           for c in sha256.lower())):
        raise BundleError(f"--sha256 {sha256!r} is not a hex sha256 (64 characters).")
    staging = staging_dir(root, version)
    download = staging.with_name(staging.name + ".tar.gz")
    try:
        with open(download, "xb") as f:
            got = _download(url, f, limits, progress, allow_http)
        if sha256 is not None and got != sha256.lower():
            raise BundleError(f"{shown}: the archive's sha256 is {got}, not the expected "
                              f"{sha256.lower()}; nothing was unpacked.")
        try:
            unpack(download, staging, limits)
        except BundleError as e:
            raise BundleError(f"{shown}: {e}") from e
        download.unlink()
        _flatten(staging)
        b = load(staging, verify_hashes=True, deep=False, optional=True)
        if b.version != version:
            raise BundleError(f"{shown}: the archive holds version {b.version!r}, not {version!r}.")
        publish(staging, root, version, make_current=True)
    except BaseException:
        discard(staging)
        download.unlink(missing_ok=True)
        raise
    return load(root / version, deep=False)
