"""The Celery tasks `imgfarm.capture` and `imgfarm.restore`.

Thin wrappers: they take the job id (plus node and image, only so Flower and
`celery inspect` show them) and call tasks/lifecycle.py. A job that does not
succeed raises JobEnded with its reason, so Flower lists it as FAILURE with
that reason; while it waits, the task sends `task-progress` events (Flower
shows the state PROGRESS). Progress is not written to the result backend:
the job database has it, and one Redis write per report per job is what
the waiting budget cannot afford.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Task, shared_task

from imgfarm.models import states
from imgfarm.protocol import JobKind
from imgfarm.tasks.lifecycle import JobEnded, run_job
from imgfarm.units import format_bytes

log = logging.getLogger(__name__)


FLUSH_EVERY = 1.0  # seconds: how late Flower may see a progress report, at most


class _ProgressEvents:
    """One event dispatcher, on a broker connection of its own, for every job thread.

    `Task.send_event` borrows a producer per call, and on the Redis transport
    each publish then builds a new client: at hundreds of waiting jobs that
    was most of the worker's CPU while it waits. One connection, one lock.

    And one publish a second: the events are buffered (Celery's own event
    buffering, which its event-loop workers use for task events) and a flusher
    thread sends what came in as one `task-multi` message, a list that Celery's
    event receiver, and so Flower, takes apart again. With 5,000 jobs waiting,
    their agents report ~250 times a second; a PUBLISH for each cost more worker
    CPU than everything else the waiting does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dispatcher: Any = None

    def send(self, task: Task, fields: dict[str, Any]) -> None:
        with self._lock:
            try:
                if self._dispatcher is None:
                    self._dispatcher = task.app.events.Dispatcher(
                        task.app.connection_for_write(), hostname=task.request.hostname, enabled=True,
                        buffer_group=["task"], buffer_limit=1000,
                    )
                    threading.Thread(target=self._flush_loop, args=(self._dispatcher,),
                                     name="imgfarm-progress-events", daemon=True).start()
                # `result` too: Celery's event state keeps every field of a custom event on
                # the task, but Flower only shows its fixed ones -- `result` is one of them,
                # so the numbers appear in Flower's Result column until the real result
                # (task-succeeded) replaces them.
                self._dispatcher.send("task-progress", uuid=task.request.id,
                                      result=progress_line(fields), **fields)
            except Exception as exc:  # noqa: BLE001 - monitoring must never end a job
                log.debug("progress event failed: %s", exc)
                self._reset()

    def flush(self) -> None:
        """Send what is buffered now: before a task's end, so its last progress does not
        reach Flower after its `task-succeeded` and overwrite the result shown."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        try:
            if self._dispatcher is not None:
                self._dispatcher.flush(errors=False)
        except Exception as exc:  # noqa: BLE001 - monitoring must never end a job
            log.debug("progress events failed: %s", exc)
            self._reset()

    def _flush_loop(self, dispatcher: Any) -> None:
        while True:
            time.sleep(FLUSH_EVERY)
            with self._lock:
                if self._dispatcher is not dispatcher:
                    return  # reset: the next send starts a new dispatcher and flusher
                self._flush()

    def _reset(self) -> None:
        try:
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._dispatcher.connection.release()
        except Exception:  # noqa: BLE001
            pass
        self._dispatcher = None


_events = _ProgressEvents()


def progress_line(p: dict[str, Any]) -> str:
    """`running 42% (1.2 GiB of 2.9 GiB, 95.1 MiB/s)`: a job's progress in one line."""
    line = f"{p.get('state', '?')} {float(p.get('percent') or 0):.0f}%"
    done, total, rate = p.get("bytes_done") or 0, p.get("bytes_total") or 0, p.get("rate") or 0
    if total:
        line += (f" ({format_bytes(done)} of {format_bytes(total)}"
                 + (f", {format_bytes(rate)}/s)" if rate else ")"))
    return line


def _progress_reporter(task: Task) -> Any:
    def report(p: dict[str, Any]) -> None:
        _events.send(task, p)

    return report


def _run(task: Task, job_id: int) -> dict[str, Any]:
    try:
        summary = run_job(int(job_id), on_progress=_progress_reporter(task))
    finally:
        _events.flush()
    if summary.state != states.SUCCEEDED:
        raise JobEnded(f"job {job_id} {summary.state}: {summary.error or 'no reason recorded'}")
    return summary.as_dict()


CAPTURE_TASK = "imgfarm.capture"
RESTORE_TASK = "imgfarm.restore"


@shared_task(name=CAPTURE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, throws=(JobEnded,))
def capture(self: Task, job_id: int, node: str = "", image: str = "") -> dict[str, Any]:
    return _run(self, job_id)


@shared_task(name=RESTORE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, throws=(JobEnded,))
def restore(self: Task, job_id: int, node: str = "", image: str = "") -> dict[str, Any]:
    return _run(self, job_id)


JOB_TASKS: dict[str, str] = {JobKind.CAPTURE: CAPTURE_TASK, JobKind.RESTORE: RESTORE_TASK}  # kind -> task name
