"""`sine serve` with several worker processes on one port: /metrics sums every worker, each
worker hot-reloads a published bundle, SIGTERM drains them all."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.local import free_port
from index_builder import bundle as bundle_mod
from tests.helpers import wait_until


def samples(url, name):
    text = httpx.get(url + "/metrics").text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


@pytest.fixture
def workers(small_world, redis_server, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(small_world["root"] / "v1", root / "v1")
    bundle_mod.set_current(root, "v1")
    port = free_port()
    env = {**os.environ, "SINE_BUNDLE": str(root), "SINE_WATCH_INTERVAL_S": "0.2",
           "SINE_REDIS_URL": redis_server.url, "SINE_WORKERS": "2",
           "SINE_METRICS_DIR": str(tmp_path / "metrics"), "SINE_ADMIN_TOKEN": "secret-token"}
    p = subprocess.Popen([sys.executable, "-m", "sine_cli", "serve", "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def both_ready():
        try:
            return len({s.labels["pid"] for s in samples(url, "sine_bundle_info")}) == 2
        except httpx.TransportError:
            assert p.poll() is None, p.stderr.read()
            return False
    try:
        wait_until(both_ready, 90, "two workers serving", every_s=0.2)
        yield {"url": url, "proc": p, "root": root, "tmp": tmp_path}
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)


def test_metrics_add_up_every_worker(workers):
    url = workers["url"]
    pids = set()
    with httpx.Client(base_url=url) as c:          # new connections land on either worker
        for k in range(40):
            r = httpx.post(url + "/recommend", json={"user_id": f"w{k}", "n": 3},
                           headers={"connection": "close"})
            assert r.status_code == 200
        assert c.get("/readyz").status_code == 200
    count = sum(s.value for s in samples(url, "sine_request_duration_seconds_count")
                if s.labels.get("endpoint") == "recommend")
    assert count == 40                                # whichever worker answers the scrape
    pids = {s.labels["pid"] for s in samples(url, "sine_bundle_info") if s.value == 1}
    assert len(pids) == 2
    assert "secret-token" not in workers["proc"].args and "secret-token" not in str(pids)


def test_every_worker_reloads_a_published_bundle(workers):
    url, root = workers["url"], workers["root"]
    staging = bundle_mod.staging_dir(root, "v2")
    for f in (root / "v1").iterdir():
        shutil.copy2(f, staging / f.name)
    import json
    m = json.loads((staging / "manifest.json").read_text())
    m["version"] = "v2"
    (staging / "manifest.json").write_text(json.dumps(m))
    bundle_mod.publish(staging, root, "v2")

    def all_on_v2():
        live = {(s.labels["pid"], s.labels["version"]) for s in samples(url, "sine_bundle_info")
                if s.value == 1}
        return len(live) == 2 and {v for _, v in live} == {"v2"}
    try:
        wait_until(all_on_v2, 30, "both workers on v2", every_s=0.2)
    except AssertionError:
        raise AssertionError([(s.labels, s.value) for s in samples(url, "sine_bundle_info")]) from None
    for k in range(10):
        r = httpx.post(url + "/recommend", json={"user_id": f"r{k}", "n": 3},
                       headers={"connection": "close"})
        assert r.json()["version"] == "v2"


def test_sigterm_drains_every_worker(workers):
    """Requests in flight when SIGTERM arrives (headers sent, body still coming) on connections
    of both workers are answered; then every worker stops."""
    port = int(workers["url"].rsplit(":", 1)[1])
    p = workers["proc"]
    body = b'{"user_id": "drain", "n": 5}'
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port), 5)
        s.sendall(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body[:5])
        socks.append(s)
    # the one fixed wait: no worker can be asked whether it has parsed a partial request's
    # headers (until then uvicorn counts the connection idle and closes it on shutdown)
    time.sleep(0.5)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    p.send_signal(signal.SIGTERM)
    wait_until(lambda: sum('"Shutting down"' in x for x in lines) == 2, 15,
               "both workers shutting down")
    answers = []
    for s in socks:
        s.sendall(body[5:])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answers.append(data.split(b"\r\n", 1)[0])
        s.close()
    p.wait(30)
    reader.join(10)
    err = "".join(lines)
    assert answers == [b"HTTP/1.1 200 OK"] * 8, answers
    assert p.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert err.count('"msg": "stopped"') == 2, err[-2000:]            # each worker drained
