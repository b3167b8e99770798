"""A Redis Cluster as the service sees it: its own slot map driving one client pair per master.

redis-py's cluster client re-reads the whole slot map inline, inside the next command's budget
and behind one lock, once any command has failed (a write to a dead master is enough), and marks
every node's connections for reconnect; requests to healthy masters then miss their deadline.
Here the map is read in the background only (`refresh_soon`, and again every quarter second
while a master keeps failing, so a promoted replica is picked up at once), the request path
only looks it up, and each master has its own `ListReader` for reads and a redis-py client for
scripts and the rest: what one master does never touches another's connections.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from redis.connection import parse_url
from redis.crc import key_slot

from .clients import node_client
from .resp import ListReader

SLOTS = 16384
REFRESH_EVERY_S = 0.25          # while a master keeps failing
CALM_S = 1.0                    # no failure for this long: the map is left alone


@dataclass
class Node:
    """One master of the cluster: its reader and its redis-py client."""
    name: str                   # host:port
    reader: ListReader
    client: Any                 # redis.asyncio.Redis on this node only

    async def close(self) -> None:
        self.reader.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ClusterMap:
    """The cluster's slot-to-master map and one client pair per master."""
    def __init__(self, url: str, password: str | None, timeout_s: float, pool_size: int):
        opts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.url, self.password, self.timeout, self.pool_size = url, password, timeout_s, pool_size
        self.username = opts.get("username")
        if password is None:
            self.password = opts.get("password")
        self.tls = opts.get("connection_class") is not None
        self.seeds = [(opts.get("host", "localhost"), int(opts.get("port", 6379)))]
        self.slots: list[str] | None = None         # [16384] master name per slot
        self.nodes: dict[str, Node] = {}
        self.replicas: list[tuple[str, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._last_failure = 0.0

    def _client(self, host: str, port: int) -> Any:
        return node_client(host, port, username=self.username, password=self.password,
                           timeout_s=self.timeout, tls=self.tls, pool_size=self.pool_size)

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            host, port = name.rsplit(":", 1)
            node = self.nodes[name] = Node(
                name, ListReader(self.url, self.password, self.timeout, host, int(port)),
                self._client(host, int(port)))
        return node

    def node_of(self, key: str) -> Node:
        """The master of `key`'s slot in the current map (KeyError before the first map)."""
        if self.slots is None:
            raise KeyError("the cluster's slot map is not loaded yet")
        name = self.slots[key_slot(key.encode())]
        if not name:
            raise KeyError(f"no master serves the slot of {key!r}")
        return self._node(name)

    def masters(self) -> list[Node]:
        return [self._node(n) for n in sorted(set(self.slots or [])) if n]

    async def load(self) -> None:
        """Read CLUSTER SLOTS from the first node that answers (the known masters, then their
        replicas, then the URL's) and swap the map in."""
        known = [tuple(n.rsplit(":", 1)) for n in sorted(set(self.slots or [])) if n]
        tried: set[tuple[str, int]] = set()
        last: BaseException | None = None
        for host, port in [(h, int(p)) for h, p in known] + self.replicas + self.seeds:
            if (host, port) in tried:
                continue
            tried.add((host, port))
            name = f"{host}:{port}"
            client = self.nodes[name].client if name in self.nodes else self._client(host, port)
            try:
                async with asyncio.timeout(max(self.timeout, 0.25)):
                    reply = await client.execute_command("CLUSTER", "SLOTS")
            except Exception as e:
                last = e
                continue
            finally:
                if name not in self.nodes:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            self._install(reply, host)
            return
        raise ConnectionError(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _install(self, reply: list[Any], asked: str) -> None:
        table = [""] * SLOTS
        replicas = []
        for entry in reply:
            lo, hi, master, *others = entry
            name = f"{master[0] or asked}:{master[1]}"
            table[int(lo): int(hi) + 1] = [name] * (int(hi) - int(lo) + 1)
            replicas += [(r[0] or asked, int(r[1])) for r in others]
        self.slots, self.replicas = table, replicas
        for name in [n for n in self.nodes if n not in set(table)]:
            node = self.nodes.pop(name)         # a master gone from the map
            asyncio.get_running_loop().create_task(node.close())

    def failed(self) -> None:
        """A command failed: refresh the map soon, off the request path."""
        self._last_failure = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresher())

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(Exception):       # the next failure tries again
                await self.load()
            await asyncio.sleep(REFRESH_EVERY_S)
            if time.monotonic() - self._last_failure > CALM_S:
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for node in list(self.nodes.values()):
            await node.close()
        self.nodes.clear()
