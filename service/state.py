"""What one app holds while it runs: built once by `create_app`, read by the routes through
`service.deps` and by the bundle lifecycle."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from index_builder import bundle as bundle_mod

from . import errors
from .admission import Admission
from .arms import Arms, Shadow
from .engine import Engine
from .history import HistoryStore
from .metrics import Metrics
from .recommender import Recommender
from .settings import Settings
from .tracing import Tracing


@dataclass
class State:
    """Everything one app holds while it runs."""
    settings: Settings
    metrics: Metrics
    store: HistoryStore | None
    recommender: Recommender
    admission: Admission
    engine: Engine | None = None
    not_ready: str | None = "the bundle is still loading"
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    floor_body: bytes = b""
    tracing: Tracing | None = None        # None unless OTEL_TRACES_EXPORTER asks for traces
    unserved_since: float | None = field(default_factory=time.monotonic)   # None while serving
    arms: Arms = field(default_factory=lambda: Arms("sine"))
    freshness_task: asyncio.Future[None] | None = None   # the scrape-time reading (lifecycle)
    freshness_at: float = 0.0                            # when it started (monotonic)
    shadow: Shadow | None = None

    @classmethod
    def of(cls, settings: Settings) -> State:
        metrics = Metrics()
        store = (HistoryStore(settings, on_error=lambda op: metrics.redis_errors.labels(op).inc())
                 if settings.redis_url else None)
        arms = Arms(settings.arm_salt)
        st = cls(settings, metrics, store, Recommender(settings, metrics, store, arms),
                 Admission(settings.max_in_flight, settings.max_batch_in_flight,
                           settings.max_events_in_flight),
                 tracing=Tracing.of(settings.otel_traces_exporter), arms=arms)
        st.shadow = Shadow(st)
        return st

    @property
    def bundle_root(self) -> Path | None:
        """The bundle root, or None when `bundle` is one bundle folder (a pinned version). A
        folder that is not a bundle is a root, `current` or not yet."""
        p = Path(self.settings.bundle)
        return None if (p / bundle_mod.MANIFEST).exists() and not (p / bundle_mod.CURRENT).exists() \
            else p

    def engine_for(self, user_id: str) -> Engine:
        """The engine of the user's arm (control without arms)."""
        return self.arms.pick(user_id, self.serving())

    def serving(self) -> Engine:
        if self.engine is None:
            raise errors.NotReady(f"No bundle is being served: {self.not_ready}.",
                                  {"Retry-After": "5"})
        return self.engine
