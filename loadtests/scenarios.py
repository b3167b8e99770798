"""The scenarios, each a shape of load with what happens during it and its pass rules:
`{record, rules}` per result name (`run_scenario`); `merge_repeats` folds repeated runs."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import gevent

from loadtests.runner import ReadyProbe, events_refused, failed, histogram, pct, quantile, run_locust, server_errors
from loadtests.system import System


def scenario_load(sys_: System, a, out: Path, seconds: float | None = None) -> dict:
    rec = run_locust("load", sys_.server.url, out, [(seconds or a.duration, a.users, a.rate)],
                     system=sys_)
    rules = {"no errors": rec["failures"] == 0,
             f"p99 <= {a.p99_ms} ms": (rec["p99_ms"] or 0) <= a.p99_ms}
    return {"record": rec, "rules": rules}


def scenario_max(sys_: System, a, out: Path) -> dict:
    steps = [int(x) for x in a.max_steps.split(",")]
    results = []
    for u in steps:
        rec = run_locust(f"max-{u}", sys_.server.url, out, [(a.step_seconds, u, None)],
                         reports=False)
        results.append({"users": u, "rps": rec["rps"], "p50_ms": rec["p50_ms"],
                        "p99_ms": rec["p99_ms"], "failures": rec["failures"]})
        print(f"  max: {u} users -> {rec['rps']:.0f} req/s, p50 {rec['p50_ms']} p99 "
              f"{rec['p99_ms']} ms, {rec['failures']} failures", flush=True)
    ok = [r for r in results if r["failures"] == 0]
    best = max(ok, key=lambda r: r["rps"]) if ok else None
    return {"record": {"steps": results, "max_rps": best["rps"] if best else 0},
            "rules": {"an error-free step exists": best is not None}}


def scenario_soak(sys_: System, a, out: Path, max_rps: float | None) -> dict:
    target = a.soak_rate or (max_rps or 0) / 2
    if not target:
        raise SystemExit("soak needs --soak-rate or a max run first")
    users = 16
    rec = run_locust("soak", sys_.server.url, out, [(a.soak_minutes * 60, users, target / users)],
                     system=sys_)
    rss = [r["rss_mb"] for r in rec["series"] if "rss_mb" in r]
    warm = max(1, int(len(rss) * 0.1))          # growth measured after the first tenth
    first = statistics.median(rss[warm: warm + 30]) if len(rss) > warm else float("nan")
    last = statistics.median(rss[-30:]) if rss else float("nan")
    growth = (last - first) / first if first else float("nan")
    rec["rss"] = {"first_mb": first, "last_mb": last, "growth": growth, "target_rps": target}
    return {"record": rec, "rules": {"no errors": rec["failures"] == 0,
                                     "RSS growth < 5%": growth < 0.05}}


def outage_answers(sys_: System, rec: dict, down: float, up: float, settle_s: float,
                   late_s: float) -> tuple[list, int, float | None, list]:
    """What the loaded users were answered around an outage from `down` to `up`: the answers
    from `settle_s` after it began until it ended, how many of them were flagged
    history_unavailable, when the first personalized one came after it, and the answers from
    `late_s` after it on."""
    known = set(sys_.traffic.users)
    log = [x for x in rec["log"] if x[1] in known]
    during = [x for x in log if down + settle_s <= x[0] < up]
    flagged = sum(1 for x in during if x[2] == "history_unavailable")
    first_ok = next((x[0] for x in log if x[0] >= up and x[2] is None), None)
    return during, flagged, first_ok, [x for x in log if x[0] >= up + late_s]


def scenario_redis_fault(sys_: System, a, out: Path, kill_at: float = 15, down_s: float = 10,
                         total: float = 40) -> dict:
    marks = {}

    def kill():
        """kill -9 redis-server"""
        marks["down"] = time.time()
        sys_.redis.kill()

    def back():
        """restart redis-server (it reloads its snapshot)"""
        sys_.redis.start()
        marks["up"] = time.time()

    with ReadyProbe(sys_.server.url) as ready:
        rec = run_locust("redis-fault", sys_.server.url, out, [(total, a.users, a.rate)],
                         events_at={kill_at: kill, kill_at + down_s: back}, system=sys_,
                         keep_log=True)
    during, flagged, first_ok, late = outage_answers(sys_, rec, marks["down"], marks["up"], 0.5,
                                                     2.0)
    outage = ready.summary(marks["down"], marks["up"])
    rec["fault"] = {"answers_during_outage": len(during), "flagged": flagged,
                    "readyz_probes_during_outage": outage["probes"],
                    "readyz_not_200": ready.summary()["not_200"],
                    "personalized_after_s": (first_ok - marks["up"]) if first_ok else None,
                    "unpersonalized_2s_after": sum(1 for x in late if x[2] is not None),
                    "events_refused_503": events_refused(rec)}
    rec.pop("log")
    f = rec["fault"]
    return {"record": rec, "rules": {
        "no failed /recommend or /recommend/batch (no 5xx)": failed(rec) == 0,
        "outage answers flagged history_unavailable": bool(during) and flagged == len(during),
        "/readyz 200 throughout (readiness is local)": outage["probes"] > 0
        and f["readyz_not_200"] == 0,
        "personalized within 2 s of Redis returning": first_ok is not None
        and f["personalized_after_s"] <= 2.0 and f["unpersonalized_2s_after"] == 0}}


def scenario_cluster_failover(bundle: str, a, out: Path, work: Path, kill_at: float = 10,
                              total: float = 30) -> dict:
    """A Redis Cluster (3 masters, 3 replicas, 1 s node timeout) under load; the master of one
    user's slots is SIGKILLed and its replica promoted."""
    from service.history import Keys
    from service.settings import Settings

    sys_ = System(bundle, a.data_dir, Path(tempfile.mkdtemp(dir=work, prefix="cluster-")),
                  a.server_tree, cluster=True, **a.settings)
    cl = sys_.cluster
    keys = Keys(Settings(redis_cluster=True))
    probe = keys.history(sys_.traffic.users[0])
    victim = cl.master_of(probe)
    masters = cl.masters()
    on_victim = {u for u in sys_.traffic.users if cl.master_of(keys.history(u), masters) is victim}
    marks: dict[str, float] = {}

    def kill():
        """kill -9 the master of a third of the users; its replica takes over"""
        marks["down"] = time.time()
        victim.kill()

        def watch():
            cl.wait_failover(probe, timeout_s=60)
            marks["promoted"] = time.time()
        gevent.spawn(watch)

    try:
        with ReadyProbe(sys_.server.url) as ready:
            rec = run_locust("redis-cluster-failover", sys_.server.url, out,
                             [(total, a.users, a.rate)], events_at={kill_at: kill},
                             system=sys_, keep_log=True)
    finally:
        sys_.stop()
    known = set(sys_.traffic.users)                   # the mix also sends unknown (cold) users
    log = [x for x in rec.pop("log") if x[3] == 200 and x[1] in known]
    down, up = marks["down"], marks.get("promoted", float("inf"))
    mine = [x for x in log if x[1] in on_victim]
    rest = [x for x in log if x[1] not in on_victim]
    # the replicas wait the node timeout (1 s) before they elect: until then the master is down
    during = [x for x in mine if down + 0.1 <= x[0] < down + 1.0]
    beside = [x for x in rest if down <= x[0] < up]
    last_flagged = max((x[0] for x in mine if x[0] >= down and x[2] is not None), default=down)
    after = [x for x in mine if x[0] > last_flagged]
    rec["failover"] = {
        "victim_users": len(on_victim), "users": len(sys_.traffic.users),
        "promoted_after_s": up - down, "recovered_after_s": last_flagged - down,
        "victim_answers_during": len(during),
        "victim_flagged_during": sum(1 for x in during if x[2] == "history_unavailable"),
        "other_answers_during": len(beside),
        "other_personalized_during": sum(1 for x in beside if x[2] is None),
        "other_unpersonalized_at_s": [round(x[0] - down, 2) for x in beside if x[2] is not None],
        "victim_answers_after": len(after),
        "readyz_probes_during": ready.summary(down, up)["probes"],
        "readyz_not_200": ready.summary()["not_200"],
        "events_refused_503": events_refused(rec)}
    f = rec["failover"]
    return {"record": rec, "rules": {
        "no failed /recommend or /recommend/batch (no 5xx)": failed(rec) == 0,
        "replica promoted within 10 s": f["promoted_after_s"] <= 10,
        "/readyz 200 throughout (readiness is local)": f["readyz_probes_during"] > 0
        and f["readyz_not_200"] == 0,
        "victim users' answers flagged history_unavailable while it is down": bool(during)
        and f["victim_flagged_during"] == len(during),
        "other masters' users personalized throughout": bool(beside)
        and f["other_personalized_during"] == len(beside),
        "victim users personalized within 2 s of the promotion": f["recovered_after_s"]
        <= f["promoted_after_s"] + 2.0 and f["victim_answers_after"] > 0}}


