"""Typed errors and their one mapping to HTTP: RFC 9457 problem+json bodies, never a stack trace."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sine.service")
PROBLEM = "application/problem+json"


class ServiceError(Exception):
    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, title, slug = 422, "Invalid request", "invalid-request"


class NotReady(ServiceError):
    status, title, slug = 503, "Not ready", "not-ready"


class HistoryUnavailable(ServiceError):
    status, title, slug = 503, "History store unavailable", "history-unavailable"


class Unauthorized(ServiceError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class ReloadRefused(ServiceError):
    status, title, slug = 409, "Bundle refused", "reload-refused"


class Disabled(ServiceError):
    status, title, slug = 404, "Not enabled", "disabled"


def problem(status: int, title: str, detail: str, slug: str, instance: str | None = None,
            headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _loc(loc: tuple) -> str:
    # pydantic names union branches in the location ("constrained-str", "int"): not fields
    parts = [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _BRANCHES or "-" in p or "[" in p))]
    return ".".join(parts) or "body"


_BRANCHES = {"str", "int", "bool", "float", "list", "dict", "none"}


def _field_errors(errs: list[dict]) -> list[dict]:
    """One entry a field; the branches of a union joined with 'or'."""
    merged: dict[str, list[str]] = {}
    for x in errs:
        msgs = merged.setdefault(_loc(x["loc"]), [])
        if x["msg"] not in msgs:
            msgs.append(x["msg"])
    return [{"field": f, "message": " or ".join(m)} for f, m in merged.items()]


def install(app: FastAPI, on_error=None) -> None:
    """Register the handlers. `on_error(reason)` counts each mapped failure."""
    count = on_error or (lambda reason: None)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, e: ServiceError):
        count(e.slug)
        return problem(e.status, e.title, e.detail, e.slug, request.url.path, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(x.get("type") == "json_invalid" for x in errs):
            count("bad-json")
            return problem(400, "Malformed JSON", "The request body is not valid JSON: "
                           + "; ".join(str(x.get("ctx", {}).get("error", x.get("msg"))) for x in errs),
                           "bad-json", request.url.path)
        fields = _field_errors(errs)
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        count("invalid-request")
        return problem(422, "Invalid request", detail, "invalid-request", request.url.path,
                       errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        titles = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"No endpoint {request.method} {request.url.path}; see /docs."
        return problem(e.status_code, titles.get(e.status_code, "HTTP error"), detail,
                       f"http-{e.status_code}", request.url.path,
                       getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        count("internal")
        log.exception("unhandled error", extra={"path": request.url.path})
        return problem(500, "Internal error", "The server failed to answer; the error is logged.",
                       "internal", request.url.path)
