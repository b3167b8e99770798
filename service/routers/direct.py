"""`POST /recommend` (and the benchmarks' `/floor`) and `GET /livez` straight from ASGI: behind
the guard, past FastAPI's routing, dependency resolution and request object. The liveness probe
is here because it is the cheapest request a client can send: hundreds of sockets opening at
once each ask it (loadtests.idle's stray-byte kind), and through FastAPI that burst holds the
event loop several times longer.

The guard (`service.guard`) has already checked the token, the size and the content type and
read the whole body; here it is validated by the same pydantic model the FastAPI route is
registered with, and the same endpoint function answers. Errors map as `service.errors` maps
them (400 bad JSON, 422 per field, a ServiceError to its status); anything else propagates to
the app's 500 handler. The FastAPI routes stay registered: they are what the OpenAPI document
describes, and what answers with `direct_routes` off."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from ..state import State

Endpoint = Callable[[Any, State], Awaitable[Any]]


UNPARSED = "There was an error parsing the body"     # FastAPI's words for a body not UTF-8


def refusal(model: type[BaseModel], raw: bytes) -> list[Any] | None:
    """Why `raw` is not a valid `model`, in the words FastAPI's body reading uses (it decodes
    the JSON first, then validates the object from attributes; None: not UTF-8): a refused
    body is rare, so it is read again rather than pydantic's own JSON errors mapped."""
    if not raw:
        return [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return None
    except json.JSONDecodeError as e:
        return [{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                 "ctx": {"error": e.msg}}]
    try:
        model.model_validate(obj, from_attributes=True)
    except ValidationError as e:
        return [{**x, "loc": ("body", *x["loc"])} for x in e.errors()]
    return [{"type": "value_error", "loc": ("body",), "msg": "Invalid body"}]   # not reached


class DirectRoutes:
    """ASGI middleware: POST to one of `routes` ({path: (body model, endpoint)}) and GET to one
    of `probes` ({path: endpoint of the state alone}) are answered here; every other request
    goes on to the app."""

    def __init__(self, app: ASGIApp, state: State,
                 routes: Mapping[str, tuple[type[BaseModel], Endpoint]],
                 count: Callable[[str], None],
                 probes: Mapping[str, Callable[[State], Awaitable[Any]]] | None = None):
        self.app, self.st, self.routes, self.count = app, state, routes, count
        self.probes = dict(probes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in self.probes:
            # a probe answers from the state alone, as FastAPI's route would: a dict as JSON
            got = await self.probes[scope["path"]](self.st)
            answer = got if isinstance(got, Response) else JSONResponse(got)
            return await answer(scope, receive, send)
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        model, endpoint = route
        raw = (await receive()).get("body", b"")  # the guard's replay: the whole body, one message
        try:
            body = model.model_validate_json(raw)
        except ValidationError:
            why = refusal(model, raw)
            if why is None:            # not UTF-8: FastAPI's own 400
                self.count("http-400")
                answer = errors.problem(400, errors.TITLES[400], UNPARSED, "http-400",
                                        scope["path"])
            else:
                answer = errors.invalid(why, scope["path"], self.count)
            return await answer(scope, receive, send)
        try:
            answer = await endpoint(body, self.st)
        except errors.ServiceError as e:
            answer = errors.service_problem(e, scope["path"], self.count)
        await answer(scope, receive, send)
