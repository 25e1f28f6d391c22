"""What the xcat boot and power drivers share: their one property, a node's xCAT name."""

from __future__ import annotations

from imgfarm.drivers.base import NodeInfo, Property
from imgfarm.drivers.xcat.commands import NODE_NAME
from imgfarm.errors import DriverSettingsError

PROPERTIES = (
    Property("xcat_node", "the node's name in xCAT, when it is not the farm's name",
             example="cn-0002"),
)


def xcat_name(node: NodeInfo) -> str:
    """The node's name in xCAT; checked so one bad name cannot fail a whole batch."""
    name = str(node.driver_info.get("xcat_node") or node.name)
    if not NODE_NAME.match(name):
        raise DriverSettingsError(
            f"node {node.name}: {name!r} is not a valid xCAT node name",
            hint=f"give its xCAT name with `imgfarm node set {node.name} --set xcat_node=NAME`",
        )
    return name
