"""The micro-batch policy: what arrives while the event loop turns is answered together.

`Batcher` knows nothing of recommendation; `service.recommender` hands it the batch runner.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import chain
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    since: float


class Batcher(Generic[T, R]):
    """Runs `run(items, waited)` over the items submitted while the event loop turns.

    The first submission to an idle batcher schedules a drain for the next turn of the loop, so
    every request whose handler runs in this turn joins it; while a batch runs (its Redis read
    awaits), the next one gathers. At most `max_size` items a batch, first come first served;
    `max_wait_s` > 0 holds a batch smaller than `max_size` that long for company. `run` returns
    one result per item, or the exception for that item; an exception of `run` itself goes to
    every item of the batch. Items whose caller has gone (cancelled) are skipped.

    Under load (a queue left when a batch ends), the next batch first waits `gather_turns` turns
    of the loop, during which the previous answers are written and the requests that arrived
    meanwhile are parsed and join it.

    Items submitted as `bulk` (the users of a large `/recommend/batch` call) wait in a queue of
    their own and fill what room a batch has after the others, at most `max_bulk` of them: a
    single request waits for at most the batch running when it came, never behind a bulk
    caller's whole list, and that batch holds at most `max_bulk` users of bulk work.

    A single item submitted to an idle batcher (nothing running, nothing queued; no
    `max_wait_s`) runs at once in its caller's task, a batch of one with no hand-off: batching
    starts only when requests overlap. What arrives meanwhile queues, and is drained when it
    ends.
    """

    def __init__(self, run: Callable[[list[T], list[float]], Awaitable[list[R | BaseException]]],
                 max_size: int, max_wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, gather_turns: int = 4,
                 max_bulk: int | None = None):
        self.run, self.max_size, self.max_wait = run, max_size, max_wait_s
        self.max_bulk = max_size if max_bulk is None else max_bulk
        self.gather_turns = gather_turns
        self.on_batch = on_batch or (lambda size: None)
        self.queue: deque[_Waiting[T, R]] = deque()
        self.bulk: deque[_Waiting[T, R]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._busy = False             # a straight batch of one is running

    def __len__(self) -> int:
        return len(self.queue) + len(self.bulk)

    @property
    def idle(self) -> bool:
        return self._task is None and not self._busy and not len(self)

    async def submit(self, items: list[T], bulk: bool = False) -> list[R]:
        if len(items) == 1 and not bulk and not self.max_wait and self.idle:
            return [await self._straight(items[0])]
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = [loop.create_future() for _ in items]
        (self.bulk if bulk else self.queue).extend(
            _Waiting(x, f, now) for x, f in zip(items, futures))
        if self._task is None and not self._busy:
            self._task = loop.create_task(self._drain())
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _straight(self, item: T) -> R:
        self._busy = True
        try:
            self.on_batch(1)
            (r,) = await self.run([item], [0.0])
        finally:
            self._busy = False
            if len(self) and self._task is None:     # they came while it ran: under load
                self._task = asyncio.get_running_loop().create_task(self._drain(first=False))
        if isinstance(r, BaseException):
            raise r
        return r

    async def _drain(self, first: bool = True) -> None:
        try:
            while len(self):
                if self.max_wait and len(self) < self.max_size:
                    await asyncio.sleep(self.max_wait)
                elif not first and len(self) < self.max_size:
                    # under load: let the requests that came in while the last batch computed
                    # reach submit() (a request takes turns of the loop from its socket to here)
                    # and join; at 32 connections this took batches from 4 to 30 requests and
                    # throughput up by half (benchmarks/results/service.md). An idle batcher
                    # starts at once.
                    for _ in range(self.gather_turns):
                        await asyncio.sleep(0)
                first = False
                take = min(len(self.queue), self.max_size)
                rest = min(len(self.bulk), self.max_size - take, self.max_bulk)
                batch = [w for w in chain((self.queue.popleft() for _ in range(take)),
                                          (self.bulk.popleft() for _ in range(rest)))
                         if not w.future.done()]
                if not batch:
                    continue
                start = time.perf_counter()
                self.on_batch(len(batch))
                try:
                    results = await self.run([w.item for w in batch],
                                             [start - w.since for w in batch])
                except Exception as e:
                    results = [e] * len(batch)
                for w, r in zip(batch, results):
                    if w.future.done():
                        continue
                    if isinstance(r, BaseException):
                        w.future.set_exception(r)
                    else:
                        w.future.set_result(r)
        finally:
            self._task = None
