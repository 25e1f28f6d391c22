"""`imgfarm.window_tick`: opens due maintenance windows and tops them up (see issue 4)."""

from __future__ import annotations

from typing import Any

from imgfarm.worker.app import app


@app.task(name="imgfarm.window_tick", ignore_result=True)
def window_tick() -> dict[str, Any]:
    try:
        from imgfarm.tasks.window_runner import tick
    except ImportError:
        return {}
    return tick()
