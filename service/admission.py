"""Admission by the work a request brings: one unit per user it asks about.

A request is admitted once its body is in and validated (`Guard` reads the body first, under a
deadline), and holds its units until it is answered; beyond its pool's limit it is refused at
once with 429. Three pools, so that no kind of call can take the units another needs: single
requests (`/recommend`: `max_in_flight`), the users of bulk `/recommend/batch` calls
(`max_batch_in_flight`; in a micro-batch single requests go first) and events (`/events`:
`max_events_in_flight`; a Redis write stall holds events, never reads). A batch larger than its
pool's limit is admitted only when nothing else of its pool is in flight, so it is never
refused forever.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from .errors import Overloaded

Pool = Literal["single", "bulk", "events"]
WHAT = {"single": "requests", "bulk": "users of batches", "events": "events"}


class Admission:
    """Units in flight per pool, each with its limit."""
    def __init__(self, limit: int, bulk_limit: int, events_limit: int):
        self.limits: dict[Pool, int] = {"single": limit, "bulk": bulk_limit, "events": events_limit}
        self.held: dict[Pool, int] = {"single": 0, "bulk": 0, "events": 0}   # units held now

    @property
    def in_flight(self) -> int:
        return sum(self.held.values())

    @contextmanager
    def admit(self, n: int = 1, pool: Pool = "single") -> Iterator[None]:
        """Hold `n` units of the pool while the block runs, or raise Overloaded (429) at once."""
        held, limit = self.held[pool], self.limits[pool]
        if held and held + n > limit:
            raise Overloaded(f"{held} {WHAT[pool]} are in flight (limit {limit}); this one "
                             f"brings {n}. Retry shortly.", {"Retry-After": "1"})
        self.held[pool] += n
        try:
            yield
        finally:
            self.held[pool] -= n
