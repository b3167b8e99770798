"""Realistic traffic for the retrieval service (locust, FastHttpUser).

- `/recommend` (most requests): user ids drawn Zipf-like from the users whose histories are
  loaded, a share of never-seen ids (cold start), `n` drawn from what ranking stages ask for,
  now and then `per_interest` mode;
- `/events`: a click of a known user on a catalog item;
- `/recommend/batch`: a handful of users in one call.

The service's `Server-Timing` header (queue, history, window, encode, search, filter, answer, or popularity for
fallbacks) is collected per stage beside locust's own statistics (`Traffic.stages`, written by
the run's summary, and by the runner to `raw/<scenario>_stages.csv`). Every `/recommend` answer's
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
    """What the users draw from, and what their answers left behind: one instance per run, set
    on `SineUser.traffic` by the runner or from --traffic-file."""
    unknown_share = 0.05
    zipf_s = 1.1
    n_choices = (10, 20, 50, 100)
    n_weights = (0.1, 0.2, 0.3, 0.4)
    per_interest_share = 0.1
    batch_size = 8

    def __init__(self, users: list[str], items: list[str], keep_log: bool = False):
        self.users, self.items, self.keep_log = list(users), list(items), keep_log
        self.log: list[tuple] = []        # (t, user, fallback, status, version, ms) per /recommend
        self.stages: dict[str, list[float]] = {}                          # stage -> server ms
        w = [1.0 / (r + 1) ** self.zipf_s for r in range(len(self.users))]
        total, acc = sum(w), 0.0
        self._cum: list[float] = []
        for x in w:
            acc += x / total
            self._cum.append(acc)

    def fresh(self, keep_log: bool = False) -> Traffic:
        """The same users and items, with an empty log (one per scenario run)."""
        return Traffic(self.users, self.items, keep_log)

    def user(self) -> str:
        if not self.users or random.random() < self.unknown_share:
            return f"unknown-{random.randrange(10**9)}"
        import bisect
        return self.users[min(bisect.bisect_left(self._cum, random.random()), len(self.users) - 1)]

    def record_stages(self, header: str | None) -> None:
        if not header:
            return
        for part in header.split(","):
            name, _, dur = part.strip().partition(";dur=")
            if dur:
                self.stages.setdefault(name, []).append(float(dur))


@events.init_command_line_parser.add_listener
def _args(parser):
    parser.add_argument("--traffic-file", default="", help="JSON {users: [...], items: [...]}")


@events.test_start.add_listener
def _load_traffic(environment, **kw):
    opts = environment.parsed_options
    path = getattr(opts, "traffic_file", "") if opts else ""
    if path and SineUser.traffic is None:
        t = json.loads(open(path).read())
        SineUser.traffic = Traffic(t["users"], t["items"])


class SineUser(FastHttpUser):
    """One client of the service; `wait_time` is set by the runner's load shape, `traffic` by
    the runner (or --traffic-file)."""
    traffic: Traffic | None = None

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

    @property
    def t(self) -> Traffic:
        if self.traffic is None:
            raise StopUser()
        return self.traffic

    @task(80)
    def recommend(self):
        t = self.t
        user = t.user()
        body = {"user_id": user, "n": random.choices(t.n_choices, t.n_weights)[0]}
        if random.random() < t.per_interest_share:
            body["mode"] = "per_interest"
        t0 = time.perf_counter()
        with self.client.post("/recommend", json=body, name="/recommend",
                              catch_response=True) as r:
            ms = (time.perf_counter() - t0) * 1000
            out = self._check(r)
            t.record_stages(r.headers.get("server-timing"))
            if out is not None and len(out["items"]) != body["n"]:
                r.failure(f"asked {body['n']} items, got {len(out['items'])}")
            if t.keep_log:
                t.log.append((time.time(), user, out["fallback"] if out else None,
                                    r.status_code, out["version"] if out else None, ms))

    @task(10)
    def event(self):
        t = self.t
        if not t.users or not t.items:
            raise StopUser()
        body = {"user_id": random.choice(t.users), "item_id": random.choice(t.items)}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as r:
            self._check(r)

    @task(10)
    def batch(self):
        t = self.t
        reqs = [{"user_id": t.user(), "n": 20} for _ in range(t.batch_size)]
        with self.client.post("/recommend/batch", json={"requests": reqs},
                              name="/recommend/batch", catch_response=True) as r:
            out = self._check(r)
            if out is not None and len(out["results"]) != len(reqs):
                r.failure("batch answered a different number of users")
