"""Request ids (accepted or made, echoed, on log lines and problem bodies) and OpenTelemetry
traces, sent over OTLP/HTTP to a real receiver this test runs on loopback."""
import io
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.logs import JsonFormatter
from service.settings import Settings
from service.stages import STAGES
from service.tracing import request_id
from tests.helpers import wait_until


def put_history(small_world, redis, user: str) -> None:
    ds = small_world["ds"]
    key = f"sine:history:{user}"
    redis.delete(key)
    redis.rpush(key, *[ds.item_ids[int(i)] for i in ds.sequences[1][::-1]])


def test_request_id_is_a_sane_token_or_a_new_one():
    assert request_id(b"abc-123.x_y:z/w+=") == "abc-123.x_y:z/w+="
    for bad in (None, b"", b"a b", b"x" * 129, b"id\x00", b"<script>", "é".encode()):
        made = request_id(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", made), (bad, made)
    assert request_id(None) != request_id(None)


@pytest.fixture
def captured():
    """The service logger's lines as the JSON formatter writes them."""
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(JsonFormatter())
    lg = logging.getLogger("sine.service")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    yield out
    lg.removeHandler(h)
    lg.setLevel(old)


def test_the_request_id_is_echoed_logged_and_in_problems(small_world, redis_server, serve,
                                                         captured):
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0)
    with serve(s) as c:
        r = c.post("/recommend", json={"user_id": "u", "n": 3},
                   headers={"X-Request-ID": "req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        made = c.get("/livez").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert c.get("/livez", headers={"X-Request-ID": "a b"}).headers["x-request-id"] != "a b"
        # a refusal by the guard (before any route) and a route's own 422 both carry it
        bad = c.post("/recommend", json={"user_id": "u", "n": 0},
                     headers={"X-Request-ID": "req-422"})
        assert bad.status_code == 422 and bad.json()["request_id"] == "req-422"
        assert bad.headers["x-request-id"] == "req-422"
        refused = c.post("/admin/reload", headers={"X-Request-ID": "req-401"})
        assert refused.status_code == 401 and refused.json()["request_id"] == "req-401"
        # the admin route's warning is a log line of that request
        lines = wait_until(lambda: [ln for ln in captured.getvalue().splitlines()
                                    if "admin route called while disabled" in ln],
                           what="the warning")
        assert '"request_id": "req-401"' in lines[-1]


class Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes every POST /v1/traces body it gets."""
    spans: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        if ok:
            req = ExportTraceServiceRequest.FromString(body)
            with self.lock:
                for rs in req.resource_spans:
                    res = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        self.spans.extend((res, sp) for sp in ss.spans)
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def receiver(monkeypatch):
    Receiver.spans = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    # the SDK's own variables: where to send, and no 5 s wait before a batch goes out
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                       f"http://127.0.0.1:{srv.server_port}/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sine-under-test")
    yield Receiver
    srv.shutdown()


def test_a_traced_request_shows_its_stages_at_the_receiver(small_world, redis_server, serve,
                                                           receiver):
    put_history(small_world, redis_server.client(), "traced")
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                 otel_traces_exporter="otlp")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with serve(s) as c:
        r = c.post("/recommend", json={"user_id": "traced", "n": 5},
                   headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                            "X-Request-ID": "traced-1"})
        assert r.status_code == 200 and r.json()["fallback"] is None

        def request_span():
            with receiver.lock:
                return [sp for _, sp in receiver.spans if sp.name == "POST /recommend"]
        (root,) = wait_until(request_span, timeout_s=10, what="the request's span")
        stages = {"queue", *STAGES}
        children = wait_until(lambda: [sp for _, sp in receiver.spans
                                       if sp.parent_span_id == root.span_id] or None,
                              timeout_s=10, what="the stage spans")
        wait_until(lambda: {sp.name for _, sp in receiver.spans
                            if sp.parent_span_id == root.span_id} >= stages, timeout_s=10,
                   what="every stage")
    children = [sp for _, sp in receiver.spans if sp.parent_span_id == root.span_id]
    assert {sp.name for sp in children} == stages
    assert root.trace_id.hex() == trace_id                          # the caller's trace
    assert root.parent_span_id.hex() == "00f067aa0ba902b7"
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["sine.request_id"].string_value == "traced-1"
    assert attrs["http.response.status_code"].int_value == 200
    assert root.kind == root.SPAN_KIND_SERVER
    # end to end, inside the request's span, in the path's order
    ordered = sorted(children, key=lambda sp: sp.start_time_unix_nano)
    assert [sp.name for sp in ordered] == ["queue", *STAGES]
    for a, b in zip(ordered, ordered[1:]):
        assert a.end_time_unix_nano == b.start_time_unix_nano
    assert root.start_time_unix_nano <= ordered[0].start_time_unix_nano
    assert ordered[-1].end_time_unix_nano <= root.end_time_unix_nano
    res = next(res for res, sp in receiver.spans if sp.span_id == root.span_id)
    assert res["service.name"] == "sine-under-test"


def test_traces_are_off_by_default(small_world, redis_server, serve, receiver):
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0)
    with serve(s) as c:
        assert c.app.state.sine.tracing is None
        assert c.post("/recommend", json={"user_id": "x", "n": 2}).status_code == 200
    assert receiver.spans == []
