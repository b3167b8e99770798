"""Admission by the work a request brings: one unit per user it asks about.

A request is admitted once its body is in and validated (`Guard` reads the body first, under a
deadline), and holds its units until it is answered; beyond its pool's limit it is refused at
once with 429. Two pools: single requests (`/recommend`, `/events`: `max_in_flight`) and the
users of `/recommend/batch` calls (`max_batch_in_flight`), so that bulk callers can never take
the units single requests need (and in a micro-batch single requests go first). A batch larger
than its pool's limit is admitted only when no other batch is in flight, so it is never refused
forever.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Overloaded


class Admission:
    """Units in flight per pool (single requests, bulk batch users), each with its limit."""
    def __init__(self, limit: int, bulk_limit: int):
        self.limits = {False: limit, True: bulk_limit}
        self.held = {False: 0, True: 0}           # units held now, single and bulk

    @property
    def in_flight(self) -> int:
        return self.held[False] + self.held[True]

    @contextmanager
    def admit(self, n: int = 1, bulk: bool = False) -> Iterator[None]:
        """Hold `n` units of the pool while the block runs, or raise Overloaded (429) at once."""
        held, limit = self.held[bulk], self.limits[bulk]
        if held and held + n > limit:
            what = "users of batches" if bulk else "requests"
            raise Overloaded(f"{held} {what} are in flight (limit {limit}); this one "
                             f"brings {n}. Retry shortly.", {"Retry-After": "1"})
        self.held[bulk] += n
        try:
            yield
        finally:
            self.held[bulk] -= n
