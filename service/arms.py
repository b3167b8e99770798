"""Rollouts: candidate bundles served beside the live one (arms), and one answering off the
response path (the shadow).

A user's arm: u = a 64-bit hash of `arm_salt` and the user id, scaled to [0, 1), against the
candidates' cumulative weights in name order; the rest of [0, 1) is `control` (the bundle
`current` names, or the pinned one). The same user gets the same arm on every pod and after
restarts; changing one weight moves only the users between the old and the new cut.

The shadow takes a sample of `/recommend` requests through a bounded queue to one background
task, which answers them with the shadow bundle through the same request path and records the
overlap@n with what was served, its latency and its errors. Its work is dropped first: when the
queue is full, and when single requests hold half of `max_in_flight`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .engine import Engine
from .stages import Answer, Query

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("sine.service")
CONTROL = "control"
SERVING, REFUSED = "serving", "refused"
ANSWERED, DROPPED, FAILED = "answered", "dropped", "error"


def unit(salt: str, user_id: str) -> float:
    """The user's place in [0, 1): the same for the same salt and id, anywhere."""
    h = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


@dataclass(frozen=True)
class Arm:
    """A candidate bundle and its share of users; `engine` None when it was refused."""
    name: str
    weight: float
    engine: Engine | None
    reason: str | None = None

    @property
    def status(self) -> str:
        return SERVING if self.engine is not None else REFUSED


@dataclass(frozen=True)
class Layout:
    """The arms of one moment (replaced whole, never edited), with their cumulative cuts."""
    arms: tuple[Arm, ...] = ()
    shadow: Arm | None = None
    shadow_rate: float = 0.0

    @property
    def active_any(self) -> bool:
        """Any arm or a shadow configured (served or refused)."""
        return bool(self.arms) or self.shadow is not None

    @property
    def active(self) -> tuple[tuple[float, Engine], ...]:
        """(cut, engine) of each serving arm in name order: a user with u < cut is its."""
        out, cut = [], 0.0
        for a in sorted(self.arms, key=lambda a: a.name):
            if a.engine is not None:
                cut += a.weight
                out.append((cut, a.engine))
        return tuple(out)

    def describe(self) -> dict[str, object]:
        return {"arms": [{"name": a.name, "weight": a.weight, "status": a.status,
                          "reason": a.reason} for a in sorted(self.arms, key=lambda a: a.name)],
                "shadow": None if self.shadow is None else {
                    "name": self.shadow.name, "rate": self.shadow_rate,
                    "status": self.shadow.status, "reason": self.shadow.reason}}


class Arms:
    """The live layout, and the assignment of users to it."""

    def __init__(self, salt: str):
        self.salt = salt
        self.layout = Layout()
        self._cuts: tuple[tuple[float, Engine], ...] = ()

    def set(self, layout: Layout) -> None:
        self.layout, self._cuts = layout, layout.active

    @property
    def engines(self) -> list[Engine]:
        """Every loaded candidate and the shadow (to be reused by the next layout)."""
        arms = [*self.layout.arms, *([self.layout.shadow] if self.layout.shadow else [])]
        return [a.engine for a in arms if a.engine is not None]

    def pick(self, user_id: str, control: Engine) -> Engine:
        if not self._cuts:
            return control
        u = unit(self.salt, user_id)
        for cut, engine in self._cuts:
            if u < cut:
                return engine
        return control


def check_weights(weights: dict[str, float]) -> None:
    """Each weight in [0, 1], their sum at most 1 (ValueError naming the problem)."""
    for name, w in weights.items():
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"arm {name!r} has weight {w}; each must be in [0, 1]")
    if sum(weights.values()) > 1.0 + 1e-9:
        raise ValueError(f"the arms' weights sum to {sum(weights.values()):g}; at most 1, the "
                         "rest going to control")


class Shadow:
    """The shadow's queue and its one worker."""

    def __init__(self, st: State):
        self.st = st
        self.queue: asyncio.Queue[tuple[Query, Engine, np.ndarray]] = asyncio.Queue(
            st.settings.shadow_queue)
        self.rng = random.Random()
        self.task: asyncio.Task[None] | None = None

    def offer(self, q: Query, served: Engine, answer: Answer) -> None:
        """Maybe queue this request for the shadow; never waits, never raises."""
        layout = self.st.arms.layout
        shadow = layout.shadow
        if shadow is None or shadow.engine is None or answer.ids is None:
            return
        if self.rng.random() >= layout.shadow_rate:
            return
        try:
            self.queue.put_nowait((q, served, answer.ids))
        except asyncio.QueueFull:
            self.st.metrics.shadow.labels(shadow.name, DROPPED).inc()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        st = self.st
        while True:
            q, served, ids = await self.queue.get()
            shadow = st.arms.layout.shadow
            if shadow is None or shadow.engine is None:
                continue
            m = st.metrics
            if st.admission.held["single"] * 2 >= st.admission.limits["single"]:
                m.shadow.labels(shadow.name, DROPPED).inc()
                continue
            t0 = time.perf_counter()
            try:
                (answer,) = await st.recommender.recommend(shadow.engine, [q])
            except Exception as e:        # the shadow's failure is counted, never served
                m.shadow.labels(shadow.name, FAILED).inc()
                log.warning("shadow answer failed", extra={"arm": shadow.name, "reason": str(e)})
                continue
            m.shadow_seconds.labels(shadow.name).observe(time.perf_counter() - t0)
            m.shadow.labels(shadow.name, ANSWERED).inc()
            if answer.ids is not None and q.n:
                mine = {shadow.engine.bundle.item_ids()[i] for i in answer.ids.tolist()}
                theirs = {served.bundle.item_ids()[i] for i in ids.tolist()}
                m.shadow_overlap.labels(shadow.name).observe(len(mine & theirs) / q.n)
