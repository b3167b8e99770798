"""Fixtures shared by the test packages: the data folder, a small trained bundle, a real
redis-server on a free port, and the app behind a real uvicorn."""
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SINE_DATA_DIR") or (ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


def require_data(*parts: str) -> Path:
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data set not found at {p}")
    return p


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small SINE trained on seeded synthetic data, exported, and published as a bundle."""
    from index_builder.make import make_bundle
    from model_export import data
    from model_export.export import export
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config

    base = tmp_path_factory.mktemp("world")
    ds = data.synthetic(n_users=400, n_items=300, n_categories=12, length=(6, 20), seed=12)
    train(ds, model_config(ds, D=32, K=3, L=16),
          TrainConfig(batch_size=64, max_epochs=2, lr=3e-3, seed=3, threads=2), base / "run",
          progress=False)
    # the aggregate by default, whatever validation would pick: the service tests rely on it
    export(base / "run" / "best.pt", ds, base / "export", n_queries=300, serving="aggregate",
           log=lambda *a: None)
    b = make_bundle(base / "export", base / "bundles", version="v1", log=lambda *a: None)
    return {"ds": ds, "base": base, "export": base / "export", "root": base / "bundles",
            "bundle": b, "checkpoint": base / "run" / "best.pt"}


@pytest.fixture(scope="session")
def redis_server():
    r = RedisServer().start()
    yield r
    r.cleanup()


@pytest.fixture
def own_redis():
    """A Redis of this test's own, free to be killed and restarted."""
    r = RedisServer().start()
    yield r
    r.cleanup()


@contextmanager
def served(settings, ready: bool = True):
    """create_app(settings) behind a real uvicorn (the service's own protocol and options) on a
    free port; yields an httpx.Client whose `port` is the server's."""
    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_options

    # the socket bound here and handed over: no other process can take the port in between
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings)
    opts = {**uvicorn_options(settings), "host": "127.0.0.1", "port": port, "access_log": False}
    server = uvicorn.Server(uvicorn.Config(app, **opts))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        c.app = app
        c.port = port
        if ready:
            assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        try:
            yield c
        finally:
            server.should_exit = True
            t.join(10)
            sock.close()


@pytest.fixture(scope="session")
def serve():
    """The `served` context manager, for tests and module fixtures."""
    return served

