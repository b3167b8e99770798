"""The load-test runner as CI runs it: a short load with thresholds and a shortened Redis fault
against a real server, and a threshold that fails the run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    """A bundle trained briefly on the default synthetic data (what the runner loads)."""
    from devtools.demo import build_bundle
    from model_export import data

    root = tmp_path_factory.mktemp("load") / "bundles"
    build_bundle(data.load("synthetic"), root, minutes=0.1, log=lambda *a: None)
    return root


def run(args, out, timeout=300):
    return subprocess.run([sys.executable, "-m", "loadtests.run", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_ci_scenarios_pass_and_write_reports(demo_bundle, tmp_path):
    r = run(["ci", "--bundle", str(demo_bundle), "--users", "8", "--rate", "5"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert all(s["ci-load"]["rules"].values()) and all(s["ci-redis-fault"]["rules"].values())
    fault = s["ci-redis-fault"]["record"]["fault"]
    assert fault["answers_during_outage"] > 0 and fault["personalized_after_s"] <= 2
    for name in ("load", "redis-fault"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0, name
        for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", "_stages.csv",
                       ".html"):
            assert (tmp_path / "raw" / f"{name}{suffix}").stat().st_size > 0, name + suffix
    stages = (tmp_path / "raw" / "load_stages.csv").read_text()
    assert "encode," in stages and "history," in stages
    recorded = s["ci-load"]["record"]["stages"]
    assert recorded["encode"]["count"] > 0 and recorded["history"]["p99_ms"] > 0


def test_a_failed_threshold_fails_the_run(demo_bundle, tmp_path):
    r = run(["load", "--bundle", str(demo_bundle), "--duration", "4", "--users", "2",
             "--p99-ms", "0.001"], tmp_path)
    assert r.returncode == 1
    assert "[FAIL] load: p99 <= 0.001 ms" in r.stdout


def test_the_hostile_clients_are_cut_off_and_counted(small_world, serve):
    """The hostile scenario's clients against a real server with short deadlines."""
    import asyncio

    from loadtests.hostile import run as hostile
    from service.settings import Settings

    s = Settings(bundle=str(small_world["root"]), watch_interval_s=0, header_timeout_s=0.5,
                 body_timeout_s=0.5)
    with serve(s) as c:
        got = asyncio.run(hostile(c.port, 3.0, small_world["ds"].user_ids[:50], slow=5,
                                  batch_clients=1, batch_users=256))
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).status_code == 200
    assert got["slow-header"]["statuses"] == {"408": got["slow-header"]["closed"]}
    assert got["slow-body"]["statuses"] == {"408": got["slow-body"]["closed"]}
    assert got["slow-header"]["closed"] >= 10 and got["slow-header"]["lifetime_max_s"] < 1.5
    assert got["slow-body"]["lifetime_max_s"] < 1.5
    assert set(got["big-header"]["statuses"]) == {"431"}
    assert set(got["batch"]["statuses"]) <= {"200", "429"} and got["batch"]["closed"] > 0
