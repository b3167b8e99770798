"""Helpers the tests share: a redis-server with a client, waiting on a condition with a
deadline, reading /metrics, a bundle root of aged versions."""
import os
import shutil
import time
from pathlib import Path

import redis

from devtools.local import EmbeddedRedis


class RedisServer(EmbeddedRedis):
    """The service's embedded redis-server, plus a client for the tests' own reads and writes."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


def wait_until(condition, timeout_s: float = 5.0, what: str = "the condition",
               every_s: float = 0.02):
    """Poll `condition()` until it is truthy (returned) or the deadline passes (fails)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s} s")
        time.sleep(every_s)


def metric(client, name: str, **labels: str) -> float:
    """The value of one Prometheus sample of `/metrics` (0 when absent), parsed by
    prometheus_client's own parser; `name` is the sample name (`..._total`, `..._bucket`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def aged_versions(src: Path, root: Path, n: int) -> None:
    """root/v0 .. v{n-1}, copies of the bundle version `src`, v0 the oldest by manifest mtime
    (the order retention goes by)."""
    for k in range(n):
        shutil.copytree(src, root / f"v{k}")
        os.utime(root / f"v{k}" / "manifest.json", (1e9 + k, 1e9 + k))


class TcpProxy:
    """A TCP proxy from a free loopback port to 127.0.0.1:`port`, run by threads, that can fail
    the way a network does. `silence()` stops forwarding on every connection open now, which
    stay open (a vanished peer, a failover behind a stable address); with `new=True` later
    connections are accepted and silenced too (a black hole). `forward()` forwards again on all
    of them; `cut()` closes every connection. Stopped by `close()`."""

    def __init__(self, port: int):
        import socket
        import threading

        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[dict] = []
        self.silence_new = False
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            pair = {"socks": (client, upstream), "silenced": self.silence_new, "open": True,
                    "quiet": [False, False]}
            with self.lock:
                self.pairs.append(pair)
            for way, (src, dst) in enumerate(((client, upstream), (upstream, client))):
                threading.Thread(target=self._pump, args=(pair, way, src, dst), daemon=True).start()

    def _pump(self, pair: dict, way: int, src, dst) -> None:
        import select

        while pair["open"] and not self.closed:
            pair["quiet"][way] = pair["silenced"]
            if pair["silenced"]:                     # read nothing: the sender's buffers fill
                time.sleep(0.01)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.02)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        self._shut(pair)

    def _shut(self, pair: dict) -> None:
        pair["open"] = False
        for s in pair["socks"]:
            try:
                s.close()
            except OSError:
                pass

    def silence(self, new: bool = False) -> None:
        """Returns once no byte moves on any open connection."""
        with self.lock:
            self.silence_new = new
            for p in self.pairs:
                p["silenced"] = True
        wait_until(lambda: all(all(p["quiet"]) for p in self.pairs if p["open"]), 5.0,
                   "the proxy's connections going quiet", every_s=0.005)

    def forward(self) -> None:
        with self.lock:
            self.silence_new = False
            for p in self.pairs:
                p["silenced"] = False

    def cut(self) -> None:
        with self.lock:
            for p in self.pairs:
                self._shut(p)

    def open_connections(self) -> int:
        with self.lock:
            return sum(p["open"] for p in self.pairs)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()
