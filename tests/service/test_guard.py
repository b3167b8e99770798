"""Slow and hostile clients against a real uvicorn with the service's protocol, over raw sockets:
header and body deadlines, the header size cap, admission by the users a request brings, and
ordinary clients answered throughout."""
import concurrent.futures as cf
import json
import socket
import threading
import time

import pytest

from service.settings import Settings
from tests.helpers import metric, wait_until

REQUEST = b'{"user_id": "u", "n": 5}'


def settings(world, **kw):
    return Settings(**{"bundle": str(world["root"]), "watch_interval_s": 0, **kw})


def head(path="/recommend", length=len(REQUEST), extra=b""):
    return (b"POST %b HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%b\r\n" % (path.encode(), length, extra))


def until_closed(sock, limit_s=10.0):
    """(everything the server sent, seconds until it closed the connection)."""
    sock.settimeout(limit_s)
    t0, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open past {limit_s} s") from None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - t0


def status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def connect(c):
    return socket.create_connection(("127.0.0.1", c.port), timeout=5)


def test_idle_and_half_sent_headers_are_closed_at_the_deadline(small_world, serve):
    with serve(settings(small_world, header_timeout_s=0.5)) as c:
        idle, half = connect(c), connect(c)
        half.sendall(b"POST /recommend HTT")                     # half a request line
        t0 = time.monotonic()
        for s in (idle, half):
            got, _ = until_closed(s, 10)        # closed by the server, well before 10 s
            took = time.monotonic() - t0
            assert took > 0.4, took             # not before the deadline
            assert status(got) == 408 and "SINE_HEADER_TIMEOUT_S" in body(got)["detail"]
            s.close()
        assert c.post("/recommend", json={"user_id": "u", "n": 5}).status_code == 200
        assert metric(c, "sine_failures_total", reason="header-timeout") == 2


def test_the_deadline_holds_for_each_request_of_a_kept_alive_connection(small_world, serve):
    with serve(settings(small_world, header_timeout_s=0.5, keep_alive_s=5)) as c:
        s = connect(c)
        s.sendall(head() + REQUEST)
        first = s.recv(65536)
        assert status(first) == 200
        time.sleep(0.7)                    # idle between requests: keep-alive's own timeout
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: t\r\n")     # then headers that stall
        got, took = until_closed(s, 10)
        assert status(got) == 408 and took > 0.4, (got[:40], took)


