"""Nodes and node ranges.

Node ranges are the ClusterShell/xCAT syntax (`lab[001-120]`, `n1,n3`,
`@group`, `lab[1-9]!lab5`), parsed by ClusterShell itself with the farm's
groups from the database as its group source. Every name a range yields must
be a known node: an operator's typo names itself instead of being skipped.
"""

from __future__ import annotations

import re
from typing import Any

from ClusterShell.NodeSet import NodeSet, NodeSetParseError
from ClusterShell.NodeUtils import GroupResolver, GroupSource
from sqlalchemy import select
from sqlalchemy.orm import Session

from imgfarm.errors import Conflict, InvalidInput, NodeRangeError, NotFound
from imgfarm.models import states
from imgfarm.models.tables import Group, Job, Node
from imgfarm.models.views import node_view, unknown_node
from imgfarm.protocol import normalize_mac

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_node_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"bad node name {name!r}",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def check_mac(mac: str) -> str:
    """The node's MAC in the one form the farm stores ("" when it has none)."""
    if not mac.strip():
        return ""
    norm = normalize_mac(mac)
    if norm is None:
        raise InvalidInput(f"bad MAC address {mac!r}", hint="write it as aa:bb:cc:dd:ee:ff")
    return norm


def _resolver(session: Session) -> GroupResolver:
    groups: dict[str, str] = {}
    for group in session.scalars(select(Group)):
        members = session.scalars(select(Node.name).where(Node.groups.contains(group))).all()
        groups[group.name] = ",".join(members)
    return GroupResolver(GroupSource("imgfarm", groups))


def expand_range(session: Session, expr: str) -> list[str]:
    """Node names of a range expression, in order; errors name the bad part."""
    expr = expr.strip()
    if not expr:
        raise NodeRangeError("empty node range", hint="give nodes like lab[001-120], n1,n3 or @group")
    known_groups = set(session.scalars(select(Group.name)))
    for ref in re.findall(r"@([A-Za-z0-9_.:-]+)", expr):
        if ref not in known_groups:
            raise NodeRangeError(
                f"unknown group @{ref} in {expr!r}",
                hint=f"known groups: {', '.join(sorted(known_groups)) or 'none yet'}",
            )
    try:
        nodeset = NodeSet(expr, resolver=_resolver(session))
    except NodeSetParseError as exc:
        raise NodeRangeError(f"bad node range {expr!r}: {exc}") from exc
    except Exception as exc:  # ClusterShell raises several parse errors
        raise NodeRangeError(f"bad node range {expr!r}: {exc}") from exc
    names = list(nodeset)
    if not names:
        raise NodeRangeError(f"node range {expr!r} names no nodes")
    return names


def resolve_nodes(session: Session, expr: str) -> list[Node]:
    names = expand_range(session, expr)
    found = {n.name: n for n in session.scalars(select(Node).where(Node.name.in_(names)))}
    missing = [n for n in names if n not in found]
    if missing:
        shown = str(NodeSet.fromlist(missing)) if len(missing) > 1 else missing[0]
        raise NotFound(
            f"unknown node{'s' if len(missing) > 1 else ''} {shown} in {expr!r}",
            hint="see `imgfarm node list`, or add it with `imgfarm node add`",
        )
    return [found[n] for n in names]


def get_node(session: Session, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        raise unknown_node(name)
    return node


def node_views(session: Session) -> list[dict[str, Any]]:
    """Every node by name with its active job: `imgfarm node list` and GET /api/v1/nodes."""
    active = dict(session.execute(select(Job.node_id, Job.id).where(Job.state.in_(states.ACTIVE))).all())
    return [node_view(n, active.get(n.id)) for n in session.scalars(select(Node).order_by(Node.name))]


def ensure_groups(session: Session, names: list[str]) -> list[Group]:
    out = []
    for name in names:
        check_node_name(name)
        group = session.scalar(select(Group).where(Group.name == name))
        if group is None:
            group = Group(name=name)
            session.add(group)
        out.append(group)
    return out


def new_node(
    session: Session,
    name: str,
    mac: str = "",
    ip: str = "",
    boot: str = "sim",
    power: str = "sim",
    disk: str = "",
    driver_info: dict[str, Any] | None = None,
) -> Node:
    """A new, unsaved node row: its name checked and free, its MAC normalized.

    Its drivers' settings are not checked here (models know no drivers):
    tasks.nodes.add_node checks them, then saves the row.
    """
    check_node_name(name)
    if session.scalar(select(Node).where(Node.name == name)) is not None:
        raise Conflict(f"node {name} exists already", hint=f"change it with `imgfarm node set {name}`")
    return Node(
        name=name,
        mac=check_mac(mac),
        ip=ip,
        boot_driver=boot,
        power_driver=power,
        disk=disk,
        driver_info=driver_info or {},
    )


def set_admin_state(node: Node, state: str) -> None:
    if state not in states.NODE_ADMIN_STATES:
        raise InvalidInput(
            f"bad node state {state!r}", hint=f"one of {', '.join(states.NODE_ADMIN_STATES)}"
        )
    node.admin_state = state


def remove_node(session: Session, name: str) -> None:
    """Delete a node that has no active job."""
    node = get_node(session, name)
    busy = session.scalar(select(Job.id).where(Job.node_id == node.id, Job.state.in_(states.ACTIVE)))
    if busy:
        raise Conflict(f"node {name} has active job {busy}", hint=f"`imgfarm cancel {busy}` first")
    session.delete(node)
