"""Job wake-ups: what a worker's waiting jobs do when the pub/sub listener loses Redis, and
how often they read their rows when nothing wakes them."""

from __future__ import annotations

from pathlib import Path

from imgfarm.tasks.lifecycle import SAFETY_RECHECK, safety_recheck
from imgfarm.tasks.wakeup import Waker
from tests.support import wait_for
from tests.test_outages import private_redis


def test_the_listener_back_from_a_redis_restart_wakes_every_waiting_job(tmp_path: Path) -> None:
    """A wake-up published while the listener was away is lost: each job must look at its row
    once when the listener is back, not at its next safety re-read minutes later."""
    with private_redis(tmp_path) as server:
        waker = Waker(server.url)
        waker.start()
        try:
            wait_for(lambda: waker._ok, 15, what="the listener to subscribe")
            slots = [waker.register(job_id) for job_id in (1, 2, 3)]
            assert waker.waiting() == 3
            assert waker.wait(slots[0], 0.2) is None  # nothing wakes them meanwhile
            server.kill()
            wait_for(lambda: not waker._ok, 15, what="the listener to notice Redis gone")
            server.start()
            wait_for(lambda: waker._ok, 30, what="the listener to subscribe again")
            for slot in slots:
                assert waker.wait(slot, 10) == {"kind": "check"}
        finally:
            waker.stopping.set()


def test_safety_rereads_are_spread_when_many_jobs_wait() -> None:
    assert safety_recheck(0) == safety_recheck(600) == SAFETY_RECHECK == 60.0
    assert safety_recheck(5000) == 500.0  # 10 reads a second for the whole process
