"""A real redis-server on a free port and a real uvicorn server on another, per test need."""
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import redis

from service.local import EmbeddedRedis, free_port


class RedisServer(EmbeddedRedis):
    """The service's embedded redis-server, plus a client for the tests' own reads and writes."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


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
    """create_app(settings) behind a real uvicorn on a free port; yields an httpx.Client."""
    import uvicorn

    from service.app import create_app

    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        c.app = app
        if ready:
            assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        try:
            yield c
        finally:
            server.should_exit = True
            t.join(10)


@pytest.fixture(scope="session")
def serve():
    """The `served` context manager, for tests and module fixtures."""
    return served
