"""The click log: `POST /events` appends every accepted click to a Redis Stream; `export_clicks`
(`sine export-clicks`) moves them into partitioned Parquet that training reads.

    <out>/date=YYYY-MM-DD/hour=HH/part-[<shard>-]<first stream id>.parquet
        columns user_id, item_id, timestamp (seconds, UTC), event_id
    <out>/rejected/[<shard>-]<first stream id>.jsonl
        entries that are not clicks, set aside (stream, id, fields, why)

With `redis_shards` the log is several streams (one per hash tag, see `service.history.Keys`,
on a Redis Cluster each in its own slot); one run exports them all.

The export reads through a consumer group, so several runs share the work and each entry is
read until it is acknowledged. A file is written under a temporary name, fsynced and renamed
into place; only then are its entries `XACK`ed. A run that died between the two leaves its
entries pending: the next run takes them over (its own at once, another consumer's once they
have been idle `claim_idle_s`, so two live exporters never take each other's) and skips every
(user, event id) its partition already holds, so after a crash at any point no click is lost
and none is written twice. An entry that is not a click is written to `rejected/`, acknowledged
and counted, and the export goes on.

What was lost before the export could read it is counted, never skipped silently: the entries a
cap removed unexported (the counters beside each stream, `click_stream_trim=cap`), the entries
deleted past what the group had read (a gap: Redis's `max-deleted-entry-id` beyond the group's
last delivered id, whoever deleted them), and entries that vanished after they were read. Any of
them makes `sine export-clicks` exit 5.
"""
from __future__ import annotations

import json
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from index_builder.bundle import atomic_open
from service.keys import DEFAULT_GROUP, DEFAULT_STREAM, ENTRY_FIELDS, LOST, REPORTED, Keys
from service.redact import redact_url

from ..data.clicklogs import COLUMNS, ClickLogError, partition

EXIT_LOST = 5                  # `sine export-clicks`: exported, but clicks were lost before
CLAIM_IDLE_S = 60.0            # another consumer's pending entries are taken once idle this long


# one stream's XINFO STREAM and XINFO GROUPS at one instant (a script runs alone)
_SNAPSHOT = "return {redis.call('XINFO', 'STREAM', KEYS[1]), redis.call('XINFO', 'GROUPS', KEYS[1])}"
# After a run has read a stream to its end: the group's entries-read set to what it is, entries
# added minus those after its last delivered id (a handful, added meanwhile). Redis counts lag
# as entries added minus entries read and never forgets an entry removed unread, so without
# this a loss, once reported, would stay in the lag for good. ARGV: the group.
_REBASE = """
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local added = 0
for i = 1, #info, 2 do if info[i] == 'entries-added' then added = info[i + 1] end end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then
    local last = f['last-delivered-id']
    local after = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 10000)
    if after < 10000 then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added - after)
    end
    return after
  end
end
return -1
"""


@dataclass
class ExportResult:
    """What one export did: entries read, rows written and skipped, and what was lost."""
    read: int = 0                  # stream entries handled (new and taken over)
    written: int = 0               # rows written to Parquet
    skipped: int = 0               # rows already in their partition (a crashed run's)
    taken_over: int = 0            # entries an earlier run read but never acknowledged
    rejected: int = 0              # entries that are not clicks, set aside in rejected/
    lost_to_cap: int = 0           # unexported entries the cap removed since the last export
    gap: int = 0                   # entries deleted before the group read them (at least)
    vanished: int = 0              # entries deleted after they were read, before the ack
    files: list[str] = field(default_factory=list)
    rejected_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        """Clicks lost before they could be exported. The cap's count and what the export sees
        (a gap, entries that vanished) are two views of the same loss where the cap made it:
        the larger is the count."""
        return max(self.lost_to_cap, self.gap + self.vanished)


def _ids_in(folder: Path) -> set[tuple[str, str]]:
    """Every (user, event id) already written under one partition."""
    import pyarrow.parquet as pq

    ids: set[tuple[str, str]] = set()
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f, columns=["user_id", "event_id"])
        ids.update(zip(t.column("user_id").to_pylist(), t.column("event_id").to_pylist()))
    return ids


KNOWN_PARTITIONS = 48      # hours whose written ids one run keeps in memory


