"""The served bundle's life: loaded at start-up, reloaded beside the live one and swapped,
`current` watched, and the freshness gauges read at scrape time.

Whatever fails while a bundle loads refuses it (409 from the admin route, a counter and a log
line) and the old one keeps serving; the watcher survives every error. It waits for a root's
first `current`, retries a version that failed to load (a passing fault) with backoff even when
`current` does not move, and retries a pinned bundle that failed at start-up until it loads;
`/livez` fails once no bundle has been served for `liveness_without_bundle_s`, so that the
orchestrator restarts a pod that cannot recover.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

from index_builder import bundle as bundle_mod

from . import errors
from .arms import CONTROL, Arm, Layout, check_weights
from .engine import Engine, EngineError, load_engine
from .history import HistoryError
from .stages import Query, render
from .state import State

log = logging.getLogger("sine.service")


def load(st: State, path: str | Path) -> Engine:
    """The bundle at `path`, opened and warmed with this app's settings."""
    s = st.settings
    return load_engine(path, providers=s.providers, allow_cpu_fallback=s.allow_cpu_fallback,
                       intra_op_threads=s.intra_op_threads, faiss_gpu=s.faiss_gpu,
                       search_params=s.search_params, warm_batch=s.batch_max_size,
                       faiss_threads=s.faiss_threads, index_mmap=s.index_mmap,
                       blas_vectors=s.faiss_blas_vectors,
                       dense_max_items=s.dense_search_max_items)


def reason(e: Exception) -> str:
    """Why a bundle could not be loaded, for readiness and the refusal."""
    return str(e) if isinstance(e, (EngineError, bundle_mod.BundleError)) \
        else f"{type(e).__name__}: {e}"


async def start(st: State) -> None:
    """The configured bundle, loaded before the port opens; a failure is readiness's reason.
    Then the configured arms and shadow (one that fails takes no traffic)."""
    s = st.settings
    try:
        serve(st, await asyncio.to_thread(load, st, s.bundle))
    except Exception as e:     # whatever it is, the reason is readiness's detail
        st.not_ready = reason(e)
        log.error("bundle not loaded; not ready", extra={"reason": st.not_ready})
    if s.arms or s.shadow:
        try:
            await set_arms(st, s.arms, s.shadow, s.shadow_rate)
        except errors.ServiceError as e:
            log.error("arms not set", extra={"reason": e.detail})


async def set_arms(st: State, weights: dict[str, float], shadow: str | None,
                   rate: float) -> Layout:
    """Load the candidates not loaded yet beside the live bundle, then make this the layout in
    one step. A candidate that cannot be loaded is refused (counted, logged, its reason kept)
    and takes no traffic: its users stay on control."""
    try:
        check_weights(weights)
        for name in [*weights, *([shadow] if shadow else [])]:
            bundle_mod.check_version(name)
    except (ValueError, bundle_mod.BundleError) as e:
        raise errors.BadRequest(str(e)) from None
    root = st.bundle_root
    if (weights or shadow) and root is None:
        raise errors.BadRequest(f"{st.settings.bundle} is a single bundle, not a bundle root: "
                                "arms are versions under a root.")
    async with st.reload_lock:
        have = {e.version: e for e in st.arms.engines}

        async def arm(name: str, weight: float) -> Arm:
            if name in have:
                return Arm(name, weight, have[name])
            try:
                eng = await asyncio.to_thread(load, st, root / name)  # type: ignore[operator]
            except Exception as e:         # whatever fails refuses the candidate alone
                st.metrics.reloads.labels("refused").inc()
                log.error("arm refused", extra={"arm": name, "reason": reason(e)})
                return Arm(name, weight, None, reason(e))
            eng.arm = name
            have[name] = eng
            return Arm(name, weight, eng)

        arms = tuple([await arm(n, w) for n, w in sorted(weights.items())])
        layout = Layout(arms, await arm(shadow, 0.0) if shadow else None, rate)
        st.arms.set(layout)
        log.info("arms set", extra={"arms": {a.name: a.weight for a in arms if a.engine},
                                    "shadow": shadow, "control": CONTROL})
        return layout


def serve(st: State, eng: Engine) -> None:
    """Make `eng` the served bundle."""
    st.engine, st.not_ready, st.unserved_since = eng, None, None
    m = eng.bundle.manifest
    st.metrics.set_bundle(eng.version, m["index"]["factory"], eng.n_items)
    if st.settings.floor_endpoint:
        n = st.settings.max_n
        st.floor_body = render(eng, Query("0", n), eng.popular[:n],
                               eng.popularity[eng.popular[:n]], None)
    if st.settings.gc_freeze:
        # what is loaded now lives as long as the bundle: keep it out of the collector's scans
        gc.collect()
        gc.freeze()


async def reload(st: State, version: str | None = None) -> Engine:
    """Load, validate and warm a bundle beside the live one, then swap. Whatever fails on the
    way is a refused bundle (409, counted, logged): the old one keeps serving."""
    async with st.reload_lock:
        path = _version_path(st, version)
        try:
            eng = await asyncio.to_thread(load, st, path)
        except Exception as e:       # an encoder ORT cannot parse, a manifest lacking a field...
            st.metrics.reloads.labels("refused").inc()
            why = reason(e)
            log.error("bundle refused", extra={"path": str(path), "reason": why})
            raise errors.ReloadRefused(f"{why} The served version is unchanged "
                                       f"({st.engine.version if st.engine else 'none'}).") from e
        old = st.engine
        serve(st, eng)                           # in-flight requests keep their reference to `old`
        st.metrics.reloads.labels("ok").inc()
        log.info("bundle swapped", extra={"old": old.version if old else None, "new": eng.version})
        return eng