def scenario_reload(sys_: System, a, out: Path, total: float = 40) -> dict:
    new, bad = sys_.version + "-r1", sys_.version + "-broken"

    def good():
        """publish a new version; the service hot-reloads it"""
        sys_.publish_copy(new)

    def broken():
        """publish a corrupt version; it must be refused"""
        sys_.publish_copy(bad, corrupt=True)

    rec = run_locust("reload", sys_.server.url, out, [(total, a.users, a.rate)],
                     events_at={total * 0.3: good, total * 0.6: broken}, system=sys_,
                     keep_log=True)
    versions = [x[4] for x in rec["log"] if x[4]]
    tail = versions[int(len(versions) * 0.8):]
    refused = sys_.metric("sine_reloads_total", outcome="refused")
    rec["reload"] = {"versions_seen": sorted(set(versions)), "refused": refused}
    rec.pop("log")
    return {"record": rec, "rules": {
        "no failed request": rec["failures"] == 0,
        "new version served": new in versions and bad not in versions,
        "after the broken one, the new one still serves": bool(tail) and set(tail) == {new},
        "broken bundle refused": refused >= 1}}


def scenario_overload(bundle: str, a, out: Path, work: Path) -> dict:
    sys_ = System(bundle, a.data_dir, Path(tempfile.mkdtemp(dir=work, prefix="overload-")),
                  a.server_tree,
                  **{**a.settings, "max_in_flight": a.overload_limit})
    scrape = {}

    def calm():
        """load drops; server-side latency of the admitted requests so far"""
        scrape["over"] = urllib.request.urlopen(sys_.server.url + "/metrics").read().decode()

    try:
        scrape["start"] = urllib.request.urlopen(sys_.server.url + "/metrics").read().decode()
        rec = run_locust("overload", sys_.server.url, out,
                         [(20, a.overload_users, None), (15, 4, 5.0)], system=sys_, keep_log=True,
                         events_at={20: calm})
    finally:
        sys_.stop()
    h0 = histogram(scrape["start"], "sine_request_duration_seconds", endpoint="recommend")
    h1 = histogram(scrape["over"], "sine_request_duration_seconds", endpoint="recommend")
    server_p50, server_p99 = quantile(h0, h1, 0.5) * 1000, quantile(h0, h1, 0.99) * 1000
    log = rec.pop("log")
    t0 = log[0][0] if log else 0
    over = [x for x in log if x[0] - t0 < 20]
    calm = [x for x in log if x[0] - t0 >= 22]          # after the step down
    refused = [x[5] for x in over if x[3] == 429]
    admitted = [x[5] for x in over if x[3] == 200]
    rec["overload"] = {"answers": len(over), "refused_429": len(refused),
                       "server_admitted_p50_ms_at_most": server_p50,
                       "server_admitted_p99_ms_at_most": server_p99,
                       "refused_p50_ms": pct(refused, 0.5), "refused_p99_ms": pct(refused, 0.99),
                       "admitted": len(admitted), "admitted_p50_ms": pct(admitted, 0.5),
                       "admitted_p99_ms": pct(admitted, 0.99),
                       "calm_answers": len(calm), "calm_429": sum(1 for x in calm if x[3] == 429),
                       "calm_p99_ms": pct([x[5] for x in calm], 0.99),
                       "other_errors": sum(1 for x in over + calm if x[3] not in (200, 429))}
    o = rec["overload"]
    return {"record": rec, "rules": {
        "429s under overload": len(refused) > 0,
        "nothing but 200 or 429": o["other_errors"] == 0,
        "429s answered faster than admitted requests (p50)": o["refused_p50_ms"]
        < o["admitted_p50_ms"],
        f"admitted p99 in the server <= {a.overload_p99_ms} ms": server_p99 <= a.overload_p99_ms,
        "no 429 once the load drops": bool(calm) and o["calm_429"] == 0}}


