"""Click-sequence data sets, the leave-one-out split and training samples.

Every loader returns the same `Dataset`: one chronological item sequence per user in *internal*
ids (contiguous, 1..M, 0 reserved for padding; ordered by descending training popularity, ties by
external id, so a log-uniform proposal over ids is a popularity proposal), plus the external-id
maps and optional item metadata (titles, genres or categories).

Split (paper §4.1, following SASRec): per user the last item is the test target, the
second-to-last the validation target, the rest is training. Every training position t >= 1
predicts item t from the (up to) `seq_len` items before it.

Encoder input convention, shared with the exported model and the service: a window is
`[B, seq_len]` int64, **most recent item first**, padding (0) at the end. Slot 0 is always the
latest click whatever the history length, so positional embeddings encode recency, and a Redis
list kept with LPUSH + LTRIM reads out in exactly this order.

No torch here: the service's bulk history loader reuses these loaders.
"""
from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index_builder.bundle import vocab_sha256

DATASETS = ("ml-1m", "amazon-beauty", "ml-100k", "synthetic", "synthetic-mix")


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the line and what to do."""


@dataclass
class Dataset:
    name: str
    sequences: list[np.ndarray]            # per user, internal ids, oldest first
    user_ids: list[str]                    # external user id per sequence
    item_ids: list[str]                    # external id of internal id i at [i]; [0] = "<pad>"
    titles: dict[int, str] = field(default_factory=dict)     # internal id -> title
    labels: dict[int, str] = field(default_factory=dict)     # internal id -> genre / category
    label_kind: str = ""                                     # "genre", "category", "planted"
    user_labels: list[list[str]] = field(default_factory=list)   # synthetic: planted interests per user

    @property
    def n_items(self) -> int:
        """M: real items, excluding padding."""
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id."""
        return {x: i for i, x in enumerate(self.item_ids)}

    def vocab_sha256(self) -> str:
        """Hash of the internal->external item map: artifacts built on another vocabulary differ."""
        return vocab_sha256(self.item_ids)

    def summary(self) -> str:
        lens = np.array([len(s) for s in self.sequences])
        return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
                f"{self.n_interactions:,} interactions, length min {lens.min()} "
                f"median {int(np.median(lens))} max {lens.max()}")


# ---------------------------------------------------------------------------------------------
# building a Dataset from external-id sequences

def vocab_rank(item: str, count: int) -> tuple:
    """Where an item goes in the vocabulary: most training clicks first, then numeric ids in
    numeric order, then the rest by text."""
    return (-count, int(item) if item.isdigit() else float("inf"), item)


def _from_external(name: str, users: list[str], seqs: list[list[str]], origin: dict[str, str],
                   min_len: int, drop_short: bool) -> Dataset:
    """Remap external ids to internal ones; `origin` maps a user to 'file:line' for errors."""
    if not seqs:
        raise DataError(f"{name}: the data set is empty (no user has any interaction). "
                        "Check the path and the file format.")
    keep_u, keep_s = [], []
    for u, s in zip(users, seqs):
        if len(s) < min_len:
            if drop_short:
                continue
            raise DataError(
                f"{origin.get(u, name)}: user {u!r} has {len(s)} interaction(s); the leave-one-out "
                f"split needs at least {min_len} (training, validation and test items). "
                "Pass --drop-short-users to skip such users.")
        keep_u.append(u)
        keep_s.append(s)
    if not keep_s:
        raise DataError(f"{name}: no user has {min_len} or more interactions; nothing to train on.")
    # popularity over the training part only (the last two items are held out)
    counts: dict[str, int] = {}
    for s in keep_s:
        for x in s[:-2]:
            counts[x] = counts.get(x, 0) + 1
        for x in s[-2:]:
            counts.setdefault(x, 0)

    vocab = ["<pad>"] + sorted(counts, key=lambda x: vocab_rank(x, counts[x]))
    index = {x: i for i, x in enumerate(vocab)}
    seq_arr = [np.fromiter((index[x] for x in s), dtype=np.int64, count=len(s)) for s in keep_s]
    return Dataset(name=name, sequences=seq_arr, user_ids=keep_u, item_ids=vocab)


