"""Realistic traffic for the retrieval service (locust, FastHttpUser).

- `/recommend` (most requests): user ids drawn Zipf-like from the users whose histories are
  loaded, a share of never-seen ids (cold start), `n` drawn from what ranking stages ask for,
  now and then `per_interest` mode;
- `/events`: a click of a known user on a catalog item;
- `/recommend/batch`: a handful of users in one call.

The service's `Server-Timing` header (history, queue, encode, search, filter, or popularity for
fallbacks) is collected per stage beside locust's own statistics (`Traffic.stages`, written by
the runner to `<scenario>_stages.csv`). Every `/recommend` answer's
`fallback` flag is kept with its time, for the fault scenarios' pass rules.

Standalone: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --traffic-file
traffic.json` where traffic.json is `{"users": [...], "items": [...]}`; `loadtests/run.py`
writes one and drives every scenario.
"""
from __future__ import annotations

import json
import random
import time

from locust import FastHttpUser, events, task
from locust.exception import StopUser


class Traffic:
    """What the users draw from; set by the runner or from --traffic-file."""
    users: list[str] = []
    items: list[str] = []
    unknown_share = 0.05
    zipf_s = 1.1
    n_choices = (10, 20, 50, 100)
    n_weights = (0.1, 0.2, 0.3, 0.4)
    per_interest_share = 0.1
    batch_size = 8
    log: list[tuple] = []          # (t, user, fallback, status, version, ms) per /recommend
    stages: dict[str, list[float]] = {}                               # stage -> server ms
    keep_log = False
    _cum: list[float] = []

    @classmethod
    def configure(cls, users: list[str], items: list[str], **kw) -> None:
        cls.users, cls.items = list(users), list(items)
        for k, v in kw.items():
            setattr(cls, k, v)
        w = [1.0 / (r + 1) ** cls.zipf_s for r in range(len(cls.users))]
        total, acc = sum(w), 0.0
        cls._cum = []
        for x in w:
            acc += x / total
            cls._cum.append(acc)

    @classmethod
    def user(cls) -> str:
        if not cls.users or random.random() < cls.unknown_share:
            return f"unknown-{random.randrange(10**9)}"
        import bisect
        return cls.users[min(bisect.bisect_left(cls._cum, random.random()), len(cls.users) - 1)]


@events.init_command_line_parser.add_listener
def _args(parser):
    parser.add_argument("--traffic-file", default="", help="JSON {users: [...], items: [...]}")


@events.test_start.add_listener
def _load_traffic(environment, **kw):
    opts = environment.parsed_options
    path = getattr(opts, "traffic_file", "") if opts else ""
    if path and not Traffic.users:
        t = json.loads(open(path).read())
        Traffic.configure(t["users"], t["items"])


def _stages(header: str | None) -> None:
    if not header:
        return
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            Traffic.stages.setdefault(name, []).append(float(dur))


class SineUser(FastHttpUser):
    """One client of the service; `wait_time` is set by the runner's load shape."""

    def _check(self, r, accept=(200,)) -> dict | None:
        if r.status_code in accept:
            r.success()
        elif r.status_code == 429:
            r.failure("429 overloaded")
        else:
            r.failure(f"{r.status_code}: {r.text[:200]}")
        try:
            return r.json() if r.status_code == 200 else None
        except ValueError:
            r.failure("200 without JSON")
            return None

    @task(80)
    def recommend(self):
        user = Traffic.user()
        body = {"user_id": user, "n": random.choices(Traffic.n_choices, Traffic.n_weights)[0]}
        if random.random() < Traffic.per_interest_share:
            body["mode"] = "per_interest"
        t0 = time.perf_counter()
        with self.client.post("/recommend", json=body, name="/recommend",
                              catch_response=True) as r:
            ms = (time.perf_counter() - t0) * 1000
            out = self._check(r)
            _stages(r.headers.get("server-timing"))
            if out is not None and len(out["items"]) != body["n"]:
                r.failure(f"asked {body['n']} items, got {len(out['items'])}")
            if Traffic.keep_log:
                Traffic.log.append((time.time(), user, out["fallback"] if out else None,
                                    r.status_code, out["version"] if out else None, ms))

    @task(10)
    def event(self):
        if not Traffic.users or not Traffic.items:
            raise StopUser()
        body = {"user_id": random.choice(Traffic.users), "item_id": random.choice(Traffic.items)}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as r:
            self._check(r)

    @task(10)
    def batch(self):
        reqs = [{"user_id": Traffic.user(), "n": 20} for _ in range(Traffic.batch_size)]
        with self.client.post("/recommend/batch", json={"requests": reqs},
                              name="/recommend/batch", catch_response=True) as r:
            out = self._check(r)
            if out is not None and len(out["results"]) != len(reqs):
                r.failure("batch answered a different number of users")
