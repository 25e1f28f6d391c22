"""`imgfarm.power_sync`: find power drift on idle nodes and record it.

Someone pressed a power button, a PDU tripped, a BMC died: every
settings.ipmi.sync_interval seconds (celery beat) each node without an
active job is asked for its power state through its own driver; a change, a
first reading or an unreachable BMC becomes a node event, and the node's
recorded power state follows what was observed.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from sqlalchemy import select

from imgfarm.drivers.base import PowerState
from imgfarm.drivers.power_sync import DriftKind, detect_drift
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.tables import Job, Node, NodeEvent
from imgfarm.tasks.nodes import node_info


def sync_once() -> list[dict[str, Any]]:
    with session_scope() as s:
        busy = set(s.scalars(select(Job.node_id).where(Job.state.in_(states.ACTIVE), Job.node_id.is_not(None))))
        pairs = []
        for node in s.scalars(select(Node).order_by(Node.name)):
            if node.id in busy:
                continue
            try:
                recorded = PowerState(node.power_state)
            except ValueError:
                recorded = PowerState.UNKNOWN
            pairs.append((node_info(node), recorded))
    drifts = detect_drift(pairs)  # driver calls: outside any session
    out = []
    with session_scope() as s:
        ids = dict(s.execute(select(Node.name, Node.id)).all())
        for d in drifts:
            node_id = ids.get(d.node)
            if node_id is None:
                continue
            s.add(NodeEvent(node_id=node_id, kind=f"power-{d.kind.value}", message=d.message(),
                            data={"recorded": d.recorded.value, "observed": d.observed.value, "error": d.error}))
            if d.kind is not DriftKind.UNREACHABLE:
                row = s.get(Node, node_id)
                if row is not None:
                    row.power_state = d.observed.value
            out.append({"node": d.node, "kind": d.kind.value, "message": d.message()})
    return out


@shared_task(name="imgfarm.power_sync", ignore_result=True)
def power_sync() -> list[dict[str, Any]]:
    return sync_once()
