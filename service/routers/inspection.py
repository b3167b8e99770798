"""The inspector: `GET /inspect` (a page of plain HTML, CSS and JavaScript from the package, no
CDN) and its data, `POST /admin/inspect` (the admin token, unless `inspector=open`). Registered
only when `inspector` is not `off`."""
from enum import Enum
from importlib import resources

from fastapi import HTTPException
from fastapi.responses import Response

from .. import errors, inspector
from ..deps import StateDep
from ..inspector import INSPECT_API
from ..schemas import InspectBody, Inspection, RequestModels
from . import Router, bind

# the page's files: {route name: (file, media type)}
ASSETS = {"inspect.js": ("inspect.js", "text/javascript"),
          "inspect.css": ("inspect.css", "text/css")}
PAGE = ("inspect.html", "text/html; charset=utf-8")
TAGS: list[str | Enum] = ["operations"]


def _asset(name: str, media: str) -> Response:
    body = resources.files("service").joinpath("static", name).read_bytes()
    # the page's own files only: no inline script, no other origin
    return Response(body, media_type=media, headers={
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                   "frame-ancestors 'none'"})


async def page() -> Response:
    """The inspector page (it calls POST /admin/inspect)."""
    return _asset(*PAGE)


async def asset(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise HTTPException(404, f"No inspector file {name!r}.")
    return _asset(*ASSETS[name])


async def inspect(req: InspectBody, st: StateDep) -> dict[str, object]:
    """A user's clicks as the service reads them, each interest's weight and top items, the
    aggregate's and every merge's answer, with titles where the bundle has them."""
    engine = st.serving()
    with st.admission.admit(1):
        return await inspector.inspect(engine, st.store, str(req.user_id), req.n)


def register(app: Router, models: RequestModels) -> None:
    app.add_api_route("/inspect", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/inspect/{name}", asset, methods=["GET"], include_in_schema=False)
    app.add_api_route(INSPECT_API, bind(inspect, req=models.inspect), methods=["POST"],
                      response_model=Inspection, tags=TAGS,
                      responses=errors.responses(400, 401, 413, 415, 422, 429, 503))
