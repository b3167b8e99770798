"""Processes on this machine: an embedded redis-server, `sine serve` as a child process,
`Stack`, the two together with users' histories loaded, and `TcpProxy`, which fails a
connection the way a network does.

Used by the one-command demo, the benchmarks and the load tests; everything binds 127.0.0.1.
Development tooling: the service never imports it.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from index_builder.bundle import SineError


class LocalError(SineError, RuntimeError):
    """A local process (redis-server, a cluster, the server) could not be started or reached."""
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """redis-server on a free port with a temporary directory and no persistence; `args` are
    more redis-server options (`["--requirepass", "pw"]`)."""

    def __init__(self, port: int | None = None, args: list[str] | None = None):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise LocalError("redis-server is not installed. On Debian/Ubuntu: "
                             "sudo apt-get install redis-server; on macOS: brew install redis; "
                             "or point SINE_REDIS_URL at a running Redis.")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sine-redis-")
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        assert self.exe is not None                     # checked in __init__
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):   # up (maybe locked)
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LocalError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; `start()` again reloads the last SAVE from the folder."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000:
            port -= 30000
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise LocalError("no free port pair for a cluster node")


class EmbeddedCluster:
    """A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, made by
    `redis-cli --cluster create`. A short `node_timeout_ms` makes failover take seconds, and
    `cluster-require-full-coverage no` lets the other masters' slots serve while one is down."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        if shutil.which("redis-cli") is None:
            raise LocalError("redis-cli is not installed (it comes with redis-server: "
                             "sudo apt-get install redis-server)")
        self.replicas = replicas
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0"]
        self.nodes = [EmbeddedRedis(port=_cluster_port(), args=args)
                      for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        live = [n for n in self.nodes if n.proc is not None]
        return (live or self.nodes)[0].url

    def _cli(self, port: int, *args: str, timeout_s: float = 5.0) -> str:
        out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                             text=True, timeout=timeout_s)
        return out.stdout

    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        try:
            for n in self.nodes:
                n.start()
            res = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                raise LocalError(f"redis-cli --cluster create failed: {res.stdout[-500:]}"
                                 f"{res.stderr[-500:]}")
            self.wait_ok(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def state(self, port: int) -> dict[str, str]:
        """`CLUSTER INFO` of one node, as a dict ({} when it does not answer)."""
        try:
            text = self._cli(port, "cluster", "info")
        except (subprocess.TimeoutExpired, OSError):
            return {}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node reports `cluster_state:ok` with all slots served."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self.state(n.port) for n in self.nodes if n.proc is not None]
            if all(st.get("cluster_state") == "ok" and st.get("cluster_slots_ok") == "16384"
                   for st in states):
                return
            if time.monotonic() > deadline:
                raise LocalError(f"the cluster is not ok after {timeout_s} s: {states}")
            time.sleep(0.1)

    def masters(self) -> list[tuple[int, int, EmbeddedRedis]]:
        """(first slot, last slot, node) of every running master, as a running node sees it."""
        for n in self.nodes:
            if n.proc is None:
                continue
            out = []
            for line in self._cli(n.port, "cluster", "nodes").splitlines():
                f = line.split()
                if len(f) < 8 or "master" not in f[2] or "fail" in f[2]:
                    continue
                port = int(f[1].split("@")[0].rsplit(":", 1)[1])
                m = next(m for m in self.nodes if m.port == port)
                if m.proc is None:
                    continue
                for r in f[8:]:
                    lo, _, hi = r.partition("-")
                    if lo.isdigit():
                        out.append((int(lo), int(hi or lo), m))
            return out
        return []

    def master_of(self, key: str, masters: list | None = None) -> EmbeddedRedis:
        """The running node that masters `key`'s slot now (`masters`: a `masters()` to reuse)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for lo, hi, m in self.masters() if masters is None else masters:
            if lo <= slot <= hi:
                return m
        raise LocalError(f"no running master serves {key!r}")

    def wait_failover(self, key: str, timeout_s: float = 30.0) -> EmbeddedRedis:
        """After a master of `key` was killed: until a running node masters its slot again and
        the cluster is ok; returns the new master."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                m = self.master_of(key)
                self.wait_ok(max(0.1, deadline - time.monotonic()))
                return m
            except LocalError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


class Server:
    """`sine serve` in a child process, configured by SINE_* variables.

    `tree` runs the server of another checkout of the project (an older commit, measured side
    by side with this one)."""

    def __init__(self, env: dict[str, str], port: int | None = None, log_path: Path | None = None,
                 tree: Path | None = None, python_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.env = {**os.environ, **env, "SINE_PORT": str(self.port), "SINE_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.tree = tree
        self.python_args = python_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> Server:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = self.env
        if self.tree is not None:
            env = {**env, "PYTHONPATH": str(self.tree)}
        self.proc = subprocess.Popen([sys.executable, *self.python_args, "-m", "sine_cli", "serve"],
                                     env=env, stdout=out, stderr=out, cwd=self.tree)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise LocalError(f"the server exited with code {self.proc.returncode}"
                                 + (f"; see {self.log_path}" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise LocalError("the server did not become ready in time")
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        if self.proc is None:
            raise LocalError("the server is not running")
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def ensure_redis_server(log: Callable[[str], None] = print) -> None:
    """Install redis-server with apt-get where it is missing and that is possible."""
    if shutil.which("redis-server"):
        return
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if apt and sudo is not None:
        log("redis-server is missing; installing it with apt-get ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run(sudo + [apt, "update", "-qq"], env=env).returncode == 0 and \
            subprocess.run(sudo + [apt, "install", "-y", "-qq", "redis-server"],
                           env=env).returncode == 0
        if ok and shutil.which("redis-server"):
            return
    raise LocalError("redis-server is not installed and could not be installed here. Install it "
                     "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install "
                     "redis), or pass --redis-url to use a running Redis.")


class Stack:
    """Redis holding users' histories, and the `sine serve` processes started on it.

    With no `redis_url` an embedded redis-server is started (and removed on close), or with
    `cluster` an embedded Redis Cluster (3 masters, 3 replicas). `histories` are (user id, item
    ids oldest first) as `model_export.data.histories` yields them; each user's newest `keep`
    clicks are loaded. Servers started by `serve()` stop on close.
    """

    def __init__(self, histories: Iterable[tuple[str, list[str]]] | None = None,
                 keep: int | None = None, redis_url: str | None = None,
                 total: int | None = None, progress: Callable[[int, int], None] | None = None,
                 cluster: bool = False):
        from service.history import load_histories
        from service.settings import settings_from

        self.cluster = EmbeddedCluster().start() if cluster and not redis_url else None
        self.redis = None if redis_url or cluster else EmbeddedRedis().start()
        self.redis_url = redis_url or (self.cluster or self.redis).url  # type: ignore[union-attr]
        self.redis_settings = {"redis_cluster": True} if cluster else {}
        self.servers: list[Server] = []
        self.loaded = 0
        try:
            if histories is not None:
                self.loaded = load_histories(settings_from(redis_url=self.redis_url,
                                                           history_keep=keep,
                                                           **self.redis_settings),
                                             histories, total, progress)
        except BaseException:
            self.close()
            raise

    def serve(self, bundle: str | Path, log_path: Path | None = None, port: int | None = None,
              tree: Path | None = None, python_args: tuple[str, ...] = (),
              **settings: object) -> Server:
        """`sine serve` on `bundle` and this Redis, ready; `settings` are Settings fields."""
        env = {"SINE_BUNDLE": str(Path(bundle).resolve()), "SINE_REDIS_URL": self.redis_url,
               **{f"SINE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                  for k, v in {**self.redis_settings, **settings}.items()}}
        server = Server(env, port=port, log_path=log_path, tree=tree, python_args=python_args)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()
        if self.redis is not None:
            self.redis.cleanup()
        if self.cluster is not None:
            self.cluster.cleanup()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy:
    """A TCP proxy from a free loopback port to 127.0.0.1:`port`, run by threads, that can fail
    the way a network does. `silence()` stops forwarding on every connection open now, which
    stay open (a vanished peer, a failover behind a stable address); with `new=True` later
    connections are accepted and silenced too (a black hole). `forward()` forwards again on all
    of them; `cut()` closes every connection. Stopped by `close()`."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[dict[str, Any]] = []
        self.silence_new = False
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
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
            pair: dict[str, Any] = {"socks": (client, upstream), "silenced": self.silence_new, "open": True,
                    "quiet": [False, False]}
            with self.lock:
                self.pairs.append(pair)
            for way, (src, dst) in enumerate(((client, upstream), (upstream, client))):
                threading.Thread(target=self._pump, args=(pair, way, src, dst), daemon=True).start()

    def _pump(self, pair: dict[str, Any], way: int, src: socket.socket, dst: socket.socket) -> None:
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

    def _shut(self, pair: dict[str, Any]) -> None:
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
        deadline = time.monotonic() + 5.0
        while not all(all(p["quiet"]) for p in self.pairs if p["open"]):
            if time.monotonic() > deadline:
                raise LocalError("the proxy's connections did not go quiet within 5 s")
            time.sleep(0.005)

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