def _write(rows: list[tuple[str, str, float, str]], path: Path) -> None:
    """One Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)},
                     schema=pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                       ("timestamp", pa.float64()), ("event_id", pa.string())]))
    with atomic_open(path) as f:
        pq.write_table(table, f)


def _id(s: str) -> tuple[int, int]:
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class Exporter:
    """One run of the export; `ack` is the step after a file is safely on disk."""

    def __init__(self, client, streams: list[str] | str, group: str, consumer: str, out: Path,
                 batch: int = 5000, claim_idle_s: float = CLAIM_IDLE_S):
        self.r, self.group, self.consumer = client, group, consumer
        self.streams = [streams] if isinstance(streams, str) else list(streams)
        self.stream = self.streams[0]
        self.out, self.batch = Path(out), batch
        self.claim_idle_ms = int(claim_idle_s * 1000)
        # the (user, event) ids of the partitions touched lately, read back from disk when one
        # comes round again: a long backlog touches many, and their sets would fill memory
        self._known: OrderedDict[str, set[tuple[str, str]]] = OrderedDict()

    def ack(self, ids: list[str]) -> None:
        self.r.xack(self.stream, self.group, *ids)

    def _file_prefix(self) -> str:
        """`s3-` for the stream `{s3}:...`: ids of different streams may coincide."""
        if self.stream.startswith("{") and "}" in self.stream:
            return self.stream[1:self.stream.index("}")] + "-"
        return ""

    def _split(self, entries, res: ExportResult
               ) -> tuple[list[tuple[str, str, float, str, str]], list[dict]]:
        """(clicks, rejected entries) of a batch read from the stream."""
        rows, bad = [], []
        for sid, f in entries:
            if not f:                                  # deleted after it was read
                res.vanished += 1
                continue
            try:
                user, item, ts, event = (f[k] for k in ENTRY_FIELDS)
                int(ts)                                # the pod's clock: kept in the stream only
                # a click's time is Redis's, from its entry id: one clock for every pod, so a
                # pod whose clock runs ahead cannot move partitions, `newest`, the training
                # window or what retention deletes
                rows.append((user, item, _id(sid)[0] / 1000.0, event, sid))
            except (KeyError, ValueError, TypeError) as e:
                bad.append({"stream": self.stream, "id": sid, "fields": f,
                            "why": f"not a click: {type(e).__name__}: {e}"})
        return rows, bad

    def _reject(self, bad: list[dict], res: ExportResult) -> None:
        path = self.out / "rejected" / f"{self._file_prefix()}{bad[0]['id']}.jsonl"
        with atomic_open(path) as f:
            f.write("".join(json.dumps(b, default=str) + "\n" for b in bad).encode())
        res.rejected += len(bad)
        res.rejected_files.append(str(path.relative_to(self.out)))

    def handle(self, entries, res: ExportResult) -> None:
        rows, bad = self._split(entries, res)
        if bad:
            self._reject(bad, res)
        by_part: dict[str, list[tuple[str, str, float, str, str]]] = {}
        for row in rows:
            by_part.setdefault(partition(row[2]), []).append(row)
        for part, prow in by_part.items():
            known = self._known.get(part)
            if known is None:
                known = self._known[part] = _ids_in(self.out / part)
                while len(self._known) > KNOWN_PARTITIONS:
                    self._known.popitem(last=False)
            self._known.move_to_end(part)
            fresh = []
            for u, i, ts, eid, _sid in prow:
                if (u, eid) in known:
                    res.skipped += 1
                    continue
                known.add((u, eid))
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

    def _snapshot(self) -> tuple[dict, dict]:
        """XINFO STREAM and this group's XINFO GROUPS entry, read atomically (one script)."""
        raw = self.r.eval(_SNAPSHOT, 1, self.stream)
        stream = dict(zip(raw[0][::2], raw[0][1::2]))
        groups = [dict(zip(g[::2], g[1::2])) for g in raw[1]]
        return stream, next((g for g in groups if g.get("name") == self.group), {})

    def _gap(self) -> tuple[int, str] | None:
        """Before reading: (entries the group never read, at least, of those up to the
        stream's last id; that id), or None. Redis counts the group's lag as entries added
        minus entries read, so it keeps counting entries trimmed or deleted unread; the live
        ones this run reads are subtracted from it afterwards."""
        info, g = self._snapshot()
        last = str(info.get("last-generated-id") or "0-0")
        if g.get("lag") is not None:
            behind = int(g["lag"])
            return (behind, last) if behind else None
        # Redis cannot count past a deletion: then only whether one happened, unread
        deleted = str(info.get("max-deleted-entry-id") or "0-0")
        delivered = str(g.get("last-delivered-id") or "0-0")
        return (-1, last) if _id(deleted) > _id(delivered) else None

    def _run_one(self, res: ExportResult, progress: Callable[[int], None] | None) -> None:
        from redis.exceptions import ResponseError

        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        trim = Keys.trim(self.stream)
        counted = self.r.hmget(trim, [LOST, REPORTED])
        new_lost = int(counted[0] or 0) - int(counted[1] or 0)
        gap = self._gap()
        # entries another run read but never acknowledged, once idle long enough that it is
        # not still working on them, become this run's
        start = "0-0"
        while True:
            start, claimed, *_ = self.r.xautoclaim(self.stream, self.group, self.consumer,
                                                   min_idle_time=self.claim_idle_ms,
                                                   start_id=start, count=self.batch)
            if start in ("0-0", b"0-0"):
                break
        unread = 0                   # entries read as new, up to the stream's end at the check
        for new in ("0", ">"):       # first this consumer's pending entries, then the new ones
            while True:
                got = self.r.xreadgroup(self.group, self.consumer, {self.stream: new},
                                        count=self.batch)
                entries = got[0][1] if got else []
                if not entries:
                    break
                if new == "0":
                    res.taken_over += len(entries)
                elif gap is not None:
                    unread += sum(1 for sid, _ in entries if _id(sid) <= _id(gap[1]))
                self.handle(entries, res)
                if progress is not None:
                    progress(res.read)
        if gap is not None:
            res.gap += 1 if gap[0] < 0 else max(0, gap[0] - unread)     # -1: at least one
            self.r.eval(_REBASE, 1, self.stream, self.group)       # reported: out of the lag
        if new_lost > 0:
            res.lost_to_cap += new_lost
            self.r.hincrby(trim, REPORTED, new_lost)


