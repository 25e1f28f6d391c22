"""The Celery app. It only creates the app and loads configuration; the
tasks (in tasks/) register themselves on import.

Start a job worker with `imgfarm worker` (threads pool, queue imgfarm.jobs)
and a convert worker with `imgfarm worker --cpu` (prefork, queue imgfarm.cpu).
"""

from __future__ import annotations

from celery import Celery

from imgfarm.config.celery import celery_config
from imgfarm.config.settings import get_settings

app = Celery("imgfarm")
app.conf.update(celery_config(get_settings()))
app.conf.imports = (
    "imgfarm.tasks.jobs",
    "imgfarm.tasks.convert",
    "imgfarm.tasks.reconcile",
    "imgfarm.tasks.windows",
    "imgfarm.tasks.power_sync",
)


def reload_config() -> None:
    """Re-read settings into the app (tests change the environment)."""
    app.conf.update(celery_config(get_settings()))
