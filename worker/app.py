"""The Celery app. It only creates the app and loads configuration; the
tasks (in tasks/) register themselves on import.

Start a job worker with `imgfarm worker` (threads pool, queue imgfarm.jobs)
and a convert worker with `imgfarm worker --cpu` (prefork, queue imgfarm.cpu).
"""

from __future__ import annotations

from celery import Celery
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from imgfarm.config.celery import celery_config
from imgfarm.config.settings import get_settings
from imgfarm.errors import ServiceUnavailable

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
    """Re-read settings into the app (tests change the environment).

    A new broker URL also drops the pooled connections: Celery keeps its
    producer pool for the app's lifetime, so they would still go to the old one.
    """
    old = app.conf.broker_url
    app.conf.update(celery_config(get_settings()))
    if app.conf.broker_url != old:
        app._after_fork()  # Celery's own reset of the connection and producer pools


def check_broker(timeout: float = 3.0) -> None:
    """Raise ServiceUnavailable unless the broker (and a Redis result store) answer now.

    Why before a submit writes anything: kombu and Celery's result consumer
    retry a dead Redis for ~20 s and then fail with a traceback, after the job
    rows exist; checking first turns that into one clear error and no rows.
    """
    urls = {"broker": app.conf.broker_url}
    backend = str(app.conf.result_backend or "")
    if backend.startswith(("redis://", "rediss://")) and backend != urls["broker"]:
        urls["result store"] = backend
    for what, url in urls.items():
        if url.startswith(("filesystem://", "memory://")):
            continue
        quick = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        conn = (app.connection_for_write(connect_timeout=timeout, transport_options=quick)
                if what == "broker"  # the app's own TLS and transport settings
                else Connection(url, connect_timeout=timeout, transport_options=quick))
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                                   interval_max=0.2, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot queue now"
            shown = maybe_sanitize_url(url)  # password masked
            raise ServiceUnavailable(
                f"cannot reach the {what} at {shown}: {exc}",
                hint="check IMGFARM_BROKER_URL and that Redis runs (`redis-cli -u URL ping`); "
                     "nothing was submitted") from None
        finally:
            conn.release()
