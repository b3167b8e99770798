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

This package is the contract between the builders and the service: both import it, it imports
neither (no torch, faiss only when an index is opened). One module a concern: `names`,
`manifest`, `loading`, `publishing`, `report`, `files`, `errors`; every public name is here too.
"""
from __future__ import annotations

from .errors import BundleError, SineError
from .files import atomic_open, git_commit, sha256_file, vocab_sha256, write_atomic
from .loading import Bundle, check_dimensions, load, read_manifest, resolve, set_search_params
from .manifest import MANIFEST_DOC, MANIFEST_FIELDS, check_manifest, created_unix, read_serving
from .names import (
    AGGREGATE,
    CURRENT,
    FILES,
    MANIFEST,
    MERGES,
    MODES,
    OPTIONAL_FILES,
    PER_INTEREST,
    REFRESH_REPORT,
    SCHEMA_VERSION,
    VERSION_RE,
    Merge,
    Mode,
    Progress,
    Search,
    check_version,
)
from .publishing import (
    archive,
    current_version,
    discard,
    prune_versions,
    publish,
    set_current,
    staging_dir,
    sweep_staging,
    versions,
)
from .report import RefreshReport, read_refresh_report, write_refresh_report

__all__ = [
    "SCHEMA_VERSION", "FILES", "OPTIONAL_FILES", "MANIFEST", "CURRENT", "REFRESH_REPORT",
    "MODES", "MERGES", "Mode", "Merge", "AGGREGATE", "PER_INTEREST", "Search",
    "SineError", "BundleError", "VERSION_RE", "check_version",
    "MANIFEST_FIELDS", "MANIFEST_DOC", "check_manifest", "read_serving", "Progress",
    "git_commit", "sha256_file", "vocab_sha256", "atomic_open", "write_atomic", "publish",
    "set_current", "current_version", "staging_dir", "discard", "versions", "prune_versions",
    "sweep_staging", "RefreshReport", "created_unix", "write_refresh_report",
    "read_refresh_report", "Bundle", "resolve", "load", "read_manifest", "check_dimensions", "set_search_params",
    "archive",
]