def export_clicks(redis_url: str, out: Path | str, streams: list[str] | str = DEFAULT_STREAM,
                  group: str = DEFAULT_GROUP, consumer: str | None = None,
                  password: str | None = None, batch: int = 5000,
                  progress: Callable[[int], None] | None = None,
                  cluster: bool = False, claim_idle_s: float = CLAIM_IDLE_S) -> ExportResult:
    """`sine export-clicks`: everything the streams hold that the group has not exported;
    `cluster`: `redis_url` is a node of a Redis Cluster."""
    from redis.exceptions import RedisError

    from service.history.clients import sync_client

    try:
        client = sync_client(redis_url, password=password, timeout_s=30, cluster=cluster)
    except (RedisError, OSError) as e:
        raise ClickLogError(f"the click log at {redact_url(redis_url)}: {e}") from None
    try:
        return Exporter(client, streams, group, consumer or f"export-{socket.gethostname()}",
                        Path(out), batch, claim_idle_s).run(progress)
    except (RedisError, OSError) as e:
        raise ClickLogError(f"the click log at {redact_url(redis_url)}: {e}") from None
    finally:
        client.close()


def _partitions(folder: Path) -> Iterator[tuple[Path, float]]:
    """(folder, the time its hour ends) of every `date=/hour=` partition."""
    import calendar

    for d in sorted(folder.glob("date=*/hour=*")):
        try:
            day = time.strptime(d.parent.name[len("date="):], "%Y-%m-%d")
            hour = int(d.name[len("hour="):])
        except ValueError:
            continue
        yield d, calendar.timegm(day) + (hour + 1) * 3600.0


def compact_partitions(folder: Path | str, before: float, drop_before: float | None = None
                       ) -> tuple[int, int]:
    """Each partition whose hour ended before `before` rewritten as one file (each click once),
    and those that ended before `drop_before` deleted. A crash between writing the new file and
    removing the old ones leaves duplicates, which every reader skips. Returns (compacted,
    dropped)."""
    import shutil

    import pyarrow.parquet as pq

    folder = Path(folder)
    compacted = dropped = 0
    for d, ends in _partitions(folder):
        if drop_before is not None and ends <= drop_before:
            shutil.rmtree(d)
            dropped += 1
            continue
        files = sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))
        if ends > before or len(files) < 2:
            continue
        rows: dict[tuple[str, str], tuple[str, str, float, str]] = {}
        for f in files:
            t = pq.read_table(f, columns=list(COLUMNS))
            for u, i, ts, eid in zip(*(t.column(c).to_pylist() for c in COLUMNS)):
                rows.setdefault((u, eid), (u, i, ts, eid))
        target = d / "part-compacted.parquet"
        _write(list(rows.values()), target)
        for f in files:
            if f != target:
                f.unlink()
        compacted += 1
    for day in folder.glob("date=*"):
        if day.is_dir() and not any(day.iterdir()):
            day.rmdir()
    return compacted, dropped
