"""Job states and the transitions allowed between them, in one table.

Only `models.jobs.transition()` changes a job's state; it checks this table
and writes the event, so a job's history is always complete.
"""

from __future__ import annotations

QUEUED = "queued"
BOOTING = "booting"
RUNNING = "running"
FINALIZING = "finalizing"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"

ALL = (QUEUED, BOOTING, RUNNING, FINALIZING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)
ACTIVE = (QUEUED, BOOTING, RUNNING, FINALIZING)
FINAL = (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)

# from-state -> states it may move to. Finalizing carries the outcome (in
# jobs.outcome) while the node is being put back to local boot.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (BOOTING, RUNNING, FINALIZING, FAILED, CANCELLED),
    BOOTING: (RUNNING, FINALIZING, FAILED),
    RUNNING: (FINALIZING, FAILED),
    FINALIZING: (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED),
}

# Node administrative states: a node not "available" gets no new jobs.
NODE_AVAILABLE = "available"
NODE_RESERVED = "reserved"
NODE_MAINTENANCE = "maintenance"
NODE_ADMIN_STATES = (NODE_AVAILABLE, NODE_RESERVED, NODE_MAINTENANCE)

# What a bulk window does with its jobs still running when it closes.
ON_CLOSE_FINISH = "finish"  # let them finish; start nothing new
ON_CLOSE_CANCEL = "cancel"  # cancel them (the node is put back to local boot)
ON_CLOSE = (ON_CLOSE_FINISH, ON_CLOSE_CANCEL)


def allowed(src: str, dst: str) -> bool:
    return dst in TRANSITIONS.get(src, ())
