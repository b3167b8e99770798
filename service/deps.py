"""The routes' typed dependencies, in one place: the app's state and what it holds."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .settings import Settings
from .state import State


def get_state(request: Request) -> State:
    st: State = request.app.state.sine
    return st


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


StateDep = Annotated[State, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
