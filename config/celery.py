"""Celery configuration, built from the farm's settings.

Why these values (see shared/docs/CELERY-NOTES.md):
- Job tasks wait for a node for minutes to hours. They run in a *threads*
  pool (one cheap thread per waiting job, blocked on a Redis pub/sub wake-up
  or a timer, so 500 jobs in flight cost one process and no CPU); the
  CPU-bound convert task runs on its own queue in a prefork worker.
- acks_late + reject_on_worker_lost: a job message is acknowledged only
  when its task ends, so a killed worker's job is delivered again; the task
  is idempotent (it resumes waiting when the job is past `queued`, and never
  boots a node twice). The reconciler does not wait for the broker: it
  re-enqueues jobs whose waiting worker stopped heartbeating.
- visibility_timeout is long (12 h by default) so that a job that is simply
  long is not redelivered while it still runs; it is set in all three places
  kombu reads it (celery #7651, #9339).
- worker_consumer: Celery's consumer with one fix, so that a worker survives a
  restart of Redis (worker/consumer.py says why).
- Events on, and task-sent events, so Flower sees jobs from the moment they
  are queued.
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

from imgfarm.config.settings import Settings

JOB_QUEUE = "imgfarm.jobs"
CPU_QUEUE = "imgfarm.cpu"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    result_backend = settings.result_backend
    if settings.broker_prefix:
        transport["global_keyprefix"] = settings.broker_prefix
    if settings.broker_url.startswith("filesystem://"):
        # No Redis: Celery's file-system broker, good for one machine (make demo). Every
        # folder it writes is named here, under the data directory: kombu's defaults
        # (control/, data_in/, data_out/) are relative to whatever directory a worker
        # happens to start in.
        folder = settings.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update({"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                          "processed_folder": str(folder / "processed"), "store_processed": False,
                          "control_folder": str(folder / "control")})
        if result_backend.startswith("filesystem://"):
            (settings.data_dir / "results").mkdir(parents=True, exist_ok=True)
            result_backend = f"file://{settings.data_dir / 'results'}"
    if result_backend.startswith("memory://"):
        # The in-process broker (tests): kombu has memory://, Celery's results have no
        # backend of that name; its in-memory one is the cache backend's.
        result_backend = "cache+memory://"
    return {
        "broker_url": settings.broker_url,
        "result_backend": result_backend,
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 7 * 24 * 3600,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": False,  # the job row has the real state; saves a write per task
        "worker_hijack_root_logger": False,
        # reconnects after a broker restart where Celery's own consumer gives up
        "worker_consumer": "imgfarm.worker.consumer:Consumer",
        "task_queues": (Queue(JOB_QUEUE), Queue(CPU_QUEUE)),
        "task_default_queue": JOB_QUEUE,
        "task_routes": {
            "imgfarm.convert": {"queue": CPU_QUEUE},
            "imgfarm.capture": {"queue": JOB_QUEUE},
            "imgfarm.restore": {"queue": JOB_QUEUE},
        },
        "beat_schedule": {
            "imgfarm-reconcile": {
                "task": "imgfarm.reconcile",
                "schedule": settings.reconcile_interval,
                "options": {"expires": settings.reconcile_interval},
            },
            "imgfarm-power-sync": {
                "task": "imgfarm.power_sync",
                "schedule": settings.ipmi.sync_interval,
                "options": {"expires": settings.ipmi.sync_interval},
            },
            "imgfarm-window-tick": {
                "task": "imgfarm.window_tick",
                "schedule": settings.window_tick_interval,
                "options": {"expires": settings.window_tick_interval},
            },
        },
        "timezone": "UTC",
        "enable_utc": True,
    }