def scenario_hostile(sys_: System, a, out: Path, work: Path, seconds: float = 30) -> dict:
    """The same ordinary traffic twice, alone and beside hostile clients."""
    import subprocess

    users = work / "hostile-users.json"
    users.write_text(json.dumps(sys_.traffic.users))
    port = sys_.server.url.rsplit(":", 1)[1]
    url = sys_.server.url + "/metrics"
    scrape = [urllib.request.urlopen(url).read().decode()]
    alone = run_locust("hostile-alone", sys_.server.url, out, [(seconds, a.users, a.rate)],
                       system=sys_)
    scrape.append(urllib.request.urlopen(url).read().decode())
    summary_path = work / "hostile.json"
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.hostile", "--port", port,
                             "--seconds", str(seconds), "--users-file", str(users),
                             "--out", str(summary_path)], cwd=Path(__file__).resolve().parents[1])
    try:
        together = run_locust("hostile", sys_.server.url, out, [(seconds, a.users, a.rate)],
                              system=sys_)
        proc.wait(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    scrape.append(urllib.request.urlopen(url).read().decode())
    hostile = json.loads(summary_path.read_text())
    h = [histogram(t, "sine_request_duration_seconds", endpoint="recommend") for t in scrape]
    timeouts = {k: float(v) for k, v in (("header", 5.0), ("body", 10.0))}
    for k, v in sys_.settings.items():
        if k in ("header_timeout_s", "body_timeout_s"):
            timeouts[k.split("_")[0]] = float(v)
    fivexx = {name: server_errors(rec) for name, rec in (("alone", alone), ("hostile", together))}
    hostile_5xx = sum(n for kind in hostile.values() for st, n in kind.get("statuses", {}).items()
                      if st.startswith("5"))

    def p99(rec: dict) -> float:
        return rec["endpoints"].get("POST /recommend", {}).get("p99_ms") or float("nan")

    rec = {"alone": {k: v for k, v in alone.items() if k != "series"},
           "together": {k: v for k, v in together.items() if k != "series"},
           "hostile": hostile, "deadlines_s": timeouts,
           "recommend_p99_ms": {"alone": p99(alone), "together": p99(together)},
           "server_recommend_p99_ms_at_most": {
               "alone": quantile(h[0], h[1], 0.99) * 1000,
               "together": quantile(h[1], h[2], 0.99) * 1000},
           "requests": together["requests"], "failures": together["failures"],
           "rps": together["rps"], "p50_ms": together["p50_ms"], "p99_ms": together["p99_ms"]}
    rec["hostile_summary"] = {
        "recommend_p99_ratio": rec["recommend_p99_ms"]["together"] / rec["recommend_p99_ms"]["alone"],
        **{f"{k}_closed": v.get("closed", 0) for k, v in hostile.items()}}
    sh, sb = hostile.get("slow-header", {}), hostile.get("slow-body", {})
    bh, bt = hostile.get("big-header", {}), hostile.get("batch", {})
    return {"record": rec, "rules": {
        "no 5xx (ordinary and hostile)": fivexx["alone"] == 0 and fivexx["hostile"] == 0
        and hostile_5xx == 0,
        "no failed ordinary request": together["failures"] == 0 and alone["failures"] == 0,
        "ordinary /recommend p99 within 2x of the load alone":
        rec["recommend_p99_ms"]["together"] <= 2 * rec["recommend_p99_ms"]["alone"],
        "slow-header sockets closed by the header deadline (408)": sh.get("closed", 0) > 0
        and sh["lifetime_max_s"] <= timeouts["header"] + 1.5
        and set(sh["statuses"]) == {"408"},
        "slow-body sockets closed by the body deadline (408)": sb.get("closed", 0) > 0
        and sb["lifetime_max_s"] <= timeouts["header"] + timeouts["body"] + 1.5
        and set(sb["statuses"]) == {"408"},
        "oversized headers refused (431)": bh.get("closed", 0) > 0
        and set(bh["statuses"]) == {"431"},
        "256-user batches answered 200 or 429": bt.get("closed", 0) > 0
        and set(bt["statuses"]) <= {"200", "429"} and bt.get("errors", 0) == 0}}


def _fds(pid: int) -> tuple[int, int]:
    """(open descriptors, the soft limit) of process `pid`."""
    import os
    n = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return n, int(line.split()[3])
    return n, 0


def scenario_idle_sockets(sys_: System, a, out: Path, work: Path, seconds: float = 30,
                          sockets: int = 2000) -> dict:
    """The same ordinary traffic three times: alone; beside `sockets` idle and stuck sockets
    (`loadtests.idle`) opened two seconds in, the server's descriptors sampled throughout; and
    beside a stand-in that spends the attacker's CPU at its priority and opens no socket (the
    control: on one machine the attacker's CPU is taken from the server's cores)."""
    import subprocess

    pid = sys_.server.proc.pid
    alone = run_locust("idle-alone", sys_.server.url, out, [(seconds, a.users, a.rate)],
                       system=sys_)
    summary_path = work / "idle.json"
    port = sys_.server.url.rsplit(":", 1)[1]
    procs: list = []
    fds: list[int] = []
    limit = _fds(pid)[1]

    write_s = float(sys_.settings.get("write_timeout_s", 10.0))
    aborted_before = sys_.metric("sine_failures_total", reason="write-timeout")

    def flood():
        """the idle sockets start"""
        # at the lowest priority: the attacker's own CPU is a client's, not the server's cost,
        # though on this machine they share two cores (its CPU time is recorded)
        procs.append(subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "loadtests.idle", "--port", port,
             "--seconds",
             str(seconds - 2), "--sockets", str(sockets), "--hold-s", str(write_s + 3),
             "--out", str(summary_path)], cwd=Path(__file__).resolve().parents[1]))

    def sample():
        while True:
            try:
                fds.append(_fds(pid)[0])
            except OSError:
                return
            gevent.sleep(0.25)

    g = gevent.spawn(sample)
    try:
        together = run_locust("idle-sockets", sys_.server.url, out, [(seconds, a.users, a.rate)],
                              events_at={2: flood}, system=sys_)
        if procs:
            procs[0].wait(timeout=120)
    finally:
        g.kill()
        for p in procs:
            if p.poll() is None:
                p.kill()
    idle = json.loads(summary_path.read_text())
    attacker = idle.pop("attacker", {})
    # the control: the same traffic beside a process at the same priority that only spends the
    # attacker's CPU, so the record tells the server's cost of the sockets from the cores' share
    burn_path = work / "burn.json"

    def burner():
        """a CPU stand-in for the attacker starts"""
        procs.append(subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "loadtests.idle", "--port", port,
             "--seconds", str(seconds - 2), "--burn-cpu-s", str(attacker.get("cpu_s", 0.0)),
             "--out", str(burn_path)], cwd=Path(__file__).resolve().parents[1]))

    procs.clear()
    try:
        control = run_locust("idle-cpu-control", sys_.server.url, out,
                             [(seconds, a.users, a.rate)], events_at={2: burner}, system=sys_)
        if procs:
            procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stand_in = json.loads(burn_path.read_text())["attacker"] if burn_path.exists() else {}
    aborted = sys_.metric("sine_failures_total", reason="write-timeout") - aborted_before
    held = idle.pop("no-read-held", {}).get("errors", 0)
    deadlines = {"header": 5.0, "body": 10.0, "keep_alive": 5.0, "write": 10.0}
    for k, v in sys_.settings.items():
        if k in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "write_timeout_s"):
            deadlines[k.rsplit("_", 1)[0].replace("_timeout", "")] = float(v)
    # the server's sweep (service.server.ConnectionLimits.sweep_s), and a second of scheduling
    sweep = min(0.5, min(deadlines.values()) / 8) + 1.0
    within = {"idle": deadlines["header"] + sweep,
              "stray-byte": deadlines["body"] + 1.0 + sweep}     # the body deadline's grace

    def p99(rec: dict) -> float:
        return rec["endpoints"].get("POST /recommend", {}).get("p99_ms") or float("nan")

    rec = {"alone": {k: v for k, v in alone.items() if k != "series"},
           "together": {k: v for k, v in together.items() if k != "series"},
           "idle": idle, "attacker": attacker, "deadlines_s": deadlines, "closed_within_s": within,
           "no_read": {"held_past_the_deadline": held, "aborted_by_the_server": aborted},
           "sockets": sockets, "fds": {"max": max(fds) if fds else None, "limit": limit,
                                       "samples": len(fds)},
           "cpu_control": {k: v for k, v in control.items() if k != "series"},
           "cpu_stand_in": stand_in,
           "recommend_p99_ms": {"alone": p99(alone), "together": p99(together),
                                "beside_the_cpu_stand_in": p99(control)},
           "requests": together["requests"], "failures": together["failures"],
           "rps": together["rps"], "p50_ms": together["p50_ms"], "p99_ms": together["p99_ms"]}
    rec["idle_summary"] = {
        "recommend_p99_ratio": rec["recommend_p99_ms"]["together"] / rec["recommend_p99_ms"]["alone"],
        "recommend_p99_ratio_beside_the_cpu_stand_in":
            rec["recommend_p99_ms"]["beside_the_cpu_stand_in"] / rec["recommend_p99_ms"]["alone"],
        "attacker_cpu_s": attacker.get("cpu_s"), "stand_in_cpu_s": stand_in.get("cpu_s"),
        "fds_max": rec["fds"]["max"], "fds_limit": limit,
        **{f"{k}_closed": v.get("closed", 0) for k, v in idle.items()},
        **{f"{k}_lifetime_max_s": v.get("lifetime_max_s") for k, v in idle.items()}}
    capped = {k: v.get("statuses", {}).get("503", 0) for k, v in idle.items()}
    rec["idle_summary"]["refused_503_by_the_cap"] = sum(capped.values())
    return {"record": rec, "rules": {
        "no 5xx to ordinary traffic": server_errors(alone) == 0 and server_errors(together) == 0,
        "no failed ordinary request": together["failures"] == 0 and alone["failures"] == 0,
        "ordinary /recommend p99 within 2x of the load alone":
        rec["recommend_p99_ms"]["together"] <= 2 * rec["recommend_p99_ms"]["alone"],
        "open descriptors stayed under the process limit": bool(fds) and max(fds) < limit,
        "every idle socket closed within its deadline": all(
            idle.get(k, {}).get("closed", 0) > 0
            and idle[k]["lifetime_max_s"] <= within[k] for k in within),
        "every unread answer aborted at the write deadline": held > 0 and aborted >= held,
        "idle sockets answered 408, 503 (the cap) or cut, nothing else": all(
            set(v.get("statuses", {})) <= {"408", "503", "0"} for v in idle.values())}}


