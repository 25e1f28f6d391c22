"""Bulk reimaging windows over HTTP: /api/v1/windows (the same operations as `imgfarm window`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import select

from imgfarm.api.operator_routes import operator_auth
from imgfarm.errors import Conflict
from imgfarm.models.db import session_scope
from imgfarm.models.windows import (
    ON_CLOSE_FINISH,
    RUN_CLOSED,
    Window,
    WindowRun,
    add_window,
    get_window,
    run_view,
    window_view,
)
from imgfarm.tasks import window_runner

router = APIRouter(prefix="/api/v1/windows", tags=["windows"],
                   dependencies=[Depends(operator_auth)])


class WindowIn(BaseModel):
    name: str
    cron: str
    duration_minutes: int
    image: str
    nodes: str = ""
    groups: list[str] = []
    timezone: str = "UTC"
    convert: bool = False
    max_concurrent: int = 20
    store_cap: int | None = None
    on_close: str = ON_CLOSE_FINISH
    max_retries: int = 1
    enabled: bool = True


@router.get("")
def list_windows() -> list[dict[str, Any]]:
    with session_scope() as s:
        return [window_view(x) for x in s.scalars(select(Window).order_by(Window.name))]


@router.post("", status_code=201)
def create_window(body: WindowIn) -> dict[str, Any]:
    with session_scope() as s:
        return window_view(add_window(s, **body.model_dump()))


@router.get("/{name}")
def read_window(name: str, runs: bool = False, limit: int = 10) -> dict[str, Any]:
    with session_scope() as s:
        window = get_window(s, name)
        view = window_view(window)
        if runs:
            q = (select(WindowRun).where(WindowRun.window_id == window.id)
                 .order_by(WindowRun.id.desc()).limit(limit))
            view["runs"] = [run_view(r) for r in s.scalars(q)]
        return view


def _set_enabled(name: str, enabled: bool) -> dict[str, Any]:
    with session_scope() as s:
        window = get_window(s, name)
        window.enabled = enabled
        return window_view(window)


@router.post("/{name}/enable")
def enable(name: str) -> dict[str, Any]:
    return _set_enabled(name, True)


@router.post("/{name}/disable")
def disable(name: str) -> dict[str, Any]:
    return _set_enabled(name, False)


@router.delete("/{name}")
def remove(name: str) -> dict[str, Any]:
    with session_scope() as s:
        window = get_window(s, name)
        if any(r.state != RUN_CLOSED for r in window.runs):
            raise Conflict(f"window {name} has a run in progress",
                           hint="disable it and wait for the run to close")
        s.delete(window)
    return {"removed": name}


@router.post("/{name}/run-now", status_code=201)
def run_now(name: str) -> dict[str, Any]:
    return window_runner.run_now(name)