def _open_text(path: Path, encoding: str = "utf-8"):
    if not path.exists():
        raise DataError(f"{path}: file not found. Set --data-dir (or SINE_DATA_DIR) to the folder "
                        "holding the data sets.")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding)
    return open(path, encoding=encoding, newline="")


def _read_user_lines(path: Path) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """`user item item ...` per line, chronological (ML-1M and Beauty ship this)."""
    users, seqs, origin = [], [], {}
    seen: set[str] = set()
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if not all(p.isdigit() for p in parts):
                raise DataError(f"{path}:{lineno}: expected integer ids `user item item ...`, "
                                f"got {line.strip()[:80]!r}")
            u, items = parts[0], parts[1:]
            if u in seen:
                raise DataError(f"{path}:{lineno}: user {u} appears on a second line; "
                                "each user must be on exactly one line.")
            seen.add(u)
            users.append(u)
            seqs.append(items)
            origin[u] = f"{path}:{lineno}"
    return users, seqs, origin


def load_ml1m(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "ml-1m"
    users, seqs, origin = _read_user_lines(root / "sequences_original_ids.txt.gz")
    ds = _from_external("ml-1m", users, seqs, origin, 3, drop_short)
    movies = root / "movies.dat"
    if movies.exists():
        index = ds.item_index()
        with open(movies, encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("::")
                if len(parts) != 3:
                    raise DataError(f"{movies}:{lineno}: expected `MovieID::Title::Genres`")
                i = index.get(parts[0])
                if i is not None:
                    ds.titles[i] = parts[1]
                    ds.labels[i] = parts[2].split("|")[0]  # first listed genre: NMI needs one label
        ds.label_kind = "genre"
    return ds


def load_beauty(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "amazon-beauty"
    users, seqs, origin = _read_user_lines(root / "Beauty.txt.gz")
    ds = _from_external("amazon-beauty", users, seqs, origin, 3, drop_short)
    meta = root / "item_meta.tsv"
    if meta.exists():
        index = ds.item_index()
        with open(meta, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"item_id", "top_category", "category_path"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{meta}:1: missing column(s) {sorted(missing)}")
            for row in reader:
                i = index.get(row["item_id"])
                if i is not None:
                    path = row["category_path"]
                    ds.titles[i] = f"{row.get('brand') or '-'} | {path}"
                    ds.labels[i] = row["top_category"]
        ds.label_kind = "category"
    return ds


def _sequences_from_events(name: str, events: Iterable[tuple[str, str, float, str]],
                           min_len: int, drop_short: bool) -> Dataset:
    """(user, item, timestamp, origin) rows in any order -> per-user sequences.

    Stable sort by timestamp: ties keep file order.
    """
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    origin: dict[str, str] = {}
    for n, (u, i, ts, where) in enumerate(events):
        by_user.setdefault(u, []).append((ts, n, i))
        origin.setdefault(u, where)
    users = list(by_user)
    seqs = [[i for _, _, i in sorted(by_user[u])] for u in users]
    return _from_external(name, users, seqs, origin, min_len, drop_short)


def load_ml100k(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "ml-100k"
    path = root / "u.data"

    def rows():
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split("\t")
                if len(parts) != 4:
                    raise DataError(f"{path}:{lineno}: expected 4 tab-separated columns "
                                    f"`user item rating timestamp`, got {len(parts)}")
                try:
                    ts = float(parts[3])
                except ValueError:
                    raise DataError(f"{path}:{lineno}: timestamp {parts[3].strip()!r} is not a "
                                    "number") from None
                yield parts[0], parts[1], ts, f"{path}:{lineno}"

    ds = _sequences_from_events("ml-100k", rows(), 3, drop_short)
    item = root / "u.item"
    genre = root / "u.genre"
    if item.exists() and genre.exists():
        names = [ln.split("|")[0] for ln in open(genre, encoding="latin-1") if "|" in ln]
        index = ds.item_index()
        with open(item, encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("|")
                i = index.get(parts[0])
                if i is None or len(parts) < 5 + len(names):
                    continue
                ds.titles[i] = parts[1]
                flags = parts[5:5 + len(names)]
                ds.labels[i] = next((g for g, fl in zip(names, flags) if fl == "1"), "unknown")
        ds.label_kind = "genre"
    return ds


# ---------------------------------------------------------------------------------------------
# click logs bigger than memory: record batches in, dense codes out

STREAM_BATCH_ROWS = 1 << 20
LOG_COLUMNS = ("user_id", "item_id", "timestamp")


class _Codes:
    """External ids -> dense codes in order of first appearance, one record batch at a time:
    only each batch's distinct ids pass through Python."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []

    def encode(self, col) -> np.ndarray:
        import pyarrow.compute as pc

        enc = pc.dictionary_encode(col)
        lut = np.empty(len(enc.dictionary), dtype=np.int32)
        for j, x in enumerate(enc.dictionary.to_pylist()):
            c = self.index.get(x)
            if c is None:
                c = self.index[x] = len(self.names)
                self.names.append(x)
            lut[j] = c
        return lut[enc.indices.to_numpy(zero_copy_only=False)]


class _NotStreamable(Exception):
    """A batch the vectorized path does not take (nulls, empty ids, text timestamps): the
    row-by-row reader reads the file instead and names the offending line."""


def _record_batches(path: Path):
    """The log's record batches (user_id, item_id, timestamp), read a batch at a time: a CSV
    (optionally compressed), a Parquet file, or a folder of Parquet files (hive partitions)."""
    import pyarrow as pa

    if path.is_dir():
        import pyarrow.dataset as pads
        ds = pads.dataset(path, format="parquet", partitioning="hive", exclude_invalid_files=True)
        yield from ds.to_batches(columns=list(LOG_COLUMNS), batch_size=STREAM_BATCH_ROWS)
    elif path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        yield from pq.ParquetFile(path).iter_batches(batch_size=STREAM_BATCH_ROWS,
                                                     columns=list(LOG_COLUMNS))
    else:
        from pyarrow import csv as pacsv
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                column_types={"user_id": pa.string(), "item_id": pa.string()},
                include_columns=list(LOG_COLUMNS)))
        yield from reader


def _stream_codes(path: Path):
    """(user names, item names, user codes, item codes, timestamps) of a whole log, built from
    record batches: about 16 bytes per interaction beside the distinct ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    users, items = _Codes(), _Codes()
    u_parts, i_parts, t_parts = [], [], []
    for b in _record_batches(path):
        cols = {name: b.column(b.schema.get_field_index(name)) for name in LOG_COLUMNS}
        if any(c.null_count for c in cols.values()):
            raise _NotStreamable
        ids = {}
        for name in ("user_id", "item_id"):
            c = cols[name]
            c = pc.utf8_trim_whitespace(c if pa.types.is_string(c.type) else pc.cast(c, pa.string()))
            if pc.any(pc.equal(pc.utf8_length(c), 0)).as_py():
                raise _NotStreamable
            ids[name] = c
        t = cols["timestamp"]
        if pa.types.is_timestamp(t.type):
            ts = pc.cast(pc.cast(t, pa.timestamp("us")), pa.int64()).to_numpy() / 1e6
        elif pa.types.is_integer(t.type) or pa.types.is_floating(t.type):
            ts = pc.cast(t, pa.float64()).to_numpy(zero_copy_only=False)
        else:
            raise _NotStreamable
        u_parts.append(users.encode(ids["user_id"]))
        i_parts.append(items.encode(ids["item_id"]))
        t_parts.append(np.asarray(ts, dtype=np.float64))
    if not u_parts:
        return users.names, items.names, np.zeros(0, np.int32), np.zeros(0, np.int32), \
            np.zeros(0, np.float64)
    return (users.names, items.names, np.concatenate(u_parts), np.concatenate(i_parts),
            np.concatenate(t_parts))


def _from_codes(name: str, user_names: list[str], item_names: list[str], uc: np.ndarray,
                ic: np.ndarray, ts: np.ndarray, min_len: int, drop_short: bool,
                where: Callable[[int], str]) -> Dataset:
    """What `_sequences_from_events` + `_from_external` build, from dense codes, vectorized:
    users in order of first appearance, each sorted by time (ties: file order), the vocabulary
    ranked by training popularity. `where(row)` names a row for errors."""
    if not len(uc):
        raise DataError(f"{name}: the data set is empty (no user has any interaction). "
                        "Check the path and the file format.")
    order = np.lexsort((np.arange(len(uc)), ts, uc))            # [N] user, time, row
    u_sorted = uc[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])   # [U]
    lens = np.diff(np.r_[starts, len(uc)])                      # [U]
    short = lens < min_len
    if short.any() and not drop_short:
        u = int(np.flatnonzero(short)[0])
        first = int(order[starts[u]:starts[u] + lens[u]].min())
        raise DataError(
            f"{where(first)}: user {user_names[int(u_sorted[starts[u]])]!r} has {lens[u]} "
            f"interaction(s); the leave-one-out split needs at least {min_len} (training, "
            "validation and test items). Pass --drop-short-users to skip such users.")
    keep = ~short
    if not keep.any():
        raise DataError(f"{name}: no user has {min_len} or more interactions; nothing to train on.")
    row_keep = np.repeat(keep, lens)                           # [N]
    pos = np.arange(len(uc)) - np.repeat(starts, lens)         # [N] position within the user
    in_train = pos < np.repeat(lens - 2, lens)                 # [N]
    items = ic[order]                                          # [N]
    counts = np.bincount(items[row_keep & in_train], minlength=len(item_names))
    present = np.flatnonzero(np.bincount(items[row_keep], minlength=len(item_names)))

    ranked = sorted(present.tolist(), key=lambda j: vocab_rank(item_names[j], int(counts[j])))
    internal = np.zeros(len(item_names), dtype=np.int64)
    internal[ranked] = np.arange(1, len(ranked) + 1)
    flat = internal[items[row_keep]]                           # [N_kept]
    kept_lens = lens[keep]
    seqs = np.split(flat, np.cumsum(kept_lens)[:-1])
    kept_users = u_sorted[starts[keep]]
    return Dataset(name=name, sequences=seqs, user_ids=[user_names[int(u)] for u in kept_users],
                   item_ids=["<pad>"] + [item_names[j] for j in ranked])


def _stream_log(path: Path, name: str, drop_short: bool, row_name: Callable[[int], str]
                ) -> Dataset | None:
    """The log through record batches, or None when the row-by-row reader must read it."""
    import pyarrow as pa

    try:
        names_u, names_i, uc, ic, ts = _stream_codes(path)
    except (_NotStreamable, pa.ArrowInvalid, pa.ArrowTypeError, KeyError):
        return None
    return _from_codes(name, names_u, names_i, uc, ic, ts, 3, drop_short, row_name)


def load_click_log(path: Path, drop_short: bool = False, stream: bool = True) -> Dataset:
    """A user's own CSV or Parquet log with columns `user_id,item_id,timestamp`.

    Read as a stream of record batches into dense codes (about 16 bytes per interaction beside
    the distinct ids); a file the batches cannot take as they are (an error in it, or ISO text
    timestamps) is read row by row, which names the offending line; `stream=False` reads
    every file so (the reference the streamed path is tested and measured against)."""
    path = Path(path)
    need = LOG_COLUMNS
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    is_parquet = path.suffix.lower() in (".parquet", ".pq")
    if stream and path.stat().st_size:
        ds = _stream_log(path, path.stem, drop_short,
                         (lambda r: f"{path}: row {r + 1}") if is_parquet
                         else (lambda r: f"{path}:{r + 2}"))
        if ds is not None:
            return ds
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow).") from e
        table = pq.read_table(path)
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {table.column_names}. "
                            "A click log needs user_id,item_id,timestamp.")
        cols = {c: table.column(c).to_pylist() for c in need}

        def rows():
            for n, (u, i, ts) in enumerate(zip(cols["user_id"], cols["item_id"], cols["timestamp"])):
                if u is None or i is None or ts is None:
                    raise DataError(f"{path}: row {n + 1}: empty user_id, item_id or timestamp")
                yield str(u), str(i), _parse_ts(ts, f"{path}: row {n + 1}"), f"{path}: row {n + 1}"
    else:
        def rows():
            with _open_text(path) as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: the file is empty; expected a header "
                                    "user_id,item_id,timestamp and one row per click.")
                header = [h.strip() for h in header]
                missing = [c for c in need if c not in header]
                if missing:
                    raise DataError(f"{path}:1: missing column(s) {missing}; the header is "
                                    f"{header}. A click log needs user_id,item_id,timestamp.")
                cu, ci, ct = (header.index(c) for c in need)
                for lineno, row in enumerate(reader, 2):
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise DataError(f"{path}:{lineno}: {len(row)} fields, the header has "
                                        f"{len(header)}")
                    u, i = row[cu].strip(), row[ci].strip()
                    if not u or not i:
                        raise DataError(f"{path}:{lineno}: empty user_id or item_id")
                    where = f"{path}:{lineno}"
                    yield u, i, _parse_ts(row[ct], where), where
    return _sequences_from_events(path.stem, rows(), 3, drop_short)


def load_click_folder(path: Path, drop_short: bool = False) -> Dataset:
    """A folder of Parquet files with columns user_id,item_id,timestamp (hive partitions such
    as `sine export-clicks` writes, or flat), streamed as record batches. The export writes each
    event once; a folder the batches cannot take is read event by event, deduplicated."""
    from .clicklog import ClickLogError, read_clicks

    path = Path(path)
    if path.is_dir() and any(path.rglob("*.parquet")):
        ds = _stream_log(path, path.name, drop_short, lambda r: f"{path}: row {r + 1}")
        if ds is not None:
            return ds
    try:
        rows = [(u, i, ts, f"{path}: event {e}") for u, i, ts, e in read_clicks(path)]
    except ClickLogError as e:
        raise DataError(str(e)) from None
    return _sequences_from_events(path.name, rows, 3, drop_short)


def extend(base: Dataset, clicks: Iterable[tuple[str, str, float]], name: str | None = None,
           min_len: int = 3) -> Dataset:
    """`base` with new clicks (user, item, timestamp) appended to each user's sequence in time
    order, new users and new items included. The vocabulary is ranked anew by popularity; users
    with fewer than `min_len` clicks in all are left out."""
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for n, (u, i, ts) in enumerate(clicks):
        by_user.setdefault(u, []).append((ts, n, i))
    seqs = {u: [base.item_ids[int(j)] for j in s] for u, s in zip(base.user_ids, base.sequences)}
    for u, evs in by_user.items():
        seqs.setdefault(u, []).extend(i for _, _, i in sorted(evs))
    users = list(seqs)
    ds = _from_external(name or f"{base.name}+clicks", users, [seqs[u] for u in users], {},
                        min_len, True)
    old = base.item_index()
    for j, x in enumerate(ds.item_ids[1:], 1):          # keep what is known of the old items
        if x in old and old[x] in base.titles:
            ds.titles[j] = base.titles[old[x]]
        if x in old and old[x] in base.labels:
            ds.labels[j] = base.labels[old[x]]
    ds.label_kind = base.label_kind
    return ds


def _parse_ts(v, where: str) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "timestamp"):
        return float(v.timestamp())
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        pass
    from datetime import datetime
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        raise DataError(f"{where}: timestamp {s!r} is neither a number nor an ISO-8601 date") from None


def synthetic(n_users: int = 2000, n_items: int = 500, n_categories: int = 20,
              interests_per_user: tuple[int, int] = (2, 4), length: tuple[int, int] = (8, 40),
              stay: float = 0.8, seed: int = 0, name: str = "synthetic") -> Dataset:
    """Users mixing a few of many planted categories.

    Each item belongs to one category and has a Zipf-like popularity within it. A user picks
    2-4 categories and walks: with probability `stay` the next click stays in the current
    category, else it jumps to another of the user's categories. A sequential multi-interest
    model can learn both the categories and which one is active; popularity cannot. The planted
    truth is kept: each item's category in `labels`, each user's categories in `user_labels`.
    """
    rng = np.random.default_rng(seed)
    cat_of = rng.integers(0, n_categories, size=n_items)
    members = [np.flatnonzero(cat_of == c) for c in range(n_categories)]
    members = [m if len(m) else np.array([rng.integers(n_items)]) for m in members]
    weights = []
    for m in members:
        w = 1.0 / np.arange(1, len(m) + 1) ** 0.8
        weights.append(w / w.sum())
    users, seqs, planted = [], [], {}
    for u in range(n_users):
        k = min(int(rng.integers(interests_per_user[0], interests_per_user[1] + 1)), n_categories)
        cats = rng.choice(n_categories, size=k, replace=False)
        planted[str(u)] = [f"c{c}" for c in sorted(cats)]
        n = int(rng.integers(length[0], length[1] + 1))
        c = int(rng.choice(cats))
        s: list[str] = []
        seen: set[int] = set()
        tries = 0
        while len(s) < n and tries < 20 * n:
            tries += 1
            if rng.random() > stay:
                c = int(rng.choice(cats))
            i = int(rng.choice(members[c], p=weights[c]))
            if i in seen:
                continue
            seen.add(i)
            s.append(str(i))
        if len(s) >= 3:
            users.append(str(u))
            seqs.append(s)
    ds = _from_external("synthetic", users, seqs, {}, 3, False)
    for idx, x in enumerate(ds.item_ids[1:], 1):
        ds.labels[idx] = f"c{cat_of[int(x)]}"
        ds.titles[idx] = f"item {x} (c{cat_of[int(x)]})"
    ds.label_kind = "planted"
    ds.name = name
    ds.user_labels = [planted[u] for u in ds.user_ids]
    return ds


def synthetic_mix(n_users: int = 4000, n_items: int = 2000, seed: int = 0) -> Dataset:
    """The positive control for multi-interest retrieval: each user mixes 3-4 of 40 planted
    categories and the next click leaves the current one half of the time, so one vector must
    cover several categories while K interests can take one each."""
    return synthetic(n_users, n_items, n_categories=40, interests_per_user=(3, 4), length=(20, 60),
                     stay=0.5, seed=seed, name="synthetic-mix")


def write_synthetic_log(path: Path | str, n_interactions: int, n_items: int = 100_000,
                        n_categories: int = 200, length: tuple[int, int] = (10, 190),
                        stay: float = 0.8, seed: int = 0, chunk_users: int = 50_000,
                        progress: Callable[[int, int], None] | None = None) -> int:
    """`synthetic`'s process at scale, vectorized, written as a click log (Parquet, or CSV by
    the suffix) one chunk of users at a time: each user mixes 2-4 planted categories, staying
    in the current one with probability `stay`; items are Zipf-like within their category;
    repeats are allowed. Returns the rows written (about `n_interactions`)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    rng = np.random.default_rng(seed)
    cat_of = rng.integers(0, n_categories, size=n_items)
    order = np.argsort(cat_of, kind="stable")                  # items grouped by category
    sizes = np.bincount(cat_of, minlength=n_categories)
    w = np.concatenate([1.0 / np.arange(1, k + 1) ** 0.8 for k in sizes])   # [M]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    sums = np.add.reduceat(w, starts) if n_items else w
    cdf = np.cumsum(w / np.repeat(sums, sizes))     # [M]; category c spans (c, c + 1]
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                        ("timestamp", pa.int64())])
    csv = path.suffix.lower() == ".csv"
    tmp = path.with_name(f".{path.name}.tmp")
    writer = pacsv.CSVWriter(str(tmp), schema) if csv else pq.ParquetWriter(str(tmp), schema)
    written, user0 = 0, 0
    try:
        while written < n_interactions:
            lens = rng.integers(length[0], length[1] + 1, size=chunk_users)          # [U]
            lens = lens[np.cumsum(lens) <= n_interactions - written + length[1]]
            if not len(lens):
                break
            n, u = int(lens.sum()), len(lens)
            cats = rng.integers(0, n_categories, size=(u, 4))                        # [U, 4]
            k = rng.integers(2, 5, size=u)                                           # [U]
            owner = np.repeat(np.arange(u), lens)                                    # [n]
            first = np.r_[0, np.cumsum(lens)[:-1]]
            jump = rng.random(n) > stay
            jump[first] = True
            seg = np.cumsum(jump) - 1                                                # [n]
            seg_pick = (rng.random(seg[-1] + 1) * k[owner[jump]]).astype(np.int64)
            cat = cats[owner, seg_pick[seg]]                                         # [n]
            pos = np.searchsorted(cdf, cat + rng.random(n) * (1 - 1e-12), side="right")
            items = order[np.minimum(pos, n_items - 1)]
            ts = 1_600_000_000 + np.cumsum(rng.integers(1, 600, size=n))
            table = pa.table({"user_id": pa.array((owner + user0).astype(str)),
                              "item_id": pa.array(items.astype(str)),
                              "timestamp": pa.array(ts)}, schema=schema)
            writer.write_table(table)
            written += n
            user0 += u
            if progress is not None:
                progress(min(written, n_interactions), n_interactions)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return written


def default_data_dir() -> Path:
    """`../shared/data` seen from the working directory, else from the project root."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        p = (base / ".." / "shared" / "data").resolve()
        if p.exists():
            return p
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def load(name: str, data_dir: Path | str | None = None, drop_short: bool = False,
         seed: int = 0) -> Dataset:
    """Load a data set by name, a click log when `name` is a path to a .csv / .parquet file, or
    a folder exported by `sine export-clicks`."""
    if name not in DATASETS and Path(name).is_dir():
        return load_click_folder(Path(name), drop_short)
    if name not in DATASETS and (os.sep in name or name.endswith((".csv", ".parquet", ".pq", ".gz"))):
        return load_click_log(Path(name), drop_short)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if name == "ml-1m":
        return load_ml1m(data_dir, drop_short)
    if name == "amazon-beauty":
        return load_beauty(data_dir, drop_short)
    if name == "ml-100k":
        return load_ml100k(data_dir, drop_short)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "synthetic-mix":
        return synthetic_mix(seed=seed)
    raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)} "
                    "or give the path of a .csv/.parquet click log")