def scenario_redis_blackhole(sys_: System, a, out: Path, work: Path, silence_at: float = 10,
                             silent_s: float = 10, total: float = 35) -> dict:
    """Redis silenced mid-load through a TCP proxy (connections stay open, nothing answers: a
    vanished peer, a failover behind a stable address), then forwarding again."""
    marks: dict[str, float] = {}
    proxy = sys_.proxy
    health: list[tuple[float, int]] = []

    def silence():
        """the proxy stops forwarding (open connections and new ones)"""
        proxy.silence()
        marks["down"] = time.time()

    def forward():
        """the proxy forwards again"""
        proxy.forward()
        marks["up"] = time.time()

    def probe():
        while True:
            try:
                st = urllib.request.urlopen(sys_.server.url + "/health/redis", timeout=2).status
            except urllib.error.HTTPError as e:
                st = e.code
            except OSError:
                st = 0
            health.append((time.time(), st))
            gevent.sleep(0.25)

    g = gevent.spawn(probe)
    rss: list[float] = []
    try:
        rec = run_locust("redis-blackhole", sys_.server.url, out, [(total, a.users, a.rate)],
                         events_at={silence_at: silence, silence_at + silent_s: forward},
                         system=sys_, keep_log=True)
    finally:
        g.kill()
    rss = [r["rss_mb"] for r in rec["series"] if "rss_mb" in r]
    during, flagged, first_ok, late = outage_answers(sys_, rec, marks["down"], marks["up"], 1.0,
                                                     5.0)
    down_health = [st for t, st in health if marks["down"] + 1.0 <= t < marks["up"]]
    rec["blackhole"] = {
        "answers_while_silenced": len(during), "flagged": flagged,
        "health_probes_while_silenced": len(down_health),
        "health_200_while_silenced": sum(1 for st in down_health if st == 200),
        "personalized_after_s": (first_ok - marks["up"]) if first_ok else None,
        "unpersonalized_5s_after": sum(1 for x in late if x[2] is not None),
        "rss_mb": {"before": rss[0] if rss else None, "max": max(rss) if rss else None,
                   "after": rss[-1] if rss else None},
        "events_refused_503": events_refused(rec)}
    rec.pop("log")
    b = rec["blackhole"]
    return {"record": rec, "rules": {
        "no failed /recommend or /recommend/batch (no 5xx)": failed(rec) == 0,
        "answers while silenced flagged history_unavailable": bool(during)
        and flagged == len(during),
        "personalized within 5 s of the proxy forwarding": first_ok is not None
        and b["personalized_after_s"] <= 5.0 and b["unpersonalized_5s_after"] == 0,
        "/health/redis reported the read path down meanwhile": bool(down_health)
        and b["health_200_while_silenced"] == 0,
        "bounded memory (RSS within 20 % of its start)": bool(rss)
        and max(rss) <= 1.2 * rss[0]}}


