"""The micro-batch policy as a unit: what one turn of the loop gathers, caps, order, bulk items
yielding, late arrivals, errors, callers that went away, and the wait for company."""
import asyncio

import pytest

from service.batcher import Batcher


class Recorder:
    """A batch runner that records its batches; `gate` holds a batch open while it is set."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, items, waited):
        self.batches.append(list(items))
        assert len(waited) == len(items) and all(w >= 0 for w in waited)
        if self.gate is not None:
            await self.gate.wait()
        return [x * 10 if x >= 0 else ValueError(f"bad {x}") for x in items]


def run(coro):
    return asyncio.run(coro)


def test_what_arrives_in_one_turn_is_one_batch():
    """The first request finds the batcher idle and runs at once; the ones that arrive while it
    runs form the next batch."""
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=64)
        calls = [asyncio.ensure_future(b.submit([i])) for i in range(5)]
        while not rec.batches:
            await asyncio.sleep(0)
        rec.gate.set()
        return rec.batches, await asyncio.gather(*calls)
    batches, out = run(main())
    assert batches == [[0], [1, 2, 3, 4]]
    assert out == [[0], [10], [20], [30], [40]]


def test_an_idle_batcher_runs_a_single_item_in_its_callers_task():
    async def main():
        seen = []

        async def where(items, waited):
            seen.append(asyncio.current_task())
            return [x for x in items]
        b = Batcher(where, max_size=8)
        assert await b.submit([7]) == [7]
        busy = Batcher(where, max_size=8, max_wait_s=0.001)    # waits for company: no straight path
        assert await busy.submit([8]) == [8]
        return seen, asyncio.current_task()
    seen, me = run(main())
    assert seen[0] is me and seen[1] is not me


def test_batches_are_capped_and_first_come_first_served():
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=4)
        calls = [asyncio.ensure_future(b.submit([i])) for i in range(11)]
        while not rec.batches:
            await asyncio.sleep(0)
        rec.gate.set()
        return rec.batches, await asyncio.gather(*calls)
    batches, out = run(main())
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [o[0] for o in out] == [10 * i for i in range(11)]


def test_bulk_items_yield_to_single_requests():
    """A batch call's users wait in their own queue: single requests that come later still go
    first in the next micro-batch, never behind the whole list."""
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=4)
        bulk = asyncio.ensure_future(b.submit(list(range(100, 110)), bulk=True))
        await asyncio.sleep(0)
        while not rec.batches:                 # the first batch is running (gate closed)
            await asyncio.sleep(0)
        singles = [asyncio.ensure_future(b.submit([i])) for i in range(3)]
        await asyncio.sleep(0)
        rec.gate.set()
        out = await asyncio.gather(bulk, *singles)
        return rec.batches, out
    batches, out = run(main())
    assert batches[0] == [100, 101, 102, 103]
    assert batches[1] == [0, 1, 2, 104]        # the singles first, the room left for the bulk
    assert sorted(x for bt in batches for x in bt) == sorted([*range(100, 110), 0, 1, 2])
    assert out[0] == [10 * i for i in range(100, 110)] and out[1:] == [[0], [10], [20]]


def test_a_batch_holds_at_most_max_bulk_items_of_bulk_work():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_size=8, max_bulk=3)
        bulk = b.submit(list(range(100, 107)), bulk=True)
        singles = [b.submit([i]) for i in range(2)]
        await asyncio.gather(bulk, *singles)
        return rec.batches
    batches = run(main())
    assert batches[0] == [0, 1, 100, 101, 102]
    assert batches[1:] == [[103, 104, 105], [106]]


def test_arrivals_during_a_running_batch_form_the_next_one():
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=64)
        first = asyncio.ensure_future(b.submit([1]))
        while not rec.batches:                       # the first batch is running
            await asyncio.sleep(0)
        later = [asyncio.ensure_future(b.submit([i])) for i in (2, 3)]
        await asyncio.sleep(0)
        assert rec.batches == [[1]]                  # held open: nothing else ran
        rec.gate.set()
        return await first, await asyncio.gather(*later), rec.batches
    first, later, batches = run(main())
    assert first == [10] and later == [[20], [30]]
    assert batches == [[1], [2, 3]]


@pytest.mark.parametrize("turns, expect", [(4, [[1], [2, 3]]), (0, [[1], [2], [3]])])
def test_under_load_a_batch_waits_a_few_turns_for_late_arrivals(turns, expect):
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=64, gather_turns=turns)
        first = asyncio.ensure_future(b.submit([1]))
        while not rec.batches:
            await asyncio.sleep(0)
        queued = asyncio.ensure_future(b.submit([2]))       # waiting when batch 1 ends
        await asyncio.sleep(0)
        rec.gate.set()
        while not first.done():
            await asyncio.sleep(0)
        late = asyncio.ensure_future(b.submit([3]))         # turns after batch 1 ended
        await asyncio.gather(first, queued, late)
        return rec.batches
    assert run(main()) == expect


def test_a_multi_item_submission_keeps_its_order():
    async def main():
        b = Batcher(Recorder(), max_size=3)
        return await b.submit([5, 6, 7, 8, 9])
    assert run(main()) == [50, 60, 70, 80, 90]


def test_an_item_error_goes_to_that_item_and_a_run_error_to_the_batch():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_size=8)
        good, bad = await asyncio.gather(b.submit([1]), b.submit([-1]), return_exceptions=True)

        async def broken(items, waited):
            raise RuntimeError("encoder failed")
        b2 = Batcher(broken, max_size=8)
        errs = await asyncio.gather(b2.submit([1]), b2.submit([2]), return_exceptions=True)
        b2.run = rec                                 # the batcher works on after a failure
        return good, bad, errs, await b2.submit([3])
    good, bad, errs, after = run(main())
    assert good == [10] and isinstance(bad, ValueError) and "bad -1" in str(bad)
    assert [str(e) for e in errs] == ["encoder failed"] * 2
    assert after == [30]


def test_a_caller_that_has_gone_is_skipped():
    async def main():
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = Batcher(rec, max_size=8)
        busy = asyncio.ensure_future(b.submit([0]))  # runs at once, held open by the gate
        while not rec.batches:
            await asyncio.sleep(0)
        gone = asyncio.ensure_future(b.submit([1]))
        stays = asyncio.ensure_future(b.submit([2]))
        await asyncio.sleep(0)                       # both queued behind the running one
        gone.cancel()
        rec.gate.set()
        return await stays, await busy, rec.batches
    stays, busy, batches = run(main())
    assert stays == [20] and busy == [0] and batches == [[0], [2]]


@pytest.mark.parametrize("wait, expect", [(0.0, [[1], [2]]), (0.2, [[1, 2]])])
def test_max_wait_holds_a_small_batch_for_company(wait, expect):
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_size=8, max_wait_s=wait)
        first = asyncio.ensure_future(b.submit([1]))
        for _ in range(3):                           # a few turns of the loop, not a time
            await asyncio.sleep(0)
        await asyncio.gather(first, b.submit([2]))
        return rec.batches
    assert run(main()) == expect
