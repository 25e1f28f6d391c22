"""The job worker's pool: Celery's threads pool, with every thread started before the first task.

Celery's threads pool is a ThreadPoolExecutor, which starts a thread when a
task arrives and no thread is idle, and `Thread.start()` blocks until the new
thread runs. The consumer, which takes the task messages one at a time, waits
in there: when a 5,000-node restore arrives, a thread's start-up (its turn on
the GIL among hundreds of busy job threads) cost 3.7 ms of the consumer's
~9 ms per message, measured with 5,000 jobs on 2 cores (bench/README.md), and
the last node booted that much later. Here the pool starts all its threads
when the worker starts, so a task only goes into the executor's queue.

A waiting thread blocks on that queue and costs no CPU; it costs its stack
(about 20 KB resident) whether it is started early or when the burst comes.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from celery.concurrency.thread import TaskPool as ThreadsPool

log = logging.getLogger(__name__)


class TaskPool(ThreadsPool):
    """`--pool threads`, its threads started with the worker."""

    def on_start(self) -> None:
        super().on_start()
        start = time.monotonic()
        started = prestart(self.executor)
        log.info("job pool: %d threads started in %.1f s", started, time.monotonic() - start)


def prestart(executor: ThreadPoolExecutor) -> int:
    """Start every thread the executor may have; returns how many it has."""
    while len(executor._threads) < executor._max_workers:
        # a new thread has not yet marked itself idle, so each call starts one more
        executor._adjust_thread_count()
    return len(executor._threads)
