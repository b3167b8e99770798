"""Request ids and OpenTelemetry traces.

Every HTTP request gets an id: the caller's `X-Request-ID` when it is a sane token (1-128 of
`A-Z a-z 0-9 . _ : - + = /`), else a new one. It is echoed in the answer's `X-Request-ID`, put on
every log line written while the request runs (`service.logs`) and in every problem body.

Traces are opt-in, through OpenTelemetry's own variables: `OTEL_TRACES_EXPORTER=otlp` (or
`console`) turns them on, and the SDK reads the rest itself: `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (OTLP over HTTP, protobuf), `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_SERVICE_NAME` (default `sine-retrieval`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
and `OTEL_BSP_*`. A request is one SERVER span, continuing a W3C `traceparent` when the caller
sends one; the retrieval routes add one child per stage (queue, history, encode, search,
filter, or popularity for a fallback), laid end to end from the stage times the request path
measures for `Server-Timing` (a micro-batch runs its stages one after another). Off, the request
path pays one `is None` test per request.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span

REQUEST_ID: ContextVar[str | None] = ContextVar("sine_request_id", default=None)
CURRENT_SPAN: ContextVar[Span | None] = ContextVar("sine_span", default=None)
HEADER = b"x-request-id"
_SANE = re.compile(rb"[A-Za-z0-9._:\-+=/]{1,128}")
SERVICE_NAME = "sine-retrieval"


def request_id(given: bytes | None) -> str:
    """The caller's id when it is a sane token, else a new random one."""
    if given is not None and _SANE.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class Tracing:
    """The service's tracer; built only when traces are on (`Tracing.of` returns None)."""

    def __init__(self, exporter: str) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        self.provider = TracerProvider(resource=resource)       # OTEL_TRACES_SAMPLER applies
        out: SpanExporter
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            out = OTLPSpanExporter()                            # OTEL_EXPORTER_OTLP_* apply
        else:
            out = ConsoleSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(out))
        self.tracer = self.provider.get_tracer("sine.service", __version__)
        self._trace, self._propagate = trace, propagate
        self.server = trace.SpanKind.SERVER

    @classmethod
    def of(cls, exporter: str) -> Tracing | None:
        return None if exporter == "none" else cls(exporter)

    def request(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]],
                rid: str) -> Span:
        """The request's SERVER span, a child of the caller's `traceparent` if it sent one."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        parent = self._propagate.extract(carrier)
        return self.tracer.start_span(f"{method} {path}", context=parent, kind=self.server,
                                      attributes={"http.request.method": method,
                                                  "url.path": path, "sine.request_id": rid})

    @staticmethod
    def answered(span: Span, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))

    def stages(self, span: Span, start_ns: int, timings: dict[str, float],
               **attributes: Any) -> None:
        """One child span per stage, end to end from `start_ns` (when the request joined the
        micro-batch queue), each as long as that stage took."""
        ctx = self._trace.set_span_in_context(span)
        t = start_ns
        for name, seconds in timings.items():
            end = t + int(seconds * 1e9)
            child = self.tracer.start_span(name, context=ctx, start_time=t,
                                           attributes=attributes)
            child.end(end_time=end)
            t = end

    def shutdown(self) -> None:
        """Flushes what is queued for the exporter."""
        self.provider.shutdown()
