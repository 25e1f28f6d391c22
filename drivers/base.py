"""The small interfaces a node's drivers implement (the Ironic idea).

A node names one boot driver and one power driver; a job composes them. The
drivers act, and know nothing of Celery or the database: they get a
`NodeInfo` (a plain copy of the node row) and, for booting the agent, the
job's `AgentOrders`. Implementations are found by name through the
`imgfarm.boot_drivers` / `imgfarm.power_drivers` entry points (see
`registry.py`), so a site can add one without editing the farm.

Errors: `validate()` raises `DriverSettingsError` naming the missing or bad
setting (checked at `node add`/`node set`, not at 2 a.m.); an action that
fails raises `DriverError` with what the peer said.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgfarm.errors import DriverError, DriverSettingsError


class BootTarget(enum.StrEnum):
    AGENT = "agent"  # the next boot runs the farm's agent
    LOCAL = "local"  # the next boot is from the local disk
    UNKNOWN = "unknown"


class PowerState(enum.StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


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


@dataclass(frozen=True)
class AgentOrders:
    """What the agent must be told at boot: where the API is, which job, its token.

    Only the one-job token is secret; it dies with the job.
    """

    api_url: str
    job_id: int
    token: str
    disk: str = ""

    def kernel_params(self) -> str:
        params = [
            f"imgfarm.api={self.api_url}",
            f"imgfarm.job={self.job_id}",
            f"imgfarm.token={self.token}",
        ]
        if self.disk:
            params.append(f"imgfarm.disk={self.disk}")
        return " ".join(params)


class BootInterface(ABC):
    """Decides what a node boots next. It does not power anything."""

    name: str = ""

    @abstractmethod
    def validate(self, node: NodeInfo) -> None:
        """Raise DriverSettingsError if the node lacks what this driver needs."""

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


class PowerInterface(ABC):
    """Turns a node on and off; knows nothing of what it boots."""

    name: str = ""

    @abstractmethod
    def validate(self, node: NodeInfo) -> None:
        """Raise DriverSettingsError if the node lacks what this driver needs."""

    @abstractmethod
    def get_power_state(self, node: NodeInfo) -> PowerState: ...

    @abstractmethod
    def set_power_state(self, node: NodeInfo, state: PowerState) -> None: ...

    def reboot(self, node: NodeInfo) -> None:
        """Power-cycle: on if off, reset if on. Override with a native reset."""
        self.set_power_state(node, PowerState.OFF)
        self.set_power_state(node, PowerState.ON)


def require(node: NodeInfo, driver: str, *keys: str) -> None:
    """Raise DriverSettingsError naming every missing driver_info key."""
    missing = [k for k in keys if not str(node.driver_info.get(k, "") or "").strip()]
    if missing:
        flags = " ".join(f"--set {k}=..." for k in missing)
        raise DriverSettingsError(
            f"node {node.name}: the {driver} driver needs {', '.join(missing)}",
            hint=f"give it with `imgfarm node set {node.name} {flags}`",
        )


__all__ = [
    "AgentOrders",
    "BootInterface",
    "BootTarget",
    "DriverError",
    "NodeInfo",
    "PowerInterface",
    "PowerState",
    "require",
]
