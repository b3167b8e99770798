"""The click log: `POST /events` appends every accepted click to a Redis Stream; `export_clicks`
(`sine export-clicks`) moves them into partitioned Parquet that training reads.

    <out>/date=YYYY-MM-DD/hour=HH/part-[<shard>-]<first stream id>.parquet
        columns user_id, item_id, timestamp (seconds, UTC), event_id

With `redis_shards` the log is several streams (one per hash tag, see `service.history.Keys`,
on a Redis Cluster each in its own slot); one run exports them all.

The export reads through a consumer group, so several runs share the work and each entry is
read until it is acknowledged. A file is written under a temporary name, fsynced and renamed
into place; only then are its entries `XACK`ed. A run that died between the two leaves its
entries pending: the next run takes them over (`XAUTOCLAIM`) and skips every event id its
partition already holds, so after a crash at any point no click is lost and none is written
twice.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("user_id", "item_id", "timestamp", "event_id")


class ClickLogError(RuntimeError):
    """The click log cannot be read or written; the message says why."""


@dataclass
class ExportResult:
    read: int = 0                  # stream entries handled (new and taken over)
    written: int = 0               # rows written to Parquet
    skipped: int = 0               # rows already in their partition (a crashed run's)
    taken_over: int = 0            # entries another run read but never acknowledged
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _partition(ts: float) -> str:
    t = time.gmtime(ts)
    return f"date={time.strftime('%Y-%m-%d', t)}/hour={t.tm_hour:02d}"


def _ids_in(folder: Path) -> set[str]:
    """Every event id already written under one partition."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in sorted(folder.glob("*.parquet")):
        ids.update(pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist())
    return ids


def _write(rows: list[tuple[str, str, float, str]], path: Path) -> None:
    """One Parquet file, atomically: temporary name, fsync, rename, fsync of the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)},
                     schema=pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                       ("timestamp", pa.float64()), ("event_id", pa.string())]))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Exporter:
    """One run of the export; `ack` is the step after a file is safely on disk."""

    def __init__(self, client, streams: list[str] | str, group: str, consumer: str, out: Path,
                 batch: int = 5000):
        self.r, self.group, self.consumer = client, group, consumer
        self.streams = [streams] if isinstance(streams, str) else list(streams)
        self.stream = self.streams[0]
        self.out, self.batch = Path(out), batch
        self._known: dict[str, set[str]] = {}

    def ack(self, ids: list[str]) -> None:
        self.r.xack(self.stream, self.group, *ids)

    def _file_prefix(self) -> str:
        """`s3-` for the stream `{s3}:...`: ids of different streams may coincide."""
        if self.stream.startswith("{") and "}" in self.stream:
            return self.stream[1:self.stream.index("}")] + "-"
        return ""

    def _rows(self, entries) -> list[tuple[str, str, float, str, str]]:
        out = []
        for sid, f in entries:
            if not f:                                  # trimmed away after it was read
                continue
            try:
                out.append((f["user"], f["item"], int(f["ts"]) / 1000.0, f["event"], sid))
            except (KeyError, ValueError) as e:
                raise ClickLogError(f"stream {self.stream} entry {sid} is not a click "
                                    f"({f}): {e}") from None
        return out

    def handle(self, entries, res: ExportResult) -> None:
        rows = self._rows(entries)
        by_part: dict[str, list[tuple[str, str, float, str, str]]] = {}
        for row in rows:
            by_part.setdefault(_partition(row[2]), []).append(row)
        for part, prow in by_part.items():
            known = self._known.get(part)
            if known is None:
                known = self._known[part] = _ids_in(self.out / part)
            fresh = []
            for u, i, ts, eid, _sid in prow:
                if eid in known:
                    res.skipped += 1
                    continue
                known.add(eid)
                fresh.append((u, i, ts, eid))
            if fresh:
                path = self.out / part / f"part-{self._file_prefix()}{prow[0][4]}.parquet"
                _write(fresh, path)
                res.written += len(fresh)
                res.files.append(str(path.relative_to(self.out)))
        if entries:
            self.ack([sid for sid, _ in entries])
        res.read += len(entries)

    def run(self, progress: Callable[[int], None] | None = None) -> ExportResult:
        t0 = time.perf_counter()
        res = ExportResult()
        for stream in self.streams:
            self.stream = stream
            self._run_one(res, progress)
        res.seconds = time.perf_counter() - t0
        return res

    def _run_one(self, res: ExportResult, progress: Callable[[int], None] | None) -> None:
        from redis.exceptions import ResponseError

        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        # entries a crashed run read but never acknowledged become this run's
        start = "0-0"
        while True:
            start, claimed, *_ = self.r.xautoclaim(self.stream, self.group, self.consumer,
                                                   min_idle_time=0, start_id=start,
                                                   count=self.batch)
            res.taken_over += len(claimed)
            if start in ("0-0", b"0-0"):
                break
        for new in ("0", ">"):        # first this consumer's pending entries, then the new ones
            while True:
                got = self.r.xreadgroup(self.group, self.consumer, {self.stream: new},
                                        count=self.batch)
                entries = got[0][1] if got else []
                if not entries:
                    break
                self.handle(entries, res)
                if progress is not None:
                    progress(res.read)


def export_clicks(redis_url: str, out: Path | str, streams: list[str] | str = "sine:clicks",
                  group: str = "sine-export", consumer: str | None = None,
                  password: str | None = None, batch: int = 5000,
                  progress: Callable[[int], None] | None = None,
                  cluster: bool = False) -> ExportResult:
    """`sine export-clicks`: everything the streams hold that the group has not exported;
    `cluster`: `redis_url` is a node of a Redis Cluster."""
    import redis
    from redis.exceptions import RedisError

    try:
        if cluster:
            from redis.cluster import RedisCluster
            client = RedisCluster.from_url(redis_url, password=password, decode_responses=True,
                                           socket_timeout=30)
        else:
            client = redis.Redis.from_url(redis_url, password=password, decode_responses=True,
                                          socket_timeout=30)
    except (RedisError, OSError) as e:
        raise ClickLogError(f"the click log at {_redacted(redis_url)}: {e}") from None
    try:
        return Exporter(client, streams, group, consumer or f"export-{socket.gethostname()}",
                        Path(out), batch).run(progress)
    except (RedisError, OSError) as e:
        raise ClickLogError(f"the click log at {_redacted(redis_url)}: {e}") from None
    finally:
        client.close()


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def read_clicks(folder: Path | str, since: float | None = None
                ) -> Iterator[tuple[str, str, float, str]]:
    """(user_id, item_id, timestamp, event_id) of an exported folder, each event once, in no
    particular order; `since` keeps the clicks at or after that time (seconds)."""
    import pyarrow.dataset as pads

    folder = Path(folder)
    if not folder.is_dir():
        raise ClickLogError(f"{folder}: no such click log folder.")
    ds = pads.dataset(folder, format="parquet", partitioning="hive",
                      exclude_invalid_files=True)
    seen: set[str] = set()
    filt = pads.field("timestamp") >= since if since is not None else None
    for b in ds.to_batches(columns=list(COLUMNS), filter=filt):
        for u, i, ts, eid in zip(*(b.column(c).to_pylist() for c in COLUMNS)):
            if eid in seen:
                continue
            seen.add(eid)
            yield u, i, ts, eid
