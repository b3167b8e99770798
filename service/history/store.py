"""User histories in Redis: one list per user, newest click first, capped at `history_keep`.

A micro-batch reads all its users in one round trip (one LRANGE each) through `ListReader`; on
a Redis Cluster, one per master, each with its own deadline, and a master that fails costs only
its own users (`ClusterMap`). An event updates the user's history and appends to the click log
stream in one atomic script (`RECORD`), which also trims the stream, never past what the export
group has acknowledged unless the cap is told to win, and then counting what it removed.
Events, pings and the click log's gauges use redis-py. After a refused or broken connection,
the reads (or the writes: each path its own pause) skip that Redis (or master) for
`redis_retry_after_ms`, then try again; an error Redis answers with (out of memory, a key of
another type) and a timeout pause nothing, so a failing event never switches reads off. A
connection that a restarted Redis closed is reconnected once, at once, instead of failing the
call, and a read connection that stopped answering is replaced (`resp`). Every error of a
client library surfaces as `HistoryError`.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from index_builder.bundle import SineError

from ..keys import LOST, REPORTED, Keys
from ..settings import Settings
from .clients import async_client
from .cluster import ClusterMap
from .resp import ListReader

T = TypeVar("T")


class HistoryError(SineError, RuntimeError):
    """Redis could not answer in time, or answered with an error."""


class ClickLogFull(HistoryError):
    """The click log is at its hard cap with nothing exported to trim: the event was refused
    and nothing was written."""


def redis_client(settings: Settings, timeout_s: float) -> Any:
    """An asyncio client for `redis_url`: a bounded blocking pool, or a cluster client (bulk
    loading; the request path keeps its own map of a cluster)."""
    url = settings.redis_url
    if url is None:
        raise HistoryError("no Redis URL is configured (SINE_REDIS_URL)")
    pw = settings.redis_password.get_secret_value() if settings.redis_password else None
    return async_client(url, password=pw, timeout_s=timeout_s, cluster=settings.redis_cluster,
                        pool_size=settings.redis_pool_size)


# One event, atomically: the history update and the click log entry both happen or neither.
# A script rather than MULTI because an event_id seen before must write nothing, a condition a
# transaction cannot express; the type checks come first so that no command fails half-way.
# KEYS: history list, click stream, the stream's counters (`<stream>:trim`) and, when the client
# sent an id, the event-id key (on a cluster all in one slot: Keys gives them one hash tag).
# ARGV: item, keep, user, event id, time ms, log on, max len, max age ms, trim mode, export
# group, id ttl ms, hard max len, overflow mode, history ttl ms.
# Trimming (only once the stream is over its cap, or its oldest entry past the age limit, by
# Redis's clock against the ids Redis assigns): never below the export group's oldest pending
# entry or past its last delivered one. With mode `cap` the cap then wins, exactly, and every
# entry it removes is added to the counters' `lost`.
# The hard cap (nothing acknowledged left to trim, or no export group at all) either refuses the
# event before anything is written, or trims the oldest entries, counting them as `lost`.
# Counted as lost is what was never delivered to the export group: an entry delivered and not
# yet acknowledged is in an export's hands, and is written by it (one that crashed finds it
# gone and counts it as vanished).
# Returns {1, length}, {-1, length} for a repeated event_id, {-2, key} for a key of another type,
# {-3, stream length} for an event the full click log refused.
RECORD = """
local function typeof(k) return redis.call('TYPE', k).ok end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
-- the export group's XINFO fields, or nil without the group
local function group_info(stream, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then return f end
  end
  return nil
end
-- the first id the group has not acknowledged: every entry below it was delivered and acked
local function acked_below(stream, group)
  local f = group_info(stream, group)
  if not f then return nil end
  if tonumber(f['pending']) > 0 then
    return redis.call('XPENDING', stream, group)[2]
  end
  local ms, seq = parse(f['last-delivered-id'])
  if ms == 0 and seq == 0 then return nil end
  return string.format('%d-%d', ms, seq + 1)
end

-- the group's last delivered id ('0-0' without the group): entries past it were never read
local function delivered(stream, group)
  local f = group_info(stream, group)
  return f and f['last-delivered-id'] or '0-0'
end
-- how many entries lie after `last` and before `upto`, both exclusive: the never-delivered
-- ones a trim to `upto` removes (a delivered, unacknowledged entry is in an export's hands)
local function undelivered(stream, last, upto)
  if not less(last, upto) then return 0 end
  local n, from = 0, '(' .. last
  while true do
    local page = redis.call('XRANGE', stream, from, '(' .. upto, 'COUNT', 1000)
    n = n + #page
    if #page < 1000 then return n end
    from = '(' .. page[#page][1]
  end
end
-- trim `stream` to its newest `n` entries; returns how many never-delivered ones went
local function cap_to(stream, n, last)
  local excess = redis.call('XLEN', stream) - n
  if excess <= 0 then return 0 end
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess + 1)
  local lost = undelivered(stream, last, head[#head][1])
  redis.call('XTRIM', stream, 'MAXLEN', '=', n)
  return lost
end

local t = typeof(KEYS[1])
if t ~= 'none' and t ~= 'list' then return {-2, KEYS[1]} end
local log = ARGV[6] == '1'
if log then
  t = typeof(KEYS[2])
  if t ~= 'none' and t ~= 'stream' then return {-2, KEYS[2]} end
  t = typeof(KEYS[3])
  if t ~= 'none' and t ~= 'hash' then return {-2, KEYS[3]} end
end
local hard, refuse = tonumber(ARGV[12]), ARGV[13] == 'refuse'
if log and hard > 0 and refuse and redis.call('XLEN', KEYS[2]) >= hard then
  local safe = acked_below(KEYS[2], ARGV[10])
  if safe then redis.call('XTRIM', KEYS[2], 'MINID', '=', safe) end
  local n = redis.call('XLEN', KEYS[2])
  if n >= hard then return {-3, n} end
end
if #KEYS == 4 and not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[11]) then
  return {-1, redis.call('LLEN', KEYS[1])}
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
if tonumber(ARGV[14]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[14]) end
if log then
  local s = KEYS[2]
  redis.call('XADD', s, '*', 'user', ARGV[3], 'item', ARGV[1], 'ts', ARGV[5], 'event', ARGV[4])
  local maxlen, maxage, cap = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9] == 'cap'
  local over = maxlen > 0 and redis.call('XLEN', s) > maxlen
  local cut = nil
  if maxage > 0 then
    local now = redis.call('TIME')
    local cutms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - maxage
    local first = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)
    if #first > 0 and parse(first[1][1]) < cutms then cut = string.format('%d-0', cutms) end
  end
  if over or cut then
    local safe = acked_below(s, ARGV[10])
    if safe then
      local target = safe
      if cut and not over and less(cut, safe) then target = cut end
      redis.call('XTRIM', s, 'MINID', cap and '=' or '~', target)
    end
    if cap then
      local last = delivered(s, ARGV[10])
      local lost = 0
      if maxlen > 0 then lost = lost + cap_to(s, maxlen, last) end
      if cut then
        lost = lost + undelivered(s, last, cut)
        redis.call('XTRIM', s, 'MINID', '=', cut)
      end
      if lost > 0 then redis.call('HINCRBY', KEYS[3], 'lost', lost) end
    end
  end
  if hard > 0 and not refuse and redis.call('XLEN', s) > hard then
    local lost = cap_to(s, hard, delivered(s, ARGV[10]))
    if lost > 0 then redis.call('HINCRBY', KEYS[3], 'lost', lost) end
  end
end
return {1, redis.call('LLEN', KEYS[1])}
"""
RECORD_SHA = hashlib.sha1(RECORD.encode()).hexdigest()


@dataclass(frozen=True)
class StreamInfo:
    """The click log's figures for /metrics."""
    entries: int               # in every stream of the log
    lag: int                   # not yet read by the export group (all of a stream without it)
    lost: int                  # unexported entries a cap removed, ever


def _timeout(e: BaseException) -> bool:
    return isinstance(e, (asyncio.TimeoutError, TimeoutError, RedisTimeout))


def _broken(e: BaseException) -> bool:
    """A refused or broken connection (what pauses a path), not a timeout or an error reply."""
    return isinstance(e, (RedisConnectionError, OSError)) and not _timeout(e)


def _path(op: str) -> str:
    """The pause an operation shares: events write, everything else reads."""
    return "write" if op == "write" else "read"


class HistoryStore:
    """Reads of users' histories, the event script and the click log's gauges."""
    def __init__(self, settings: Settings, on_error: Callable[[str], None] | None = None):
        self.s = settings
        self.keep = settings.history_keep
        self.timeout = settings.redis_timeout_ms / 1000
        self.write_timeout = settings.redis_write_timeout_ms / 1000
        self.retry_after = settings.redis_retry_after_ms / 1000
        self._down_until = {"read": 0.0, "write": 0.0}    # each path's pause
        self._on_error = on_error or (lambda op: None)
        self.keys = Keys(settings)
        self._key = self.keys.history
        self._node_down_until: dict[str, float] = {}      # cluster: per master
        url = settings.redis_url
        if url is None:
            raise HistoryError("no Redis URL is configured (SINE_REDIS_URL)")
        pw = settings.redis_password.get_secret_value() if settings.redis_password else None
        longest = max(self.timeout, self.write_timeout)
        self.cluster = (ClusterMap(url, pw, longest, settings.redis_pool_size)
                        if settings.redis_cluster else None)
        self.client = None if self.cluster else redis_client(settings, longest)
        self.reader = None if self.cluster else ListReader(url, pw, self.timeout)

    def key(self, user_id: str) -> str:
        return self._key(user_id)

    async def start(self) -> None:
        """A cluster's first slot map; if no node answers now, it is retried in the background
        and requests fall back meanwhile."""
        if self.cluster is not None:
            try:
                await self.cluster.load()
            except Exception:
                self.cluster.failed()

    @property
    def available(self) -> bool:
        """The read path is not paused."""
        return time.monotonic() >= self._down_until["read"]

    async def _call(self, op: str, coro: Coroutine[Any, Any, T], timeout: float | None = None,
                    node: str | None = None) -> T:
        path = _path(op)
        # a ping is a probe: it tries Redis whatever the pause, and leaves the pause as it is
        if self.cluster is None and op != "ping" and time.monotonic() < self._down_until[path]:
            coro.close()
            raise HistoryError("Redis failed recently; retrying after a pause")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await coro
        except ClickLogFull:                 # Redis answered: a refusal of ours, not a failure
            raise
        except Exception as e:
            # whatever the client library raises is this store's error. A refused or broken
            # connection pauses its path (on a cluster that master alone, and the map is re-read
            # in the background); a timeout does not: it is already bounded, and a stall of this
            # process (a bundle loading beside it) would otherwise switch personalization off
            # for everyone; nor does an error reply (a full Redis, a key of another type): the
            # connection works, and one bad event must not switch reads off
            if self.cluster is not None:
                self.cluster.failed()
                if node is not None and _broken(e):
                    self._node_down_until[node] = time.monotonic() + self.retry_after
            elif _broken(e):
                self._down_until[path] = time.monotonic() + self.retry_after
            self._on_error(op)
            raise HistoryError(f"Redis {op} failed: {type(e).__name__}: {e}") from e

    async def get_many(self, user_ids: list[str]) -> list[list[str] | None]:
        """Each user's history, newest first ([] when the user has no key), in one round trip;
        on a cluster one per master, concurrently, and None for the users of a master that
        failed (only when every one failed is it an error)."""
        if self.cluster is not None:
            return await self._get_many_cluster(user_ids)
        assert self.reader is not None
        got: list[list[str] | None] = await self._call("read", self.reader.lranges(  # type: ignore[arg-type]
            [self._key(u) for u in user_ids], self.keep - 1))
        return got

    async def _get_many_cluster(self, user_ids: list[str]) -> list[list[str] | None]:
        assert self.cluster is not None
        keys = [self._key(u) for u in user_ids]
        by_node: dict[str, list[int]] = {}
        out: list[list[str] | None] = [None] * len(keys)
        try:
            for i, k in enumerate(keys):
                by_node.setdefault(self.cluster.node_of(k).name, []).append(i)
        except KeyError as e:                    # no map yet, or a slot no master serves
            self.cluster.failed()
            self._on_error("read")
            raise HistoryError(f"Redis read failed: {e}") from None
        now = time.monotonic()
        paused = [name for name in by_node if self._node_down_until.get(name, 0.0) > now]
        for name in paused:             # a master that failed just now: its users fall back
            del by_node[name]
        if not by_node:
            raise HistoryError("every master of these users failed recently; retrying after a "
                               "pause")

        async def one(name: str, idx: list[int]) -> list[list[str]]:
            reader = self.cluster.nodes[name].reader  # type: ignore[union-attr]
            async with asyncio.timeout(self.timeout):   # each master its own deadline
                return await reader.lranges([keys[i] for i in idx], self.keep - 1)

        names, groups = list(by_node), list(by_node.values())
        got = await asyncio.gather(*(one(n, g) for n, g in zip(names, groups)),
                                   return_exceptions=True)
        failed = []
        for name, idx, res in zip(names, groups, got):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                failed.append(res)
                if not _timeout(res):
                    self._node_down_until[name] = now + self.retry_after
                continue
            for i, h in zip(idx, res):
                out[i] = h
        if failed:
            self.cluster.failed()
            self._on_error("read")          # counted, but the healthy masters keep serving
            if len(failed) == len(groups) and not paused:
                raise HistoryError(f"Redis read failed: {type(failed[0]).__name__}: "
                                   f"{failed[0]}") from failed[0]
        return out

    async def _script(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(RECORD_SHA, len(keys), *keys, *args)
        except NoScriptError:                # a restarted or new Redis: load it once
            return await client.eval(RECORD, len(keys), *keys, *args)

    async def append(self, user_id: str, item_id: str,
                     event_id: str | None = None) -> tuple[int, str, bool]:
        """Record a click: history and click log together, or neither; an `event_id` this user
        sent before is not recorded again. Returns (history length, event id, duplicate)."""
        s = self.s
        eid = event_id or uuid.uuid4().hex
        stream = self.keys.stream(user_id)
        keys = [self.key(user_id), stream, Keys.trim(stream)]
        if event_id:
            keys.append(self.keys.event(user_id, event_id))
        args = [item_id, self.keep, user_id, eid, int(time.time() * 1000),
                1 if s.click_log else 0, s.click_stream_max_len,
                int(s.click_stream_max_age_s * 1000), s.click_stream_trim, s.click_export_group,
                int(s.event_id_ttl_s * 1000), s.click_stream_hard_max_len,
                s.click_stream_overflow, int(s.history_ttl_s * 1000)]
        client, node = self.client, None
        if self.cluster is not None:
            try:
                n = self.cluster.node_of(keys[0])
            except KeyError as e:
                self.cluster.failed()
                raise HistoryError(f"Redis write failed: {e}") from None
            client, node = n.client, n.name

        async def run() -> tuple[int, str, bool]:
            status, length = await self._script(client, keys, args)
            if status == -2:
                raise RedisError(f"a key of this event holds another type: {length}")
            if status == -3:
                raise ClickLogFull(
                    f"the click log holds {length} entries, its hard cap "
                    "(SINE_CLICK_STREAM_HARD_MAX_LEN), and none of them is exported yet: "
                    "nothing was recorded. Run the export (`sine export-clicks`) or raise the cap")
            return int(length), eid, status == -1
        return await self._call("write", run(), self.write_timeout, node)

    async def stream_info(self, group: str) -> StreamInfo | None:
        """The click log's entries, the export group's lag and the entries lost to a cap,
        summed over its streams, or None when Redis cannot say now. Until the group has read a
        stream, all of that stream's entries count as lag."""
        if self.cluster is None and not self.available:
            return None
        streams = self.keys.streams()

        async def one(stream: str) -> tuple[int, int, int]:
            client: Any = (self.client if self.cluster is None
                           else self.cluster.node_of(stream).client)
            n = int(await client.xlen(stream))
            lost, reported = await client.hmget(Keys.trim(stream), [LOST, REPORTED])
            lost, unreported = int(lost or 0), int(lost or 0) - int(reported or 0)
            if not n:
                return 0, 0, lost
            lag = None
            for g in await client.xinfo_groups(stream):
                if g.get("name") == group:
                    # Redis counts lag as entries added minus read, the ones a cap removed
                    # unread included (until the export reports them), and leaves it unset when
                    # it cannot count (a deletion past what the group read): then all of the
                    # stream, an upper bound
                    lag = (max(0, int(g["lag"]) - unreported) if g.get("lag") is not None
                           else n)
            return n, n if lag is None else lag, lost

        try:
            async with asyncio.timeout(max(self.timeout, 0.01 * len(streams))):
                got = await asyncio.gather(*(one(st) for st in streams))
        except Exception:
            return None
        return StreamInfo(sum(g[0] for g in got), sum(g[1] for g in got),
                          sum(g[2] for g in got))

    async def memory_ratio(self) -> float | None:
        """Used memory over maxmemory (on a cluster, the fullest master's), or None when no
        maxmemory is set or Redis cannot say now."""
        clients: list[Any] = ([self.client] if self.cluster is None
                              else [m.client for m in self.cluster.masters()])
        try:
            async with asyncio.timeout(self.timeout * 2):
                infos = await asyncio.gather(*(c.info("memory") for c in clients))
        except Exception:
            return None
        ratios = [int(i["used_memory"]) / int(i["maxmemory"]) for i in infos
                  if int(i.get("maxmemory", 0))]
        return max(ratios) if ratios else None

    async def ping(self) -> None:
        """Redis answers, on the read path's own connection too (on a cluster: every master
        of the map). A read connection that does not answer is replaced."""
        if self.cluster is None:
            assert self.reader is not None

            async def both() -> None:
                await self.client.ping()  # type: ignore[union-attr]
                await self.reader.ping()  # type: ignore[union-attr]
            await self._call("ping", both(), 2 * self.timeout)   # the reader's own deadline first
            return
        masters = self.cluster.masters()
        if not masters:
            self.cluster.failed()
            raise HistoryError("Redis ping failed: the cluster's slot map is not loaded")

        async def all_masters() -> None:
            got = await asyncio.gather(*(m.client.ping() for m in masters),
                                       *(m.reader.ping() for m in masters),
                                       return_exceptions=True)
            got = [a if isinstance(a, BaseException) else b
                   for a, b in zip(got[:len(masters)], got[len(masters):])]
            bad = [m.name for m, r in zip(masters, got) if isinstance(r, BaseException)]
            if bad:
                raise RedisError(f"masters {', '.join(bad)} do not answer")
        await self._call("ping", all_masters())

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.client is not None:
            try:
                await self.client.aclose()
            except Exception:
                pass