# ---------------------------------------------------------------------------------------------
# split and windows

def window(history: np.ndarray, seq_len: int) -> np.ndarray:
    """The last `seq_len` items of an oldest-first history as a most-recent-first padded row."""
    out = np.zeros(seq_len, dtype=np.int64)
    recent = history[-seq_len:][::-1]
    out[: len(recent)] = recent
    return out


@dataclass
class Split:
    """Arrays for training and for leave-one-out evaluation."""
    train_inputs: np.ndarray      # [N, n] int32, most recent first
    train_targets: np.ndarray     # [N] int64
    valid_inputs: np.ndarray      # [U, n]
    valid_targets: np.ndarray     # [U]
    test_inputs: np.ndarray       # [U, n]
    test_targets: np.ndarray      # [U]
    train_counts: np.ndarray      # [M + 1] popularity over training parts


def split(ds: Dataset, seq_len: int = 20) -> Split:
    n_train = sum(max(len(s) - 3, 0) for s in ds.sequences)
    tin = np.zeros((n_train, seq_len), dtype=np.int32)
    tgt = np.zeros(n_train, dtype=np.int64)
    U = ds.n_users
    vin = np.zeros((U, seq_len), dtype=np.int64)
    tein = np.zeros((U, seq_len), dtype=np.int64)
    vt = np.zeros(U, dtype=np.int64)
    tt = np.zeros(U, dtype=np.int64)
    counts = np.zeros(ds.n_items + 1, dtype=np.int64)
    r = 0
    for u, s in enumerate(ds.sequences):
        train = s[:-2]
        np.add.at(counts, train, 1)
        for t in range(1, len(train)):
            tin[r] = window(train[:t], seq_len)
            tgt[r] = train[t]
            r += 1
        vin[u] = window(train, seq_len)
        vt[u] = s[-2]
        tein[u] = window(s[:-1], seq_len)
        tt[u] = s[-1]
    assert r == n_train, "sample count mismatch: this is a bug"
    return Split(tin, tgt, vin, vt, tein, tt, counts)


def dataset_info(ds: Dataset) -> dict:
    return {"name": ds.name, "users": ds.n_users, "items": ds.n_items,
            "interactions": ds.n_interactions, "vocab_sha256": ds.vocab_sha256()}


def histories(ds: Dataset, holdout: int = 0) -> Iterator[tuple[str, list[str]]]:
    """(user id, external item ids oldest first) per user, each without its last `holdout`
    clicks (1: what the offline evaluation sees before the test target)."""
    if holdout < 0:
        raise DataError(f"holdout must be >= 0, got {holdout}")
    for u, seq in zip(ds.user_ids, ds.sequences):
        items = seq[: len(seq) - holdout] if holdout else seq
        yield u, [ds.item_ids[int(i)] for i in items]
