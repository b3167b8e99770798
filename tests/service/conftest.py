"""A real redis-server on a free port and a real uvicorn server on another, per test need."""
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server); "
                        ".ci/run installs it")
        self.exe, self.dir, self.port = exe, tmp, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, free to be killed and restarted."""
    r = RedisServer(tmp_path)
    r.start()
    yield r
    r.stop()


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