def test_oversized_headers_are_refused_431_before_they_are_read(small_world, serve):
    with serve(settings(small_world, max_header_bytes=16_384)) as c:
        for extra in (b"X-Big: " + b"a" * 65_536 + b"\r\n",               # one huge header
                      b"".join(b"X-%d: %b\r\n" % (i, b"b" * 500) for i in range(100))):
            s = connect(c)
            try:
                s.sendall(head(extra=extra) + REQUEST)
            except (BrokenPipeError, ConnectionResetError):
                pass                          # closed before the rest was even sent
            got, _ = until_closed(s, 10)      # refused at once: no header deadline here
            assert status(got) == 431 and "SINE_MAX_HEADER_BYTES" in body(got)["detail"]
            s.close()
        s = connect(c)                        # a long URL counts too
        s.sendall(b"GET /livez?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(until_closed(s, 5)[0]) == 431
        s.close()
        ok = c.post("/recommend", json={"user_id": "u", "n": 5},
                    headers={"X-Fine": "f" * 8_000})                # under the cap: served
        assert ok.status_code == 200
        assert metric(c, "sine_failures_total", reason="headers-too-large") == 3


def test_slow_bodies_hold_no_slot_and_are_cut_off(small_world, own_redis, serve):
    """The finding: eight sockets that sent headers and 10 of 100 body bytes made every
    /recommend a 429 while they stayed open (limit 8)."""
    s = settings(small_world, redis_url=own_redis.url, max_in_flight=8, body_timeout_s=1.5)
    with serve(s) as c:
        slow = []
        for _ in range(16):
            k = connect(c)
            k.sendall(head(length=100) + b'{"user_id"')
            slow.append(k)
        for _ in range(20):                   # ordinary clients: answered, never 429
            r = c.post("/recommend", json={"user_id": "u", "n": 5})
            assert r.status_code == 200, r.text
        chunked = connect(c)                  # a chunked body that never ends
        chunked.sendall(b"POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                        b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"use\r\n")
        for k in slow + [chunked]:
            got, _ = until_closed(k, 5)
            assert status(got) == 408 and "SINE_BODY_TIMEOUT_S" in body(got)["detail"]
            k.close()
        assert metric(c, "sine_failures_total", reason="request-timeout") == 17


def test_a_body_over_the_limit_closes_the_connection(small_world, serve):
    with serve(settings(small_world, max_body_bytes=1024)) as c:
        k = connect(c)                        # no Content-Length: counted as it streams
        k.sendall(b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b" " * 2048 + b"\r\n")
        got, _ = until_closed(k, 5)
        assert status(got) == 413 and b"connection: close" in got.lower()
        k.close()


def test_batches_are_admitted_by_their_users_and_leave_singles_room(small_world, own_redis,
                                                                   serve):
    s = settings(small_world, redis_url=own_redis.url, max_in_flight=4, max_batch_in_flight=6,
                 interactive_batch_users=1, redis_timeout_ms=2000)
    users = [{"user_id": f"b{i}", "n": 3} for i in range(5)]
    with serve(s) as c, cf.ThreadPoolExecutor(4) as ex:
        own_redis.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
        first = ex.submit(c.post, "/recommend/batch", json={"requests": users})
        wait_until(lambda: c.app.state.sine.admission.held["bulk"] == 5, 2, "the batch admitted")
        r = c.post("/recommend/batch", json={"requests": users[:2]})       # 5 + 2 > 6
        assert r.status_code == 429 and not first.done()    # refused, not queued behind it
        assert "users of batches" in r.json()["detail"] and r.headers["retry-after"] == "1"
        singles = [ex.submit(c.post, "/recommend", json={"user_id": f"s{i}", "n": 3})
                   for i in range(3)]                      # their own pool: admitted
        assert first.result().status_code == 200
        assert [f.result().status_code for f in singles] == [200, 200, 200]
        big = [{"user_id": f"x{i}", "n": 2} for i in range(10)]   # larger than its pool: alone
        r = c.post("/recommend/batch", json={"requests": big})
        assert r.status_code == 200 and len(r.json()["results"]) == 10
        # a batch of one user is interactive here: the single requests' pool, and their turn
        own_redis.client().execute_command("CLIENT", "PAUSE", 800, "ALL")
        held = [ex.submit(c.post, "/recommend", json={"user_id": f"t{i}", "n": 3})
                for i in range(4)]
        wait_until(lambda: c.app.state.sine.admission.held["single"] == 4, 2, "singles admitted")
        r = c.post("/recommend/batch", json={"requests": users[:1]})
        assert r.status_code == 429 and "requests are in flight" in r.json()["detail"]
        assert [f.result().status_code for f in held] == [200] * 4


def test_slow_clients_do_not_stop_the_others_at_the_default_limits(small_world, serve):
    """A few hundred stalled sockets at the default limits: ordinary requests keep flowing."""
    with serve(settings(small_world, header_timeout_s=1.0, body_timeout_s=1.0)) as c:
        stalled = []
        for i in range(300):
            k = connect(c)
            k.sendall(head(length=100) + b"{" if i % 2 else b"POST /reco")
            stalled.append(k)
        answered = []

        def ordinary():
            for _ in range(10):
                answered.append(c.post("/recommend", json={"user_id": "u", "n": 5}).status_code)
        threads = [threading.Thread(target=ordinary) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert answered == [200] * 20
        closed = 0
        for k in stalled:
            got, _ = until_closed(k, 5)
            closed += status(got) == 408
            k.close()
        assert closed == 300


@pytest.mark.parametrize("path", ["/recommend", "/events"])
def test_a_client_that_hangs_up_mid_body_costs_nothing(small_world, own_redis, serve, path):
    with serve(settings(small_world, redis_url=own_redis.url)) as c:
        for _ in range(20):
            k = connect(c)
            k.sendall(head(path, length=100) + b'{"user')
            k.close()
        wait_until(lambda: c.app.state.sine.admission.in_flight == 0, 2, "nothing held")
        assert c.post("/recommend", json={"user_id": "u", "n": 5}).status_code == 200


def test_a_stray_body_byte_after_the_answer_cannot_keep_a_connection_open(small_world, serve):
    """GET with a Content-Length it never sends, one body byte after the answer: uvicorn's
    keep-alive timer is cancelled by that byte; the body deadline still closes it."""
    with serve(settings(small_world, header_timeout_s=0.4, body_timeout_s=0.5,
                        keep_alive_s=0.5)) as c:
        socks = []
        for _ in range(5):
            s = connect(c)
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n")
            s.settimeout(5)
            assert status(s.recv(65536)) == 200
            s.sendall(b"x")                                  # after the answer
            socks.append(s)
        for s in socks:
            until_closed(s, 10)                              # raises if it stays open
            s.close()
        assert metric(c, "sine_failures_total", reason="body-timeout") == 5
        assert c.get("/livez").status_code == 200


def test_an_answer_the_client_never_reads_is_aborted_at_the_write_deadline(small_world, serve):
    with serve(settings(small_world, header_timeout_s=0.4, write_timeout_s=0.5)) as c:
        size = len(c.get("/openapi.json").content)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", c.port))
        n = (32 << 20) // size + 1                           # past any kernel buffer
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n" * n)   # pipelined, never read
        wait_until(lambda: metric(c, "sine_failures_total", reason="write-timeout") == 1, 10,
                   "the write deadline")
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while s.recv(1 << 20):                           # aborted: a reset once drained
                pass
            raise BrokenPipeError                            # a plain close is fine too
        s.close()
        assert c.get("/livez").status_code == 200
        # the pipelined answers behind the aborted one never wrote to the closed transport
        assert metric(c, "sine_failures_total", reason="internal") == 0


def test_connections_past_the_cap_are_refused_at_once_and_the_cap_fits_the_fd_limit(small_world,
                                                                                      serve):
    import resource

    from service.server import connection_cap

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10**9, 100) == (10**9 if soft == resource.RLIM_INFINITY else soft - 100)
    assert connection_cap(5, 100) == 5
    with serve(settings(small_world, max_connections=4, header_timeout_s=60)) as c:
        c.close()                                            # the fixture's own keep-alive one
        held = [connect(c) for _ in range(4)]
        wait_until(lambda: len(held) == 4)
        extra = connect(c)
        got, _ = until_closed(extra, 10)      # at once: the header deadline is a minute
        assert status(got) == 503 and "SINE_MAX_CONNECTIONS" in body(got)["detail"]
        for s in held:                                       # the held ones are still served
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n")
            s.settimeout(5)
            assert status(s.recv(65536)) == 200
            s.close()
        again = connect(c)
        wait_until(lambda: (again.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n"),
                            status(again.recv(65536)) == 200)[1], 5, "a connection once freed")
        again.close()


def test_a_sweep_closes_the_connections_due_a_chunk_per_loop_turn():
    """Sockets opened together fall due together: the sweep closes SWEEP_CHUNK of them per turn
    of the loop, so other callbacks run between chunks, and skips one no longer due."""
    import asyncio

    from service.server import SWEEP_CHUNK, _Sweeper

    class Conn:
        def __init__(self, due=True):
            self.due, self.closed_at = due, None

        def overdue(self, now):
            return "idle" if self.due else None

        def expire(self, why):
            self.closed_at = turn[0]

    turn = [0]

    async def main():
        loop = asyncio.get_running_loop()
        sweeper = _Sweeper.__new__(_Sweeper)
        sweeper.loop = loop
        conns = [Conn() for _ in range(2 * SWEEP_CHUNK + 5)]
        conns[-1].due = False                      # a request arrived on it meanwhile
        sweeper.expire(list(conns))
        for _ in range(5):
            turn[0] += 1
            await asyncio.sleep(0)                 # one turn of the loop
        return conns

    conns = asyncio.run(main())
    turns = [c.closed_at for c in conns]
    assert turns[:SWEEP_CHUNK] == [0] * SWEEP_CHUNK
    assert set(turns[SWEEP_CHUNK: 2 * SWEEP_CHUNK]) == {1}
    assert set(turns[2 * SWEEP_CHUNK: -1]) == {2} and turns[-1] is None
