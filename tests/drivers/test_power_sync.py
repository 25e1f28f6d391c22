"""Power drift detection: pure comparisons, then through the real xcat driver path."""

from __future__ import annotations

import threading

from imgfarm.drivers.base import NodeInfo, PowerState
from imgfarm.drivers.power_sync import DriftKind, detect_drift
from imgfarm.errors import DriverError

ON, OFF, UNKNOWN = PowerState.ON, PowerState.OFF, PowerState.UNKNOWN


def n(name: str, driver: str = "ipmi") -> NodeInfo:
    return NodeInfo(name=name, power_driver=driver)


def test_only_differences_are_reported_in_order():
    actual = {"a": ON, "b": OFF, "c": ON, "d": OFF}
    recorded = [(n("a"), ON), (n("b"), ON), (n("c"), UNKNOWN), (n("d"), OFF)]
    drift = detect_drift(recorded, query=lambda node: actual[node.name])
    assert [(d.node, d.kind, d.recorded, d.observed) for d in drift] == [
        ("b", DriftKind.CHANGED, ON, OFF),
        ("c", DriftKind.LEARNED, UNKNOWN, ON),
    ]
    assert drift[0].message() == "power changed outside the farm: on -> off"


def test_failing_query_is_an_unreachable_record_with_the_reason():
    def query(node: NodeInfo) -> PowerState:
        if node.name == "dead":
            raise DriverError("ipmitool chassis power status failed after 4 attempt(s)")
        return UNKNOWN if node.name == "mute" else ON

    drift = detect_drift([(n("ok"), ON), (n("dead"), ON), (n("mute"), OFF)], query=query)
    assert [(d.node, d.kind) for d in drift] == [("dead", DriftKind.UNREACHABLE),
                                                 ("mute", DriftKind.UNREACHABLE)]
    assert "failed after 4 attempt(s)" in drift[0].message()
    assert drift[0].observed is UNKNOWN


def test_queries_run_in_parallel():
    barrier = threading.Barrier(8, timeout=5)  # fails unless 8 queries are in flight at once

    def query(node: NodeInfo) -> PowerState:
        barrier.wait()
        return ON

    assert detect_drift([(n(f"p{i}"), ON) for i in range(8)], query=query, workers=8) == []


def test_empty_input():
    assert detect_drift([]) == []


def test_through_the_xcat_driver(xcat):
    """Default query: the node's own power driver (here xcat -> rpower stand-in)."""
    xcat.define("x1", power="on")
    xcat.define("x2", power="off")
    drift = detect_drift([(n("x1", "xcat"), ON), (n("x2", "xcat"), ON), (n("x3", "xcat"), ON)])
    kinds = {d.node: d.kind for d in drift}
    assert kinds == {"x2": DriftKind.CHANGED, "x3": DriftKind.UNREACHABLE}
    assert len(xcat.calls("rpower")) <= 3  # batched, not one process per node
