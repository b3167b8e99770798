"""`POST /admin/reload` and `GET`/`PUT /admin/arms` (their token is checked by the guard, before
the body is read)."""

from .. import errors, lifecycle
from ..deps import StateDep
from ..schemas import ArmsLayout, ArmsRequest, ReloadRequest
from . import Router


async def admin_reload(st: StateDep, body: ReloadRequest | None = None) -> dict[str, str | None]:
    """Load, validate and warm a bundle version beside the live one, then swap. Needs
    `Authorization: Bearer <SINE_ADMIN_TOKEN>` (checked before the body is read); without
    the setting every call is 401."""
    old = st.engine.version if st.engine else None
    eng = await lifecycle.reload(st, body.version if body else None)
    return {"previous": old, "version": eng.version}



async def arms_get(st: StateDep) -> dict[str, object]:
    """The live rollout layout: each candidate arm's weight and status, and the shadow."""
    return st.arms.layout.describe()


async def arms_put(st: StateDep, body: ArmsRequest) -> dict[str, object]:
    """Replace the rollout layout, live: candidates not loaded yet are loaded beside the served
    bundle first; one that cannot be loaded is listed as refused and takes no traffic."""
    layout = await lifecycle.set_arms(st, dict(body.arms), body.shadow, body.shadow_rate)
    return layout.describe()


def register(app: Router) -> None:
    app.add_api_route("/admin/reload", admin_reload, methods=["POST"], tags=["operations"],
                      responses=errors.responses(400, 401, 409, 413, 415, 422))
    app.add_api_route("/admin/arms", arms_get, methods=["GET"], tags=["operations"],
                      response_model=ArmsLayout, responses=errors.responses(401))
    app.add_api_route("/admin/arms", arms_put, methods=["PUT"], tags=["operations"],
                      response_model=ArmsLayout,
                      responses=errors.responses(400, 401, 413, 415, 422))
