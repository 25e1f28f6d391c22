"""The workers' Celery consumer: one that reconnects after the broker restarts.

Celery 5.7.0's consumer, when it loses the broker, first collects the
connection (which detaches it from its transport) and then closes it. Closing
the Redis channel restores its unacked messages through that detached
transport and raises AttributeError, which is not one of the connection
errors Celery ignores there: the worker logs "Unrecoverable error" and shuts
down once its running tasks end. The jobs in flight still finish (they wait
on the job database), but nothing new is taken until someone restarts the
worker. The same happens later when a task that was running during the loss
ends and acknowledges its message on the channel that is gone.

This consumer treats that AttributeError as what it is, a connection that is
already gone, and reconnects as after any other connection loss; and it marks
the running tasks' messages as acknowledged, since no channel is left to
acknowledge them on. Their messages stay in the broker's unacked set and come
back after the visibility timeout, when their task finds its job ended and
returns at once (the tasks are idempotent, and the job database, not the
broker, says what is done).
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.state import active_requests

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def on_connection_error_after_connected(self, exc: Exception) -> None:
        for request in tuple(active_requests):
            request.acknowledged = True  # its channel died with the connection
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            log.warning("the lost broker connection could not be closed cleanly (%r); "
                        "reconnecting all the same", err)
