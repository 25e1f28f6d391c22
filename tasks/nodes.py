"""What the farm does to a node through its drivers, in one low place.

Booting a job's agent (tasks/lifecycle.py), putting a node back to local
boot (tasks/finalize.py), asking its power state (tasks/power_sync.py) and
checking its driver settings when a node is added or changed (CLI, API) all
go through these functions, as Ironic keeps `node_power_action` and
`node_set_boot_device` in `conductor/utils.py`. They sit below lifecycle and
finalize, so neither has to import the other.

The drivers never see a database row: `node_info` makes the plain copy
(`NodeInfo`) they get, which is why this lives in tasks/ and not in models/.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from imgfarm.drivers.base import NodeInfo
from imgfarm.drivers.registry import boot_driver, power_driver, validate_node
from imgfarm.models.db import session_scope
from imgfarm.models.nodes import ensure_groups, new_node
from imgfarm.models.tables import Node, secret_values
from imgfarm.protocol import BootTarget, Orders


def node_info(node: Node) -> NodeInfo:
    """The copy of a node row its drivers get."""
    return NodeInfo(
        name=node.name,
        mac=node.mac,
        ip=node.ip,
        boot_driver=node.boot_driver,
        power_driver=node.power_driver,
        driver_info={**(node.driver_info or {}), **secret_values(node)},
        disk=node.disk,
        groups=tuple(node.group_names),
    )


def validate_drivers(info: NodeInfo) -> None:
    """Check the node's driver names and settings now, not when a job runs.

    The registry refuses keys neither driver declares, then asks each driver.
    """
    validate_node(info)


def add_node(
    session: Session,
    name: str,
    mac: str = "",
    ip: str = "",
    groups: list[str] | None = None,
    boot: str = "sim",
    power: str = "sim",
    disk: str = "",
    driver_info: dict[str, Any] | None = None,
) -> Node:
    """Add a node whose drivers accept its settings; nothing is saved otherwise."""
    node = new_node(session, name, mac, ip, boot, power, disk, driver_info)
    validate_drivers(node_info(node))
    node.groups = ensure_groups(session, groups or [])
    session.add(node)
    session.flush()
    return node


def set_node(name: str, **values: Any) -> None:
    """Record what the farm last asked of a node (boot target, power state)."""
    with session_scope() as s:
        s.execute(update(Node).where(Node.name == name).values(**values))


def boot_agent(info: NodeInfo, orders: Orders) -> None:
    """Make the node's next boot run the agent with `orders`, then power-cycle it into it."""
    boot_driver(info.boot_driver).boot_agent(info, orders)
    power_driver(info.power_driver).reboot(info)


def reset_node(info: NodeInfo, power_cycle: bool) -> str:
    """Local boot again, then power as asked; returns an error text or ''."""
    errors = []
    for attempt in range(3):
        try:
            boot_driver(info.boot_driver).boot_local(info)
            set_node(info.name, boot_target=BootTarget.LOCAL)
            break
        except Exception as exc:  # noqa: BLE001
            if attempt == 2:
                errors.append(f"could not set local boot on {info.name}: {exc}")
            time.sleep(0.5 * (attempt + 1))
    if power_cycle:
        try:
            power_driver(info.power_driver).reboot(info)
        except Exception as exc:  # noqa: BLE001 - any driver failure is reported, never raised
            errors.append(f"could not power-cycle {info.name}: {exc}")
    return "; ".join(errors)
