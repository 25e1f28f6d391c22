"""Power drift: compare each node's recorded power state with what its BMC says.

Why: someone pressed a power button, a PDU tripped, a BMC died. The farm
records the power state it last set or saw; the periodic task
`imgfarm.power_sync` (tasks/power_sync.py, every settings.ipmi.sync_interval
seconds) calls `detect_drift` with the nodes that have no active job and
writes one node event per record.

The function writes nothing. It asks each node's own power driver (xcat
batches these into a few `rpower stat` runs; ipmi queries BMCs in parallel,
a bounded pool) and returns only the differences. A query that fails is a
record too ("unreachable"), with the driver's error text, so a dead BMC shows
up before the next job needs it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imgfarm.drivers.base import NodeInfo, PowerState
from imgfarm.drivers.registry import power_driver


class DriftKind(enum.StrEnum):
    CHANGED = "changed"  # on <-> off behind the farm's back
    UNREACHABLE = "unreachable"  # the query failed; `error` says why
    LEARNED = "learned"  # nothing recorded before; now known


@dataclass(frozen=True)
class PowerDrift:
    node: str
    kind: DriftKind
    recorded: PowerState
    observed: PowerState  # UNKNOWN when unreachable
    error: str = ""

    def message(self) -> str:
        """One line for the node's event log."""
        if self.kind is DriftKind.UNREACHABLE:
            return f"power state unknown: {self.error}"
        if self.kind is DriftKind.LEARNED:
            return f"power is {self.observed.value}"
        return f"power changed outside the farm: {self.recorded.value} -> {self.observed.value}"


def _default_query(node: NodeInfo) -> PowerState:
    return power_driver(node.power_driver).get_power_state(node)


def detect_drift(
    nodes: Iterable[tuple[NodeInfo, PowerState]],
    query: Callable[[NodeInfo], PowerState] | None = None,
    workers: int = 16,
) -> list[PowerDrift]:
    """Drift records for (node, last recorded state) pairs, in input order.

    `query` defaults to the node's power driver; tests pass their own.
    Nodes whose state matches their record produce nothing.
    """
    pairs = list(nodes)
    ask = query or _default_query

    def one(pair: tuple[NodeInfo, PowerState]) -> PowerDrift | None:
        node, recorded = pair
        try:
            observed = ask(node)
        except Exception as exc:  # noqa: BLE001 - any driver failure is a record
            return PowerDrift(node.name, DriftKind.UNREACHABLE, recorded, PowerState.UNKNOWN,
                              str(exc))
        if observed is PowerState.UNKNOWN:
            return PowerDrift(node.name, DriftKind.UNREACHABLE, recorded, observed,
                              "the power driver could not tell")
        if recorded is PowerState.UNKNOWN:
            return PowerDrift(node.name, DriftKind.LEARNED, recorded, observed)
        if observed is not recorded:
            return PowerDrift(node.name, DriftKind.CHANGED, recorded, observed)
        return None

    if not pairs:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(pairs)))) as pool:
        results = list(pool.map(one, pairs))
    return [r for r in results if r is not None]


__all__ = ["DriftKind", "PowerDrift", "detect_drift"]
