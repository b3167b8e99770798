"""Click logs: a CSV (optionally compressed), a Parquet file, or a folder of Parquet files (as
`sine export-clicks` writes), with columns user_id, item_id, timestamp. Read as record batches
into dense codes and sequences built vectorized, so a log bigger than memory as Python objects
still loads; a file the batches cannot take is read row by row, which names the bad line."""
from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from index_builder.bundle import SineError

from .dataset import DataError, Dataset, open_text, sequences_from_events, vocab_rank

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
        yield from parquet_files(path).to_batches(columns=list(LOG_COLUMNS),
                                                  batch_size=STREAM_BATCH_ROWS)
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
    """What `sequences_from_events` + `from_external` build, from dense codes, vectorized:
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
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    is_parquet = path.suffix.lower() in (".parquet", ".pq")
    if stream and path.stat().st_size:
        ds = _stream_log(path, path.stem, drop_short,
                         (lambda r: f"{path}: row {r + 1}") if is_parquet
                         else (lambda r: f"{path}:{r + 2}"))
        if ds is not None:
            return ds
    rows = _parquet_rows(path) if is_parquet else _csv_rows(path)
    return sequences_from_events(path.stem, rows, 3, drop_short)


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, float, str]]:
    """A Parquet log row by row, each named for errors."""
    need = LOG_COLUMNS
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
    for n, (u, i, ts) in enumerate(zip(cols["user_id"], cols["item_id"], cols["timestamp"])):
        if u is None or i is None or ts is None:
            raise DataError(f"{path}: row {n + 1}: empty user_id, item_id or timestamp")
        yield str(u), str(i), parse_ts(ts, f"{path}: row {n + 1}"), f"{path}: row {n + 1}"


def _csv_rows(path: Path) -> Iterator[tuple[str, str, float, str]]:
    """A CSV log row by row, each named for errors (`path:line`)."""
    need = LOG_COLUMNS
    with open_text(path) as f:
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
            yield u, i, parse_ts(row[ct], where), where


def load_click_folder(path: Path, drop_short: bool = False) -> Dataset:
    """A folder of Parquet files with columns user_id,item_id,timestamp (hive partitions such
    as `sine export-clicks` writes, or flat), streamed as record batches. The export writes each
    event once; a folder the batches cannot take is read event by event, deduplicated."""
    path = Path(path)
    if path.is_dir() and any(path.rglob("*.parquet")):
        ds = _stream_log(path, path.name, drop_short, lambda r: f"{path}: row {r + 1}")
        if ds is not None:
            return ds
    try:
        rows = [(u, i, ts, f"{path}: event {e}") for u, i, ts, e in read_clicks(path)]
    except ClickLogError as e:
        raise DataError(str(e)) from None
    return sequences_from_events(path.name, rows, 3, drop_short)


def parse_ts(v, where: str) -> float:
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


# -- an exported folder (`sine export-clicks`) --------------------------------------------------
#
#     <out>/date=YYYY-MM-DD/hour=HH/part-[<shard>-]<first stream id>.parquet
#         columns user_id, item_id, timestamp (seconds, UTC), event_id
#     <out>/rejected/[<shard>-]<first stream id>.jsonl    entries that are not clicks

COLUMNS = ("user_id", "item_id", "timestamp", "event_id")


class ClickLogError(SineError, RuntimeError):
    """The click log cannot be read or written; the message says why."""


def partition(ts: float) -> str:
    """The folder of a click's hour, `date=YYYY-MM-DD/hour=HH` (UTC)."""
    t = time.gmtime(ts)
    return f"date={time.strftime('%Y-%m-%d', t)}/hour={t.tm_hour:02d}"


def read_clicks(folder: Path | str, since: float | None = None
                ) -> Iterator[tuple[str, str, float, str]]:
    """(user_id, item_id, timestamp, event_id) of an exported folder, each (user, event) once,
    in no particular order; `since` keeps the clicks at or after that time (seconds) and reads
    only those (a filter pushed into the Parquet scan)."""
    import pyarrow.dataset as pads

    folder = Path(folder)
    if not folder.is_dir():
        raise ClickLogError(f"{folder}: no such click log folder.")
    ds = parquet_files(folder)
    if not ds.files:
        return
    seen: set[tuple[str, str]] = set()
    filt = pads.field("timestamp") >= since if since is not None else None
    for b in ds.to_batches(columns=list(COLUMNS), filter=filt):
        for u, i, ts, eid in zip(*(b.column(c).to_pylist() for c in COLUMNS)):
            if (u, eid) in seen:
                continue
            seen.add((u, eid))
            yield u, i, ts, eid


def newest_click(folder: Path | str) -> float | None:
    """The time of the newest exported click (only the timestamp column is read)."""
    import pyarrow.compute as pc

    folder = Path(folder)
    if not folder.is_dir():
        raise ClickLogError(f"{folder}: no such click log folder.")
    ds = parquet_files(folder)
    if not ds.files:
        return None
    t = ds.to_table(columns=["timestamp"])
    return None if t.num_rows == 0 else float(pc.max(t.column("timestamp")).as_py())


def parquet_files(folder: Path):
    """A pyarrow dataset of a folder's Parquet files only (an export's rejected/ holds JSON
    lines, a write in progress has a hidden temporary name)."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in Path(folder).rglob("*.parquet") if not p.name.startswith("."))
    return pads.dataset(files, format="parquet")


def count_clicks(folder: Path | str) -> int:
    """Rows of an exported folder, from the Parquet footers (no data is read)."""
    ds = parquet_files(Path(folder))
    return int(ds.count_rows()) if ds.files else 0


def extend_with_clicks(ds: Dataset, folder: Path | str, window_hours: float) -> Dataset:
    """`ds` with the clicks of an exported folder from its last `window_hours` (before the
    newest one) appended; only that window is read."""
    from .dataset import extend

    newest = newest_click(folder)
    if newest is None:
        return ds
    rows = read_clicks(folder, since=newest - window_hours * 3600)
    return extend(ds, ((u, i, ts) for u, i, ts, _ in rows))
