"""Typed errors and their one mapping to HTTP: RFC 9457 problem+json bodies, never a stack trace."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .tracing import REQUEST_ID

log = logging.getLogger("sine.service")
PROBLEM = "application/problem+json"


class ServiceError(Exception):
    """An error with its HTTP status, title and problem slug; the handlers map it in one place."""
    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ServiceError):
    """A request whose content is invalid (422)."""
    status, title, slug = 422, "Invalid request", "invalid-request"


class NotReady(ServiceError):
    """No bundle is served yet (503)."""
    status, title, slug = 503, "Not ready", "not-ready"


class HistoryUnavailable(ServiceError):
    """The history store cannot answer (503)."""
    status, title, slug = 503, "History store unavailable", "history-unavailable"


class ClickLogFull(ServiceError):
    """The click log is at its hard cap with nothing exported to trim (503)."""
    status, title, slug = 503, "Click log full", "click-log-full"


class ReloadRefused(ServiceError):
    """A bundle that cannot be loaded; the old one keeps serving (409)."""
    status, title, slug = 409, "Bundle refused", "reload-refused"


class Overloaded(ServiceError):
    """More work in flight than the pool admits (429)."""
    status, title, slug = 429, "Too many requests in flight", "overloaded"


class BodyTooLarge(HTTPException):
    """Raised while a body without Content-Length streams past its limit. An HTTPException, so
    that FastAPI's body reader passes it on instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed",
          408: "Request timeout", 413: "Payload too large", 415: "Unsupported media type",
          429: "Too many requests", 431: "Request header fields too large",
          503: "Service unavailable"}
SLUGS = {401: "unauthorized", 408: "request-timeout", 413: "payload-too-large",
         415: "unsupported-media-type", 429: "overloaded", 431: "headers-too-large"}


class Problem(BaseModel):
    """RFC 9457 problem details: every error answer has this body."""
    type: str = Field(examples=["/problems/invalid-request"])
    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["n: Input should be less than or equal to 100"])
    instance: str | None = Field(None, examples=["/recommend"])
    request_id: str | None = Field(None, examples=["4bf92f3577b34da6a3ce929d0e0e4736"],
                                   description="The request's `X-Request-ID`, as echoed.")
    errors: list[dict[str, str]] | None = Field(
        None, description="422 only: one entry a field, `{field, message}`.")


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, each a problem+json."""
    what = {400: "The body is not valid JSON", 401: "Missing or wrong token",
            404: "Not enabled", 408: "The body did not arrive within SINE_BODY_TIMEOUT_S; the "
                                     "connection is closed",
            409: "Bundle refused; the old one keeps serving",
            413: "The body is larger than the route's limit (SINE_MAX_BODY_BYTES, "
                 "SINE_MAX_BATCH_BODY_BYTES)",
            415: "The body is not sent as application/json",
            422: "A field is missing or invalid; `detail` and `errors` name it",
            429: "Too many users in flight (SINE_MAX_IN_FLIGHT, SINE_MAX_BATCH_IN_FLIGHT); retry "
                 "after `Retry-After`",
            503: "Not ready (no bundle), or the history store is unavailable (events; "
                 "recommendations in strict mode), or the click log is full (events)"}
    return {s: {"description": what[s], "model": Problem,
                "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}


def problem(status: int, title: str, detail: str, slug: str, instance: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": f"/problems/{slug}", "title": title, "status": status,
                            "detail": detail}
    if instance:
        body["instance"] = instance
    rid = REQUEST_ID.get()
    if rid is not None:
        body["request_id"] = rid
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic names union branches in the location ("constrained-str", "int"): not fields
    parts = [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _BRANCHES or "-" in p or "[" in p))]
    return ".".join(parts) or "body"


_BRANCHES = {"str", "int", "bool", "float", "list", "dict", "none"}


def _field_errors(errs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One entry a field; the branches of a union joined with 'or'."""
    merged: dict[str, list[str]] = {}
    for x in errs:
        msgs = merged.setdefault(_loc(x["loc"]), [])
        if x["msg"] not in msgs:
            msgs.append(x["msg"])
    return [{"field": f, "message": " or ".join(m)} for f, m in merged.items()]


def invalid(errs: list[Any], path: str, count: Callable[[str], None]) -> JSONResponse:
    """A body that failed validation (pydantic's errors): 400 when it is not JSON at all, else
    422 naming each field."""
    if any(x.get("type") == "json_invalid" for x in errs):
        count("bad-json")
        return problem(400, "Malformed JSON", "The request body is not valid JSON: "
                       + "; ".join(str(x.get("ctx", {}).get("error", x.get("msg"))) for x in errs),
                       "bad-json", path)
    fields = _field_errors(errs)
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    count("invalid-request")
    return problem(422, "Invalid request", detail, "invalid-request", path, errors=fields)


def service_problem(e: ServiceError, path: str, count: Callable[[str], None]) -> JSONResponse:
    count(e.slug)
    return problem(e.status, e.title, e.detail, e.slug, path, e.headers)


def install(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Register the handlers. `on_error(reason)` counts each mapped failure."""
    count = on_error or (lambda reason: None)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, e: ServiceError) -> JSONResponse:
        return service_problem(e, request.url.path, count)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return invalid(list(e.errors()), request.url.path, count)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"No endpoint {request.method} {request.url.path}; see /docs."
        slug = SLUGS.get(e.status_code, f"http-{e.status_code}")
        count(slug)
        return problem(e.status_code, TITLES.get(e.status_code, "HTTP error"), detail, slug,
                       request.url.path,
                       getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        count("internal")
        log.exception("unhandled error", extra={"path": request.url.path})
        return problem(500, "Internal error", "The server failed to answer; the error is logged.",
                       "internal", request.url.path)
