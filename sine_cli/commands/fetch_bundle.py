"""`sine fetch-bundle`: a published bundle version downloaded into a bundle root, checked."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import progress_bar


def add(sub: Any) -> None:
    from index_builder.fetch import Limits  # its defaults, not restated here

    lim = Limits()
    f = sub.add_parser("fetch-bundle", help="download a bundle version into a bundle root",
                       description="Download <url>/<version>.tar.gz (or a URL with {version} in "
                       "it) into the bundle root, check its size and optional sha256, unpack its "
                       "regular files (no links, within the limits below), validate every hash "
                       "and publish it atomically under <bundle-root>/<version>, pointing "
                       "`current` at it. A version already present is only re-pointed.")
    f.add_argument("--url", required=True, help="https:// base URL of the published bundles")
    f.add_argument("--version", required=True, help="bundle version to fetch")
    f.add_argument("--bundle-root", required=True, help="local bundle root")
    f.add_argument("--sha256", help="expected sha256 of the archive, checked before unpacking")
    f.add_argument("--allow-http", action="store_true",
                   help="accept a plain http:// URL (only on a network you trust)")
    f.add_argument("--timeout-s", type=float, default=lim.timeout_s,
                   help=f"deadline of the whole download (default {lim.timeout_s:g})")
    f.add_argument("--max-archive-bytes", type=int, default=lim.archive_bytes,
                   help=f"largest archive downloaded (default {lim.archive_bytes})")
    f.add_argument("--max-unpacked-bytes", type=int, default=lim.total_bytes,
                   help=f"largest total of its files unpacked (default {lim.total_bytes})")
    f.add_argument("--max-file-bytes", type=int, default=lim.file_bytes,
                   help=f"largest single file (default {lim.file_bytes})")
    f.add_argument("--max-members", type=int, default=lim.members,
                   help=f"most members of the archive (default {lim.members})")
    f.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from index_builder.fetch import Limits, fetch

    limits = Limits(archive_bytes=a.max_archive_bytes, total_bytes=a.max_unpacked_bytes,
                    file_bytes=a.max_file_bytes, members=a.max_members, timeout_s=a.timeout_s)
    b = fetch(a.url, a.version, Path(a.bundle_root), sha256=a.sha256, allow_http=a.allow_http,
              limits=limits, progress=progress_bar("downloading", "B"))
    print(f"bundle {b.version} ready in {b.path}; {Path(a.bundle_root) / 'current'} names it")
    return 0
