"""Online equals offline: every ML-1M user's history into Redis, every user asked over HTTP.

Loads each user's clicks before the test target (`sine load-histories --holdout 1`) into an
embedded redis-server, starts `sine serve` on the bundle, asks `/recommend` (n = 50) for every
user, and scores the answers against the test targets. The offline figures are the bundle's own
(`manifest.json`, from `sine evaluate`: full ranking, all past items excluded). With
`history_keep` large enough to hold every history, `exclude_seen` removes the same items as the
offline protocol, so the two must agree; `history_keep = 20` excludes only the 20 newest clicks
and is reported beside it (`benchmarks.seen_filter` measures the lengths between).

    python -m benchmarks.online_eval --bundle runs/bundles
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

import httpx

from benchmarks.common import git_commit, machine, now, write_results
from devtools.local import Stack
from index_builder import bundle as bundle_mod
from model_export import data

KS = (10, 50)


async def ask_all(url: str, users: list[str], n: int, concurrency: int,
                  arms: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Every user's answer (item ids); `arms`, when given, is filled with each user's arm."""
    out: dict[str, list[str]] = {}
    sem = asyncio.Semaphore(concurrency)
    fallbacks = 0

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        async def one(u: str):
            nonlocal fallbacks
            async with sem:
                r = await c.post("/recommend", json={"user_id": u, "n": n})
                r.raise_for_status()
                body = r.json()
                fallbacks += body["fallback"] is not None
                out[u] = [x["item_id"] for x in body["items"]]
                if arms is not None:
                    arms[u] = body["arm"]
        await asyncio.gather(*(one(u) for u in users))
    if fallbacks:
        raise SystemExit(f"{fallbacks} users were answered from a fallback: histories missing")
    return out


def score(answers: dict[str, list[str]], targets: dict[str, str]) -> dict[str, float]:
    m = {f"{k}@{c}": 0.0 for c in KS for k in ("HR", "NDCG")}
    for u, t in targets.items():
        got = answers[u]
        if t in got:
            r = got.index(t)
            for c in KS:
                if r < c:
                    m[f"HR@{c}"] += 1
                    m[f"NDCG@{c}"] += 1 / math.log2(r + 2)
    return {k: v / len(targets) for k, v in m.items()}


def run(bundle: str, keep: int, ds, targets, log_path: Path) -> tuple[dict, float]:
    with Stack(data.histories(ds, holdout=1), keep=keep) as stack:
        srv = stack.serve(bundle, log_path=log_path, max_n=50, history_keep=keep,
                          redis_timeout_ms=2000, watch_interval_s=0)
        t0 = time.perf_counter()
        answers = asyncio.run(ask_all(srv.url, list(targets), 50, 16))
        secs = time.perf_counter() - t0
    return score(answers, targets), secs


def ml1m_targets(bundle: str, data_dir: str | None
                 ) -> tuple[bundle_mod.Bundle, data.Dataset, dict[str, str]]:
    """The bundle, ML-1M (refused unless the bundle was trained on its vocabulary), and each
    user's test target."""
    b = bundle_mod.load(bundle, deep=False)
    ds = data.load("ml-1m", data_dir)
    if ds.vocab_sha256() != b.manifest["items"]["vocab_sha256"]:
        raise SystemExit("the bundle was not trained on this ML-1M vocabulary")
    return b, ds, {u: ds.item_ids[int(s[-1])] for u, s in zip(ds.user_ids, ds.sequences)}


def hits_by_arm(answers: dict[str, list[str]], targets: dict[str, str], arms: dict[str, str],
                cut: int) -> dict[str, tuple[float, float, int]]:
    """{arm: (HR@cut, its standard error, users)}."""
    out = {}
    for arm in sorted(set(arms.values())):
        users = [u for u in targets if arms[u] == arm]
        h = [targets[u] in answers[u][:cut] for u in users]
        p = sum(h) / len(h)
        out[arm] = (p, math.sqrt(p * (1 - p) / len(h)), len(h))
    return out


