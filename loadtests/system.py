"""The system under test: an embedded redis-server (or cluster) loaded with every user's history,
and `sine serve` over a private copy of a bundle root."""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from devtools.local import Stack
from index_builder import bundle as bundle_mod
from loadtests.locustfile import Traffic


class System:
    """Embedded Redis with every history, and `sine serve` over a private bundle root."""

    def __init__(self, bundle: str, data_dir: str | None, work: Path, tree: Path | None = None,
                 cluster: bool = False, proxy: bool = False, **settings):
        from model_export import data
        b = bundle_mod.load(bundle, deep=False)
        self.work = work
        self.settings = settings
        self.root = work / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(b.path, self.root / b.version)
        bundle_mod.set_current(self.root, b.version)
        self.version = b.version
        self.ds = data.load(b.manifest["dataset"]["name"], data_dir)
        self.stack = Stack(data.histories(self.ds), cluster=cluster)
        self.redis, self.cluster = self.stack.redis, self.stack.cluster
        try:
            if self.redis is not None:
                self._redis_cmd("SAVE")             # a restarted Redis reloads this snapshot
            # with `proxy`, the service reaches Redis through a TcpProxy (a process of its own,
            # off locust's busy core) that can silence it
            self.proxy = ProxyProcess(self.redis.port) if proxy and self.redis is not None \
                else None
            via = {"redis_url": self.proxy.url} if self.proxy is not None else {}
            self.server = self.stack.serve(self.root, log_path=work / "server.log", tree=tree,
                                           watch_interval_s=1, redis_retry_after_ms=250,
                                           **{**via, **settings})
        except BaseException:
            self.stack.close()
            raise
        self.traffic = Traffic(self.ds.user_ids, self.ds.item_ids[1:])

    def _redis_cmd(self, *words: str) -> bytes:
        import socket
        with socket.create_connection(("127.0.0.1", self.redis.port), 5) as s:
            s.sendall((" ".join(words) + "\r\n").encode())
            return s.recv(64)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        text = urllib.request.urlopen(self.server.url + "/metrics", timeout=5).read().decode()
        return sum(smp.value for fam in text_string_to_metric_families(text)
                   for smp in fam.samples
                   if smp.name == name and labels.items() <= smp.labels.items())

    def publish_copy(self, version: str, corrupt: bool = False) -> None:
        """A new version (the live one under another name), optionally corrupt; moves current."""
        staging = bundle_mod.staging_dir(self.root, version)
        src = self.root / self.version
        for p in src.iterdir():
            shutil.copy2(p, staging / p.name)
        m = json.loads((staging / "manifest.json").read_text())
        m["version"] = version
        (staging / "manifest.json").write_text(json.dumps(m))
        if corrupt:
            with open(staging / "index.faiss", "r+b") as f:
                f.seek(64)
                f.write(b"\xff" * 16)
        bundle_mod.publish(staging, self.root, version)

    def stop(self) -> None:
        self.stack.close()
        if self.proxy is not None:
            self.proxy.close()


class ProxyProcess:
    """`python -m devtools.proxy` in front of a Redis port: `silence()`, `forward()`."""

    def __init__(self, target: int):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "devtools.proxy", "--target",
                                      str(target)], stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _signal(self, sig: int, ack: str) -> None:
        assert self.proc.stdout is not None
        self.proc.send_signal(sig)
        line = self.proc.stdout.readline().strip()
        if line != ack:
            raise RuntimeError(f"the proxy answered {line!r}, not {ack!r}")

    def silence(self) -> None:
        import signal
        self._signal(signal.SIGUSR1, "silence")

    def forward(self) -> None:
        import signal
        self._signal(signal.SIGUSR2, "forward")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()
