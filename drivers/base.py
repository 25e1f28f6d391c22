"""The small interfaces a node's drivers implement (the Ironic idea).

A node names one boot driver and one power driver; a job composes them. The
drivers act, and know nothing of Celery or the database: they get a
`NodeInfo` (a plain copy of the node row) and, for booting the agent, the
job's `AgentOrders`. Implementations are found by name through the
`imgfarm.boot_drivers` / `imgfarm.power_drivers` entry points (see
`registry.py`), so a site can add one without editing the farm.

Each driver declares the `driver_info` keys it reads as a table of
`Property` rows (`properties`, read through `get_properties()` as in
Ironic); the table is what a node's settings are checked against and what
the help and the docs print (see `properties.py`).

Errors: `validate()` raises `DriverSettingsError` naming the missing or bad
setting (checked at `node add`/`node set`, not at 2 a.m.); an action that
fails raises `DriverError` with what the peer said.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgfarm.drivers.properties import Properties, Property, check_values, value_of
from imgfarm.errors import DriverError
from imgfarm.protocol import BootTarget, PowerState
from imgfarm.protocol import Orders as AgentOrders  # the kernel command line's orders, one type


@dataclass(frozen=True)
class NodeInfo:
    """What a driver may know of a node: a copy, not the database row."""

    name: str
    mac: str = ""
    ip: str = ""
    boot_driver: str = "sim"
    power_driver: str = "sim"
    driver_info: Mapping[str, Any] = field(default_factory=dict)
    disk: str = ""  # target-disk hint: a device name, or a file for sim nodes
    groups: tuple[str, ...] = ()


class DriverInterface:
    """What boot and power drivers share: a name and a table of properties."""

    name: str = ""
    kind: str = ""  # "boot" or "power"
    properties: Properties = ()

    def get_properties(self) -> dict[str, Property]:
        """The driver_info keys this driver reads, by name (Ironic's get_properties)."""
        return {p.name: p for p in self.properties}

    def validate(self, node: NodeInfo) -> None:
        """Raise DriverSettingsError if the node lacks what this driver needs.

        This checks the node against the table; a driver with rules the table
        cannot say overrides it and calls it first.
        """
        check_values(node.name, self, node.driver_info)

    def value(self, node: NodeInfo, key: str) -> str:
        """The node's value of one of this driver's keys, else the site's, else the default."""
        return value_of(node.driver_info, self.get_properties()[key])


class BootInterface(DriverInterface, ABC):
    """Decides what a node boots next. It does not power anything."""

    kind = "boot"

    @abstractmethod
    def boot_agent(self, node: NodeInfo, orders: AgentOrders) -> None:
        """Make the node's next boot run the agent with these orders."""

    @abstractmethod
    def boot_local(self, node: NodeInfo) -> None:
        """Make the node's next boot the local disk (always safe to repeat)."""

    @abstractmethod
    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        """What the node would boot now, read back from the boot peer."""

    def boot_local_many(self, nodes: Iterable[NodeInfo]) -> dict[str, Exception | None]:
        """Reset many nodes; drivers with a batch command override this."""
        out: dict[str, Exception | None] = {}
        for node in nodes:
            try:
                self.boot_local(node)
                out[node.name] = None
            except Exception as exc:  # noqa: BLE001 - reported per node
                out[node.name] = exc
        return out


class PowerInterface(DriverInterface, ABC):
    """Turns a node on and off; knows nothing of what it boots."""

    kind = "power"

    @abstractmethod
    def get_power_state(self, node: NodeInfo) -> PowerState: ...

    @abstractmethod
    def set_power_state(self, node: NodeInfo, state: PowerState) -> None: ...

    def reboot(self, node: NodeInfo) -> None:
        """Power-cycle: on if off, reset if on. Override with a native reset."""
        self.set_power_state(node, PowerState.OFF)
        self.set_power_state(node, PowerState.ON)


__all__ = [
    "AgentOrders",
    "BootInterface",
    "BootTarget",
    "DriverError",
    "DriverInterface",
    "NodeInfo",
    "PowerInterface",
    "PowerState",
    "Property",
]
