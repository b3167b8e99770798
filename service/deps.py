"""The routes' typed dependencies, in one place: the app's state and what it holds."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .settings import Settings
from .state import State


# async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on
# every request for what is an attribute read
async def get_state(request: Request) -> State:
    st: State = request.app.state.sine
    return st


async def get_settings(request: Request) -> Settings:
    st: State = request.app.state.sine
    return st.settings


StateDep = Annotated[State, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
