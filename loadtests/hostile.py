"""Hostile clients, in a process of their own beside locust's ordinary traffic:

- `slow-header`: sockets that send half a request line, then one byte a second;
- `slow-body`: sockets that send whole headers announcing 100 body bytes, then one byte a second;
- `big-header`: requests with a 64 KiB header, one after another;
- `batch`: closed-loop `/recommend/batch` calls of `--batch-users` users each.

Each socket the server closes is reopened at once. Every closed socket's lifetime and what the
server answered are recorded; the JSON summary goes to `--out`.

    python -m loadtests.hostile --port 8000 --seconds 30 --users-file users.json --out h.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

HEAD = (b"POST /recommend HTTP/1.1\r\nHost: sine\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n")


def _status(data: bytes) -> int:
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except ValueError:
        return 0


class Tally:
    """What the server did to each hostile socket: its lifetime and the status it answered."""
    def __init__(self) -> None:
        self.lifetimes: dict[str, list[float]] = {}
        self.statuses: dict[str, dict[int, int]] = {}
        self.errors: dict[str, int] = {}

    def closed(self, kind: str, lifetime: float, status: int) -> None:
        self.lifetimes.setdefault(kind, []).append(lifetime)
        st = self.statuses.setdefault(kind, {})
        st[status] = st.get(status, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict:
        def pct(v: list[float], q: float) -> float:
            s = sorted(v)
            return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")
        return {k: {"closed": len(v), "lifetime_p50_s": pct(v, 0.5),
                    "lifetime_max_s": max(v) if v else float("nan"),
                    "statuses": {str(s): n for s, n in sorted(self.statuses[k].items())},
                    "errors": self.errors.get(k, 0)}
                for k, v in self.lifetimes.items()} | {
            k: {"closed": 0, "errors": n} for k, n in self.errors.items()
            if k not in self.lifetimes}


async def _slow(kind: str, port: int, first: bytes, until: float, t: Tally) -> None:
    """One slow socket at a time: `first`, then a byte a second until the server closes it."""
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            t.error(kind)
            await asyncio.sleep(0.1)
            continue
        got = b""
        try:
            writer.write(first)
            while time.monotonic() < until:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                except TimeoutError:
                    writer.write(b"a")            # one more byte: still "sending"
                    await writer.drain()
                    continue
                if not chunk:
                    break
                got += chunk
            else:
                writer.close()
                return                            # the run ended with this socket open
        except (ConnectionError, OSError):
            pass
        t.closed(kind, time.monotonic() - t0, _status(got))
        writer.close()


async def _big_header(port: int, until: float, t: Tally) -> None:
    req = (b"GET /livez HTTP/1.1\r\nHost: sine\r\nX-Big: " + b"x" * 65536 + b"\r\n\r\n")
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(req)
            got = b""
            with_deadline = asyncio.wait_for(reader.read(65536), 10)
            while chunk := await with_deadline:
                got += chunk
                with_deadline = asyncio.wait_for(reader.read(65536), 10)
            t.closed("big-header", time.monotonic() - t0, _status(got))
            writer.close()
        except (ConnectionError, OSError, TimeoutError):
            t.error("big-header")
        await asyncio.sleep(0.05)


async def _batches(port: int, users: list[str], size: int, until: float, t: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() < until:
        body = json.dumps({"requests": [{"user_id": random.choice(users), "n": 50}
                                        for _ in range(size)]}).encode()
        t0 = time.monotonic()
        try:
            writer.write(HEAD.replace(b"/recommend", b"/recommend/batch") % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            st = _status(head)
            t.closed("batch", time.monotonic() - t0, st)
            if st == 429:
                await asyncio.sleep(0.01)        # what a client honouring 429 would do, briefly
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            t.error("batch")
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def run(port: int, seconds: float, users: list[str], slow: int, batch_clients: int,
              batch_users: int) -> dict:
    until = time.monotonic() + seconds
    t = Tally()
    tasks = [_slow("slow-header", port, b"POST /recommend HTTP/1.1\r\nHost: si", until, t)
             for _ in range(slow)]
    tasks += [_slow("slow-body", port, HEAD % 100 + b'{"user_id"', until, t)
              for _ in range(slow)]
    tasks += [_big_header(port, until, t)]
    tasks += [_batches(port, users, batch_users, until, t) for _ in range(batch_clients)]
    await asyncio.gather(*tasks)
    return t.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--users-file", type=Path, required=True, help="JSON list of user ids")
    p.add_argument("--slow", type=int, default=100, help="slow sockets of each kind")
    p.add_argument("--batch-clients", type=int, default=2)
    p.add_argument("--batch-users", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    users = json.loads(a.users_file.read_text())
    summary = asyncio.run(run(a.port, a.seconds, users, a.slow, a.batch_clients, a.batch_users))
    a.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
