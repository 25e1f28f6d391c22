"""The xcat power driver: `rpower`; xCAT holds the BMC credentials, the farm none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgfarm.drivers.base import NodeInfo, PowerInterface, PowerState
from imgfarm.drivers.xcat import batch
from imgfarm.drivers.xcat import commands as xc
from imgfarm.drivers.xcat.common import PROPERTIES, xcat_name
from imgfarm.errors import DriverError

_POWER_WORDS = {"on": PowerState.ON, "running": PowerState.ON,
                "off": PowerState.OFF, "not activated": PowerState.OFF}


def rpower(payloads: Mapping[str, Any], action: str) -> dict[str, Any]:
    """One `rpower NODES on|off|boot|stat` for a batch."""
    return xc.nodes_cmd("rpower", list(payloads), action)


class XcatPower(PowerInterface):
    """xCAT's rpower: on, off, stat; a reboot is one `rpower boot`."""

    name = "xcat"
    properties = PROPERTIES

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        xcat_name(node)

    def get_power_state(self, node: NodeInfo) -> PowerState:
        text = batch.submit(rpower, "stat", node=xcat_name(node))
        return _POWER_WORDS.get(str(text).strip().lower(), PowerState.UNKNOWN)

    def set_power_state(self, node: NodeInfo, state: PowerState) -> None:
        if state not in (PowerState.ON, PowerState.OFF):
            raise DriverError(f"cannot set power state {state!r}")
        batch.submit(rpower, state.value, node=xcat_name(node))

    def reboot(self, node: NodeInfo) -> None:
        # `rpower boot`: on if off, hard reset if on - one call, not two.
        batch.submit(rpower, "boot", node=xcat_name(node))


__all__ = ["XcatPower"]
