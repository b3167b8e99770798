"""The routes' typed dependency, in one place: the app's state (settings, engine, store)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .state import State


# async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on
# every request for what is an attribute read
async def get_state(request: Request) -> State:
    st: State = request.app.state.sine
    return st


StateDep = Annotated[State, Depends(get_state)]
