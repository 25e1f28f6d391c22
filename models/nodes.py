"""Nodes and node ranges.

Node ranges are the ClusterShell/xCAT syntax (`lab[001-120]`, `n1,n3`,
`@group`, `lab[1-9]!lab5`), parsed by ClusterShell itself with the farm's
groups from the database as its group source. Every name a range yields must
be a known node: an operator's typo names itself instead of being skipped.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ClusterShell.NodeSet import NodeSet, NodeSetParseError
from ClusterShell.NodeUtils import GroupResolver, GroupSource
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput, NodeRangeError, NotFound
from imgfarm.models import states
from imgfarm.models.tables import Group, Job, Node, node_groups
from imgfarm.models.views import node_view, unknown_node
from imgfarm.protocol import DEVICE_PATH, normalize_mac

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole string: fullmatch


def check_node_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"bad node name {name!r}",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def check_ip(ip: str) -> str:
    """The node's IP address in its canonical form ("" when it has none)."""
    if not ip.strip():
        return ""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise InvalidInput(f"bad ip {ip!r}: not an IPv4 or IPv6 address",
                           hint="e.g. --ip 10.0.0.21 (or leave it empty)") from None


def check_disk(disk: str) -> str:
    """The node's disk as the agent gets it: an absolute path, nothing a command line would split."""
    if disk and not DEVICE_PATH.fullmatch(disk):
        raise InvalidInput(f"bad disk {disk!r}: give an absolute device path without spaces, "
                           "quotes or control characters", hint="e.g. /dev/sda or /dev/disk/by-id/...")
    return disk


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


_OPERATOR = re.compile(r"[,!&^]")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_STEP = re.compile(r"^(\d+)(?:-(\d+)(?:/(\d+))?)?$")


def _bracket_size(text: str) -> int:
    """How many values a bracket's range set (`1-10/2,15`) holds, from its text alone."""
    total = 0
    for item in text.split(","):
        m = _STEP.fullmatch(item.strip())
        if m is None:
            total += 1  # not a range at all: ClusterShell refuses it with its own words
            continue
        lo, hi, step = int(m[1]), int(m[2] or m[1]), int(m[3] or 1)
        total += (hi - lo) // step + 1 if hi >= lo and step > 0 else 0
    return total


def range_size(expr: str, group_sizes: dict[str, int]) -> int:
    """An upper bound of the names a range makes, read from its text: nothing is expanded.

    ClusterShell keeps a range as the set of its values, so `n[1-99999999]` is 10^8
    strings before anything can look at them. Every operand of `,`, `!`, `&` and `^`
    is expanded on its own before the operators apply, so the bound is their sum.
    """
    total = 0
    depth, start = 0, 0
    parts: list[str] = []
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0 and _OPERATOR.match(ch):
            parts.append(expr[start:i])
            start = i + 1
    parts.append(expr[start:])
    for part in (p.strip() for p in parts):
        if part.startswith("@"):
            name = part[1:].split(":")[-1]
            total += sum(group_sizes.values()) if name == "*" else group_sizes.get(name, 0)
            continue
        size = 1
        for inner in _BRACKET.findall(part):
            size *= _bracket_size(inner)
        total += size
    return total


def check_range_size(expr: str, group_sizes: dict[str, int], cap: int) -> None:
    """Refuse a range that would name more than `cap` nodes, before it is expanded."""
    count = range_size(expr, group_sizes)
    if count > cap:
        shown = expr if len(expr) <= 80 else expr[:77] + "..."
        raise NodeRangeError(
            f"node range {shown!r} names {count:,} nodes, more than the cap of {cap:,}",
            hint="split it into ranges of at most that many nodes, or raise "
            "IMGFARM_MAX_RANGE_NODES",
        )


def _group_sizes(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Group.name, func.count(node_groups.c.node_id))
        .select_from(Group).outerjoin(node_groups, node_groups.c.group_id == Group.id)
        .group_by(Group.name)
    )
    return {name: int(n) for name, n in rows}


def expand_range(session: Session, expr: str) -> list[str]:
    """Node names of a range expression, in order; errors name the bad part.

    A range that would name more nodes than the max_range_nodes setting is refused
    before ClusterShell expands anything (see `range_size`).
    """
    expr = expr.strip()
    if not expr:
        raise NodeRangeError("empty node range", hint="give nodes like lab[001-120], n1,n3 or @group")
    group_sizes = _group_sizes(session)
    check_range_size(expr, group_sizes, get_settings().max_range_nodes)
    known_groups = set(group_sizes)
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
        ip=check_ip(ip),
        boot_driver=boot,
        power_driver=power,
        disk=check_disk(disk),
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
