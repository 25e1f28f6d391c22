"""Bulk reimaging windows over HTTP: /api/v1/windows (the same operations as `imgfarm window`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from imgfarm.api.operator_routes import Operator, Reader
from imgfarm.models.db import session_scope
from imgfarm.models.states import ON_CLOSE_FINISH
from imgfarm.models.windows import (
    MAX_RUNS_SHOWN,
    add_window,
    remove_window,
    set_enabled,
    window_detail,
    window_view,
    window_views,
)
from imgfarm.tasks import window_runner

router = APIRouter(prefix="/api/v1/windows", tags=["windows"])


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
    multicast: bool = False
    max_wait: float = 0
    max_bitrate: str = Field("", max_length=64)


@router.get("")
def list_windows(_who: Reader) -> list[dict[str, Any]]:
    with session_scope() as s:
        return window_views(s)


@router.post("", status_code=201)
def create_window(body: WindowIn, _who: Operator) -> dict[str, Any]:
    with session_scope() as s:
        return window_view(add_window(s, **body.model_dump()))


@router.get("/{name}")
def read_window(name: str, _who: Reader, runs: bool = False,
                limit: int = Query(10, ge=1, le=MAX_RUNS_SHOWN)) -> dict[str, Any]:
    with session_scope() as s:
        return window_detail(s, name, runs=runs, limit=limit)


@router.post("/{name}/enable")
def enable(name: str, _who: Operator) -> dict[str, Any]:
    with session_scope() as s:
        return set_enabled(s, name, True)


@router.post("/{name}/disable")
def disable(name: str, _who: Operator) -> dict[str, Any]:
    with session_scope() as s:
        return set_enabled(s, name, False)


@router.delete("/{name}")
def remove(name: str, _who: Operator) -> dict[str, Any]:
    with session_scope() as s:
        remove_window(s, name)
    return {"removed": name}


@router.post("/{name}/run-now", status_code=201)
def run_now(name: str, _who: Operator) -> dict[str, Any]:
    return window_runner.run_now(name)
