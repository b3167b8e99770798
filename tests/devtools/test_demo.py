"""`sine demo` end to end on synthetic data: build, serve, answer, stop; then reuse the bundle."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.local import free_port
from sine_cli.main import main

pytestmark = pytest.mark.slow


def test_demo_builds_serves_and_reuses(tmp_path, capsys):
    args = ["demo", "--dataset", "synthetic", "--workdir", str(tmp_path), "--train-minutes",
            "0.1", "--no-wait"]
    assert main(args + ["--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "training SINE on synthetic" in out and "started redis-server" in out
    assert 'POST /recommend {"user_id": "0", "n": 10}' in out and "fallback None" in out
    assert out.count("item ") >= 10                # titles printed beside the ids
    assert "/docs" in out and "/metrics" in out
    assert (tmp_path / "bundles" / "current").exists()

    assert main(args + ["--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "reusing bundle" in out and "training SINE" not in out


def test_demo_with_an_unreachable_redis_is_a_clean_error(tmp_path, capsys):
    from index_builder import bundle
    rc = main(["demo", "--dataset", "synthetic", "--workdir", str(tmp_path), "--train-minutes",
               "0.1", "--no-wait", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert rc == 2 and "Redis at redis://127.0.0.1" in capsys.readouterr().err
    assert bundle.current_version(tmp_path / "bundles")      # the bundle was still kept


def test_ctrl_c_stops_everything_without_an_error(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group: the server and the demo."""
    root = Path(__file__).resolve().parents[2]
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "sine_cli", "demo", "--dataset", "synthetic",
                          "--workdir", str(tmp_path), "--train-minutes", "0.1", "--port",
                          str(port)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    out = ""
    while "Ctrl-C stops" not in out:
        line = p.stdout.readline()
        assert line or p.poll() is None, p.stderr.read()
        out += line
        assert time.monotonic() < deadline, out
    os.killpg(p.pid, signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 0, (rest, err)
    assert "error" not in err.lower(), err
