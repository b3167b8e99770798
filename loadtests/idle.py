"""Idle and stuck sockets, in a process of their own beside locust's ordinary traffic:

- `idle`: connect and send nothing (the header deadline closes it);
- `stray-byte`: `GET /livez` announcing a 1 MB body it never sends, the answer read, then one
  body byte (uvicorn's keep-alive timer is cancelled by it; the body deadline closes it);
- `no-read`: pipelined `GET /openapi.json` requests on a socket whose answers are never read
  (the write deadline aborts it; the server's `write-timeout` count shows it).

Each kind keeps its number of sockets open at once, reopening each as soon as the server closes
it (a second after a 503), so `--sockets` in all stay open or in the server's hands; past
the server's connection cap a new socket is answered 503 at once. Every closed socket's lifetime and what the server
answered are recorded; the JSON summary goes to `--out`.

    python -m loadtests.idle --port 8000 --seconds 30 --sockets 2000 --out idle.json

`--burn-cpu-s X` opens no socket: it spends X seconds of CPU, spread evenly over `--seconds`,
as the control that tells what the attacker's own CPU costs the server on a shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import time
from pathlib import Path

from loadtests.hostile import Tally, _status

STRAY = b"GET /livez HTTP/1.1\r\nHost: sine\r\nContent-Length: 1000000\r\n\r\n"
# more answer than the kernel's buffers hold (34 MB of the 21 KB OpenAPI document), so that
# the server's own buffer fills and its write deadline runs
PIPELINED = b"GET /openapi.json HTTP/1.1\r\nHost: sine\r\n\r\n" * 1600
SHARES = {"no-read": 0.01, "stray-byte": 0.49, "idle": 0.5}     # opened in this order


async def _one(kind: str, port: int, until: float, t: Tally) -> None:
    """One socket of `kind` at a time until the run ends."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        s = socket.socket()
        s.setblocking(False)
        t0 = time.monotonic()
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
        except OSError:
            s.close()
            t.error(kind)
            await asyncio.sleep(0.1)
            continue
        got, status = b"", 0
        try:
            if kind == "stray-byte":
                await loop.sock_sendall(s, STRAY)
                got = await asyncio.wait_for(loop.sock_recv(s, 65536), 30)
                status = _status(got)
                if status == 200:
                    await loop.sock_sendall(s, b"x")          # after the answer
                    got, status = b"", 0
            while time.monotonic() < until:                  # until the server closes it
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), 1.0)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                got += chunk
            else:
                s.close()
                return                                      # the run ended with it open
        except (ConnectionError, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            s.close()
            raise
        status = status or _status(got)
        t.closed(kind, time.monotonic() - t0, status)
        s.close()
        if status == 503:                    # the connection cap: a second, as a client would
            await asyncio.sleep(1.0)


async def _no_read(port: int, until: float, hold_s: float, t: Tally) -> None:
    """A no-read socket held `hold_s` (past the server's write deadline), then replaced. The
    client cannot see the server abort it (its unread answers stay readable), so what counts is
    the server's own `write-timeout` count; a 503 from the cap is seen and recorded."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        t0 = time.monotonic()
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, PIPELINED)
            await asyncio.sleep(0.5)
            try:
                refused = s.recv(16, socket.MSG_PEEK).startswith(b"HTTP/1.1 503")
            except BlockingIOError:
                refused = False
            if refused:
                t.closed("no-read", time.monotonic() - t0, 503)
                s.close()
                await asyncio.sleep(1.0)
                continue
            t.error("no-read-held")                          # counted: held past the deadline
            await asyncio.sleep(min(hold_s, max(0.0, until - time.monotonic())))
        except (ConnectionError, OSError):
            t.error("no-read")
        s.close()


async def run(port: int, seconds: float, sockets: int, hold_s: float) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = sockets + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    until = time.monotonic() + seconds
    t = Tally()
    tasks = []
    for kind, share in SHARES.items():
        n = max(1, int(sockets * share))
        for _ in range(n):
            coro = (_no_read(port, until, hold_s, t) if kind == "no-read"
                    else _one(kind, port, until, t))
            tasks.append(asyncio.create_task(coro))
    await asyncio.gather(*tasks, return_exceptions=True)
    return t.summary()


def burn(cpu_s: float, seconds: float, slice_s: float = 0.005) -> dict:
    """`cpu_s` seconds of CPU spread over `seconds` of wall time, in busy slices of `slice_s`."""
    duty = min(1.0, cpu_s / seconds)
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        spin_until = time.monotonic() + slice_s
        while time.monotonic() < spin_until:
            pass
        behind = (time.monotonic() - t0) * duty - (time.process_time() - cpu0)
        if behind < 0:
            time.sleep(min(-behind / duty, max(0.0, seconds - (time.monotonic() - t0))))
    return {"cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--sockets", type=int, default=2000, help="sockets open at once, all kinds")
    p.add_argument("--hold-s", type=float, default=13.0,
                   help="how long a no-read socket is held (past the server's write deadline)")
    p.add_argument("--burn-cpu-s", type=float,
                   help="open no socket: spend this much CPU over --seconds (the control)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.burn_cpu_s is not None:
        a.out.write_text(json.dumps({"attacker": burn(a.burn_cpu_s, a.seconds)}, indent=1))
        return
    cpu, wall = time.process_time(), time.monotonic()
    out = asyncio.run(run(a.port, a.seconds, a.sockets, a.hold_s))
    # the attacker's own CPU: on one machine it is taken from the server's cores
    out["attacker"] = {"cpu_s": time.process_time() - cpu, "wall_s": time.monotonic() - wall}
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
