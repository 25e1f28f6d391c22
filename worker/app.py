"""The Celery app of the workers, beat and Flower (`celery -A imgfarm.worker.app`).

It makes the app (tasks/broker.py: the same configuration every sender
uses), includes the task modules, and runs what a worker process needs on
top of them: its heartbeat and the job wake-ups once it is ready, a first
reconcile pass so orphaned jobs resume at once, and fresh database
connections in every prefork child.

Start a job worker with `imgfarm worker` (threads pool, queue imgfarm.jobs)
and a convert worker with `imgfarm worker --cpu` (prefork, queue imgfarm.cpu).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_process_init, worker_ready

from imgfarm.config.settings import get_settings
from imgfarm.models.db import dispose_all
from imgfarm.tasks.broker import make_app
from imgfarm.tasks.reconcile import reconcile_once
from imgfarm.tasks.wakeup import get_waker
from imgfarm.worker.heartbeat import start_heartbeat

log = logging.getLogger(__name__)

TASK_MODULES = (
    "imgfarm.tasks.jobs",
    "imgfarm.tasks.convert",
    "imgfarm.tasks.reconcile",
    "imgfarm.tasks.windows",
    "imgfarm.tasks.power_sync",
)

app = make_app(include=TASK_MODULES)


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Heartbeat, wake-ups, and one reconcile pass so orphaned jobs resume at once."""
    start_heartbeat()
    get_waker(get_settings().redis_url)

    def first_pass() -> None:
        try:
            reconcile_once()
        except Exception:  # noqa: BLE001
            log.exception("start-up reconcile failed")

    threading.Thread(target=first_pass, name="imgfarm-startup-reconcile", daemon=True).start()


@worker_process_init.connect
def _on_child_start(**_: Any) -> None:
    """A prefork child (the convert worker) must not reuse its parent's DB connections."""
    dispose_all(close=False)