def _version_path(st: State, version: str | None) -> Path:
    if version is None:
        return Path(st.settings.bundle)
    root = st.bundle_root
    if root is None:
        raise errors.ReloadRefused(f"{st.settings.bundle} is a single bundle, not a bundle root; "
                                   "a version cannot be chosen.")
    try:
        return root / bundle_mod.check_version(version)
    except bundle_mod.BundleError as e:
        raise errors.BadRequest(str(e)) from None


MAX_BACKOFF_S = 60.0


def backoff(interval_s: float, failures: int) -> float:
    """The wait before the next look: the interval, doubled per failure in a row, at most
    `MAX_BACKOFF_S` (or the interval, when that is longer)."""
    return float(min(interval_s * 2 ** min(failures, 16), max(interval_s, MAX_BACKOFF_S)))


async def watch(st: State) -> None:
    """Follow the root's `current` pointer, or retry a pinned bundle that is not served. Nothing
    that goes wrong ends the loop: a pointer that cannot be read (or is not there yet) is
    retried, a version that cannot be loaded is refused, counted and tried again with backoff,
    and a later good version is loaded."""
    root = st.bundle_root
    if root is None and st.engine is not None:
        return                               # a pinned bundle, served: nothing to follow
    st.metrics.watcher_up.set(1)
    # what is served, not what `current` says when this task first runs: a version published
    # between the start-up load and then would otherwise never be loaded
    last: str | None = st.engine.version if st.engine is not None else None
    failures, said = 0, None
    try:
        while True:
            await asyncio.sleep(backoff(st.settings.watch_interval_s, failures))
            try:
                if root is None:              # the pinned bundle failed at start-up: again
                    await reload(st)
                    return
                last = await _watch_step(st, root, last)
                failures, said = 0, None
            except Exception as e:
                failures += 1
                why = reason(e)
                if why != said:               # once per reason, not every interval
                    log.error("bundle watch step failed; watching on",
                              extra={"reason": why, "retry_in_s": backoff(
                                  st.settings.watch_interval_s, failures)})
                    said = why
    finally:
        st.metrics.watcher_up.set(0)


async def _watch_step(st: State, root: Path, last: str | None) -> str | None:
    """One look at `current`: reload when it moved, or when what it names is not what is
    served (a load that failed). Returns what it names now; a failed load raises."""
    cur = await asyncio.to_thread(bundle_mod.current_version, root)
    st.metrics.watch_time.set(time.time())
    _behind(st, cur)
    served = st.engine.version if st.engine is not None else None
    if cur == last and cur == served:
        return cur
    if cur != last:
        log.info("current pointer moved", extra={"current": cur})
    try:
        await reload(st)
    finally:
        _behind(st, cur)
    return cur


def _behind(st: State, current: str) -> None:
    served = st.engine.version if st.engine is not None else None
    st.metrics.behind_current.set(int(current != served))


def alive(st: State) -> str | None:
    """None while the process is worth keeping, else why not: no bundle served for longer
    than `liveness_without_bundle_s` (0: never said)."""
    limit = st.settings.liveness_without_bundle_s
    if st.unserved_since is None or not limit:
        return None
    gone = time.monotonic() - st.unserved_since
    if gone <= limit:
        return None
    return (f"no bundle has been served for {gone:.0f} s (SINE_LIVENESS_WITHOUT_BUNDLE_S = "
            f"{limit:g}): {st.not_ready}")


async def redis_ok(st: State) -> str | None:
    """None when Redis answers a ping, else why not (`sine_redis_up` follows)."""
    if st.store is None:
        return "not configured"
    try:
        await st.store.ping()
    except HistoryError as e:
        st.metrics.redis_up.set(0)
        return str(e)
    st.metrics.redis_up.set(1)
    return None


async def freshness(st: State) -> None:
    """The gauges read when /metrics is scraped: the bundle's age and the last refresh (local,
    every scrape), and Redis's (up, memory, the click log's length, the exporter's lag, the
    entries the cap removed unexported) at most once every `metrics_redis_every_s`: scrapes in
    between reuse the last reading and concurrent ones wait for the one in flight, so that a
    flood of scrapes costs Redis no more than one scrape that often."""
    m = st.metrics
    if st.engine is not None:
        born = bundle_mod.created_unix(st.engine.bundle.manifest)
        if born is not None:                  # unreadable: unknown, never a failed scrape
            m.bundle_age.set(time.time() - born)
    root = st.bundle_root
    if root is not None:
        report = bundle_mod.read_refresh_report(root)
        if report is not None:
            m.set_refresh(report)
    if st.store is None:
        return
    task = st.freshness_task
    every = st.settings.metrics_redis_every_s
    if task is None or (task.done() and time.monotonic() - st.freshness_at >= every):
        st.freshness_at = time.monotonic()
        task = st.freshness_task = asyncio.ensure_future(_redis_gauges(st))
    if not task.done():
        await asyncio.shield(task)


async def _redis_gauges(st: State) -> None:
    m, store = st.metrics, st.store
    assert store is not None
    await redis_ok(st)
    used = await store.memory_ratio()
    if used is not None:
        m.redis_memory.set(used)
    if st.settings.click_log:
        stream = await store.stream_info(st.settings.click_export_group)
        if stream is not None:
            m.stream_length.set(stream.entries)
            m.stream_lag.set(stream.lag)
            m.stream_lost.set(stream.lost)
