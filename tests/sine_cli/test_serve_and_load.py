"""`sine serve` and `sine load-histories` as a user runs them."""
import os
import signal
import subprocess
import sys
import time

import httpx

from devtools.local import free_port
from sine_cli.main import main


def write_log(path, rows):
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def test_load_histories_newest_first_with_holdout(tmp_path, redis_server, capsys):
    log = tmp_path / "clicks.csv"
    write_log(log, [("alice", f"i{t}", t) for t in range(30)] + [("bob", "x", 1), ("bob", "y", 2),
                                                                   ("bob", "z", 3)])
    r = redis_server.client()
    r.rpush("sine:history:bob", "stale")
    rc = main(["load-histories", "--dataset", str(log), "--redis-url", redis_server.url,
               "--holdout", "1", "--keep", "5"])
    assert rc == 0, capsys.readouterr().err
    assert r.lrange("sine:history:alice", 0, -1) == ["i28", "i27", "i26", "i25", "i24"]
    assert r.lrange("sine:history:bob", 0, -1) == ["y", "x"]          # replaced, not appended
    assert "loaded 2 histories" in capsys.readouterr().out


def test_load_histories_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SINE_REDIS_URL", raising=False)
    log = tmp_path / "clicks.csv"
    write_log(log, [("a", "1", 1), ("a", "2", 2), ("a", "3", 3)])
    assert main(["load-histories", "--dataset", str(log)]) == 2
    assert "no Redis" in capsys.readouterr().err
    rc = main(["load-histories", "--dataset", str(log), "--redis-url",
               f"redis://:pw@127.0.0.1:{free_port()}/0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Redis at redis://:***@127.0.0.1" in err and "pw@" not in err


def test_serve_refuses_a_broken_bundle_or_bad_setting(tmp_path, capsys, monkeypatch):
    assert main(["serve", "--bundle", str(tmp_path / "nothing")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    monkeypatch.setenv("SINE_MAX_N", "0")
    assert main(["serve", "--bundle", str(tmp_path)]) == 2
    assert "invalid settings: max_n" in capsys.readouterr().err


def test_serve_answers_and_drains_on_sigterm(small_world, redis_server):
    port = free_port()
    env = {**os.environ, "SINE_BUNDLE": str(small_world["root"]), "SINE_WATCH_INTERVAL_S": "0",
           "SINE_REDIS_URL": redis_server.url, "SINE_REDIS_PASSWORD": "not-logged"}
    p = subprocess.Popen([sys.executable, "-m", "sine_cli", "serve", "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": "cli", "n": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode in (0, -signal.SIGTERM)      # uvicorn re-raises SIGTERM after draining
    assert '"msg": "bundle loaded"' in err and '"msg": "stopped"' in err
    assert "not-logged" not in err + out