def run_arms(root: Path, control: bundle_mod.Bundle, weights: dict[str, float], ds, targets,
             out: str, offline_hits: dict[str, Path] | None = None) -> None:
    """One live service with candidate arms beside control, the whole history kept: each arm's
    HR@10 and HR@50 with its standard error, against its own bundle's offline figure."""
    longest = max(len(s) for s in ds.sequences)
    arms: dict[str, str] = {}
    with Stack(data.histories(ds, holdout=1), keep=longest) as stack:
        srv = stack.serve(str(root), log_path=Path(out) / ".server.log", max_n=50,
                          history_keep=longest, redis_timeout_ms=2000, watch_interval_s=0,
                          arms=json.dumps(weights), default_mode="aggregate")
        answers = asyncio.run(ask_all(srv.url, list(targets), 50, 16, arms))
    (Path(out) / ".server.log").unlink(missing_ok=True)
    bundles = {"control": control, **{v: bundle_mod.load(root / v, deep=False) for v in weights}}
    cmd = (f"python -m benchmarks.online_eval --bundle {root} --arms "
           + ",".join(f"{v}={w:g}" for v, w in weights.items()))
    rows, payload = [], {}
    same = []
    for arm, path in (offline_hits or {}).items():
        # the run's own per-user test hits (benchmarks.accuracy's test_hits.npz, data set order)
        import numpy as np
        offline = dict(zip(ds.user_ids, np.load(path)["agg@50"].tolist(), strict=True))
        users = [u for u in targets if arms[u] == arm]
        online = {u: targets[u] in answers[u][:50] for u in users}
        differ = sum(online[u] != offline[u] for u in users)
        payload[f"{arm}/per_user"] = {"users": len(users), "differ": differ}
        same.append(f"- {arm}: of its {len(users):,} users, {differ} have another HR@50 hit online "
                    f"than in the offline evaluation of the same model (`{path.name}` of its run): "
                    f"online {100 * sum(online.values()) / len(users):.2f}, offline on the same "
                    f"users {100 * sum(offline[u] for u in users) / len(users):.2f}.")
    for cut in KS:
        for arm, (p_, se, n) in hits_by_arm(answers, targets, arms, cut).items():
            off = bundles[arm].manifest["offline_metrics"]["test"][f"HR@{cut}"]
            # a share of the users against the whole population's figure
            se_diff = se * math.sqrt(max(1 - n / len(targets), 0.0))
            agree = abs(p_ - off) <= 2 * se_diff
            payload[f"{arm}/HR@{cut}"] = {"online": p_, "se": se, "users": n, "offline": off,
                                          "agrees": agree}
            rows.append(f"| {arm} (`{bundles[arm].version}`) | HR@{cut} | {n:,} | "
                        f"{100 * p_:.2f} ± {100 * se:.2f} | {100 * off:.2f} | "
                        f"{100 * (p_ - off):+.2f} | {'yes' if agree else 'NO'} |")
    md = [f"# Online evaluation by arm (ML-1M, {len(targets):,} users over HTTP)", "",
          f"{now()}; commit {git_commit()[:10]}; `{cmd}`. Every user's history before the test "
          "target kept (and excluded), n = 50, the aggregate search (what the manifests' offline "
          "figures measure); each user answered by the arm its hash assigns.",
          "", "| arm | metric | users | online ± SE | offline (whole population) | "
          "difference | within 2 SE |", "|---|---|---|---|---|---|---|", *rows, "",
          "The offline figure is the bundle's own (`manifest.json`, every test user); an arm "
          "answers a share of them, so the difference is held to 2 standard errors of that "
          "share's mean around the population's.", *([""] + same if same else [])]
    write_results(out, "online-arms", {"weights": weights, "results": payload, "command": cmd,
                                       "machine": machine(), "commit": git_commit(),
                                       "when": now()}, md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="runs/demo/bundles", help="bundle root or folder")
    p.add_argument("--data-dir", help="data folder (default ../shared/data)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--arms", help="VERSION=WEIGHT,...: candidate versions under the bundle root "
                                  "served beside current; reports HR by arm (online-arms.md)")
    p.add_argument("--offline-hits", help="ARM=PATH,...: a run's test_hits.npz per arm (control "
                                          "for current), compared user by user")
    a = p.parse_args()

    b, ds, targets = ml1m_targets(a.bundle, a.data_dir)
    if a.arms:
        weights = {v: float(w) for v, w in (x.split("=") for x in a.arms.split(","))}
        hits = ({k: Path(v) for k, v in (x.split("=") for x in a.offline_hits.split(","))}
                if a.offline_hits else None)
        run_arms(Path(a.bundle), b, weights, ds, targets, a.out, hits)
        return
    offline = {k: b.manifest["offline_metrics"]["test"][k] for k in
               (f"{m}@{c}" for c in KS for m in ("HR", "NDCG"))}
    longest = max(len(s) for s in ds.sequences)
    rows = {}
    for keep in (longest, 20):
        metrics, secs = run(str(b.path), keep, ds, targets, Path(a.out) / ".server.log")
        rows[keep] = {"metrics": metrics, "seconds": secs}
        print(keep, metrics, f"{secs:.1f} s")
    full = rows[longest]["metrics"]
    diff = {k: 100 * (full[k] - offline[k]) for k in offline}
    ok = all(abs(v) <= 0.2 for v in diff.values())
    cmd = "python -m benchmarks.online_eval --bundle " + a.bundle
    md = [f"# Online equals offline (ML-1M, {len(targets):,} users over HTTP)", "",
          f"Bundle `{b.version}` ({b.manifest['index']['factory']}); {now()}; commit "
          f"{git_commit()[:10]}; `{cmd}`", "",
          "| evaluation (test, percent) | HR@10 | NDCG@10 | HR@50 | NDCG@50 |", "|---|---|---|---|---|",
          "| offline (`sine evaluate`, all past items excluded) | "
          + " | ".join(f"{100 * offline[k]:.2f}" for k in offline) + " |",
          f"| online, history_keep = {longest} (whole history excluded) | "
          + " | ".join(f"{100 * full[k]:.2f}" for k in offline) + " |",
          "| online minus offline | " + " | ".join(f"{diff[k]:+.2f}" for k in offline) + " |",
          "| online, history_keep = 20 (20 newest excluded) | "
          + " | ".join(f"{100 * rows[20]['metrics'][k]:.2f}" for k in offline) + " |", "",
          f"Within 0.2 points: **{'yes' if ok else 'NO'}**. 6,040 requests took "
          f"{rows[longest]['seconds']:.1f} s (whole history) and {rows[20]['seconds']:.1f} s "
          f"(20 newest), 16 concurrent httpx clients on the same machine."]
    write_results(a.out, "online-offline", {
        "bundle": b.version, "offline": offline, "online": {str(k): v for k, v in rows.items()},
        "diff_points": diff, "within_0.2": ok, "command": cmd, "machine": machine(),
        "commit": git_commit(), "when": now()}, md)
    (Path(a.out) / ".server.log").unlink(missing_ok=True)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