def merge_repeats(runs: list[dict]) -> dict:
    """One result per scenario name: the last run's record, every run's rules and figures
    (`repeats`), and each rule passing only if it held in every run."""
    out = {}
    for name in runs[0]:
        reps = [r[name] for r in runs]
        last = dict(reps[-1])
        last["record"] = dict(last["record"])
        last["record"]["repeats"] = [
            {"rules": r["rules"], **{k: v for k, v in r["record"].items()
                                     if k in ("fault", "failover", "hostile_summary", "overload",
                                              "idle_summary", "blackhole",
                                              "requests", "failures", "p99_ms")}}
            for r in reps]
        last["rules"] = {f"{rule} (all {len(reps)} runs)": all(r["rules"][rule] for r in reps)
                         for rule in reps[0]["rules"]}
        out[name] = last
    return out


def run_scenario(s: str, sys_, a, out: Path, work: Path, summary: dict) -> dict:
    """{result name: {record, rules}} of one run of scenario `s`."""
    if s == "load":
        return {"load": scenario_load(sys_, a, out)}
    if s == "max":
        return {"max": scenario_max(sys_, a, out)}
    if s == "soak":
        mx = summary.get("max", {}).get("record", {}).get("max_rps")
        return {"soak": scenario_soak(sys_, a, out, mx)}
    if s == "redis-fault":
        return {"redis-fault": scenario_redis_fault(sys_, a, out)}
    if s == "reload":
        return {"reload": scenario_reload(sys_, a, out)}
    if s == "hostile":
        return {"hostile": scenario_hostile(sys_, a, out, work)}
    if s == "overload":
        return {"overload": scenario_overload(a.bundle, a, out, work)}
    if s == "redis-cluster-failover":
        return {s: scenario_cluster_failover(a.bundle, a, out, work)}
    if s == "idle-sockets":
        return {s: scenario_idle_sockets(sys_, a, out, work)}
    if s == "redis-blackhole":
        return {s: scenario_redis_blackhole(sys_, a, out, work)}
    # ci: shortened load and Redis fault
    return {"ci-load": scenario_load(sys_, a, out, seconds=15),
            "ci-redis-fault": scenario_redis_fault(sys_, a, out, kill_at=5, down_s=5, total=16)}
