"""`imgfarm.window_tick`: opens due maintenance windows and tops them up (tasks/window_runner.py)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from imgfarm.tasks.window_runner import tick


@shared_task(name="imgfarm.window_tick", ignore_result=True)
def window_tick() -> dict[str, Any]:
    return tick()
