"""The Celery app a process sends jobs with, and the check that its broker answers.

The task modules declare their tasks with `shared_task`, bound to no app;
every app registers them. The worker's app (worker/app.py) is made here, by
`make_app`, with the task modules included. A process that only sends jobs
(the API, the CLI, the reconciler run by hand) gets the same configuration
from `farm_app()` on first use. Either way the app is the process's default
app, so a shared task resolves to it in every thread (Celery's "current app"
is per thread; the default is not).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from imgfarm.config.celery import celery_config
from imgfarm.config.settings import get_settings
from imgfarm.errors import ServiceUnavailable

_lock = threading.RLock()
_app: Celery | None = None


def make_app(include: Sequence[str] = ()) -> Celery:
    """A Celery app configured from the settings, made this process's default app."""
    global _app
    with _lock:
        app = Celery("imgfarm", include=list(include))
        app.conf.update(celery_config(get_settings()))
        app.set_default()
        _app = app
        return app


def farm_app() -> Celery:
    """This process's app: the worker's, or one made now for sending."""
    with _lock:
        return _app if _app is not None else make_app()


def send(name: str, args: tuple[Any, ...], **options: Any) -> AsyncResult:
    """Send the task called `name` to this process's broker (its module must be imported)."""
    return farm_app().tasks[name].apply_async(args=args, **options)


def reload_config() -> None:
    """Re-read settings into the app (tests change the environment).

    A new broker URL also drops the pooled connections: Celery keeps its
    producer pool for the app's lifetime, so they would still go to the old one.
    """
    app = farm_app()
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
    app = farm_app()
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
