"""The heartbeat thread of a job worker: keeps its row in the workers table fresh.

Started when the worker is ready (worker/app.py); what the rows mean, and
how the reconciler reads them, is in models/workers.py.
"""

from __future__ import annotations

import logging
import threading

from imgfarm.config.settings import get_settings
from imgfarm.models.workers import beat_once

log = logging.getLogger(__name__)

_started = threading.Event()


def start_heartbeat() -> None:
    """Register this process and keep its row fresh (idempotent)."""
    if _started.is_set():
        return
    _started.set()
    interval = get_settings().worker_heartbeat
    beat_once()

    def loop() -> None:
        ev = threading.Event()
        while not ev.wait(interval):
            try:
                beat_once()
            except Exception as exc:  # noqa: BLE001 - try again next beat
                log.warning("worker heartbeat failed: %s", exc)

    threading.Thread(target=loop, name="imgfarm-heartbeat", daemon=True).start()
