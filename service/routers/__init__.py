"""One router module per resource: `retrieval` (/recommend, /recommend/batch), `events`
(/events), `operations` (probes, metrics, the served bundle) and `admin` (/admin/reload).

Each module's `register(app, ...)` adds its routes to the app. Each route is a module-level
function typed with its body's base model; `bind` registers it with this app's model (the
limits from Settings), so that validation and the OpenAPI document carry them."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI

Router = FastAPI | APIRouter    # routes go straight onto the app: an included router costs a hop

def bind(endpoint: Callable[..., Awaitable[Any]], **models: type) -> Callable[..., Awaitable[Any]]:
    """`endpoint` with the annotations of the parameters in `models` replaced (what FastAPI
    reads to validate and to document the body)."""
    sig = inspect.signature(endpoint, eval_str=True)
    params = [p.replace(annotation=models.get(p.name, p.annotation)) for p in sig.parameters.values()]

    @functools.wraps(endpoint)
    async def bound(*args: Any, **kwargs: Any) -> Any:
        return await endpoint(*args, **kwargs)

    bound.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return bound
