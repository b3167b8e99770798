"""The bundle's names: its files, the manifest's schema version, `current`, the search modes and
merges, and what a version may be called."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

from .errors import BundleError

SCHEMA_VERSION = 1
FILES = {"encoder": "encoder.onnx", "index": "index.faiss", "item_ids": "item_ids.json",
         "popularity": "popularity.npy"}


# optional: the trained model (config, weights, vocabulary), for `sine train --warm-start`, and
# the items' titles where the data has them ({external id: title}, for the inspector page)
OPTIONAL_FILES = {"model": "model.pt", "titles": "titles.json"}
MANIFEST = "manifest.json"
CURRENT = "current"
REFRESH_REPORT = "refresh.json"      # the last `sine refresh` outcome, beside `current`


# how a bundle is searched: the Eq. 8 user vector, or each interest with its K lists merged
# (`service.merge`). The manifest's `serving` names the default (`sine export` picks it on
# validation); settings, request schemas, the service and the evaluation import these.
Mode = Literal["aggregate", "per_interest"]
Merge = Literal["max", "weighted", "quota"]
MODES: tuple[Mode, ...] = get_args(Mode)
MERGES: tuple[Merge, ...] = get_args(Merge)
AGGREGATE, PER_INTEREST = MODES


class Search(NamedTuple):
    """How one query is searched: the mode, and for `per_interest` the merge (else None)."""
    mode: Mode
    merge: Merge | None = None
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_version(name: str) -> str:
    """`name` if it can name a version folder: letters, digits, `.`, `_` and `-`, starting with a
    letter or digit, at most 128 characters (so never `..`, a path or an empty name)."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
        raise BundleError(f"{name!r} is not a version name (letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit, at most 128 characters).")
    return name


Progress = Callable[[int, int], None]        # (done, total)
