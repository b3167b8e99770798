"""`POST /admin/reload` (its token is checked by the guard, before the body is read)."""

from .. import errors, lifecycle
from ..deps import StateDep
from ..schemas import ReloadRequest
from . import Router


async def admin_reload(st: StateDep, body: ReloadRequest | None = None) -> dict[str, str | None]:
    """Load, validate and warm a bundle version beside the live one, then swap. Needs
    `Authorization: Bearer <SINE_ADMIN_TOKEN>` (checked before the body is read); without
    the setting every call is 401."""
    old = st.engine.version if st.engine else None
    eng = await lifecycle.reload(st, body.version if body else None)
    return {"previous": old, "version": eng.version}



def register(app: Router) -> None:
    app.add_api_route("/admin/reload", admin_reload, methods=["POST"], tags=["operations"],
                      responses=errors.responses(400, 401, 409, 413, 415, 422))
