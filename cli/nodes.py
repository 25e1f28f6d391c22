"""`imgfarm node ...`: the node inventory."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import typer

from imgfarm.cli.drivers import WithDriverSettings
from imgfarm.cli.output import echo, handles_errors, json_option, print_json, table
from imgfarm.errors import ImgfarmError, InvalidInput
from imgfarm.models.views import node_view

app = typer.Typer(help="Add, change and list nodes.", no_args_is_help=True)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"bad --set {pair!r}", hint="write it as KEY=VALUE, e.g. --set bmc_address=10.0.0.5")
        out[key.strip()] = value
    return out


@app.command("add", cls=WithDriverSettings)
@handles_errors
def add(
    name: str = typer.Argument(..., help="node name, e.g. lab001"),
    mac: str = typer.Option("", help="boot NIC MAC (needed by the pxe driver)"),
    ip: str = typer.Option("", help="node IP address"),
    group: list[str] = typer.Option([], "--group", "-g", help="group to put it in (repeatable)"),
    boot: str = typer.Option("", help="boot driver, e.g. sim, pxe, xcat (all: `imgfarm driver "
                             "list`; default: settings)"),
    power: str = typer.Option("", help="power driver, e.g. sim, ipmi, xcat (default: settings)"),
    disk: str = typer.Option("", help="target disk hint (/dev/nvme0n1), or the disk file of a sim node"),
    set_: list[str] = typer.Option(
        [], "--set", help="driver setting KEY=VALUE (repeatable; the keys are listed below), "
        "e.g. bmc_address=10.1.0.5"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the node as JSON"),
) -> None:
    """Add a node; its driver settings are checked now, not when a job runs."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.config.settings import get_settings
    from imgfarm.models.db import session_scope
    from imgfarm.tasks.nodes import add_node

    settings = get_settings()
    with session_scope() as s:
        node = add_node(s, name, mac, ip, group, boot or settings.default_boot_driver,
                        power or settings.default_power_driver, disk, parse_sets(set_))
        view = node_view(node)
    print_json(view) if json_out else echo(f"added node {name} ({view['boot_driver']}/{view['power_driver']})")


@app.command("set")
@handles_errors
def set_node(
    name: str,
    mac: str | None = typer.Option(None),
    ip: str | None = typer.Option(None),
    boot: str | None = typer.Option(None, help="switch boot driver"),
    power: str | None = typer.Option(None, help="switch power driver"),
    disk: str | None = typer.Option(None),
    group: list[str] = typer.Option([], "--group", "-g", help="replace the node's groups"),
    set_: list[str] = typer.Option([], "--set", help="driver setting KEY=VALUE "
                                   "(the keys: `imgfarm node add --help`, `imgfarm driver show`)"),
    unset: list[str] = typer.Option([], "--unset", help="remove a driver setting"),
    state: str | None = typer.Option(None, help="available, reserved or maintenance"),
) -> None:
    """Change a node: drivers, settings, groups, admin state (validated before saving).

    Switching a driver drops the settings only the old one took, and says so.
    """
    # lazy: SQLAlchemy and the driver registry load only for the commands that use them
    from imgfarm.drivers.registry import left_behind
    from imgfarm.models.db import session_scope
    from imgfarm.models.nodes import check_disk, check_ip, check_mac, ensure_groups, get_node, set_admin_state
    from imgfarm.models.tables import NodeEvent, secret_values, store_driver_info
    from imgfarm.tasks.nodes import node_info, validate_drivers

    with session_scope() as s:
        node = get_node(s, name)
        old_drivers = (node.boot_driver, node.power_driver)
        if mac is not None:
            node.mac = check_mac(mac)
        if ip is not None:
            node.ip = check_ip(ip)
        if boot is not None:
            node.boot_driver = boot
        if power is not None:
            node.power_driver = power
        if disk is not None:
            node.disk = check_disk(disk)
        info = {**(node.driver_info or {}), **secret_values(node)}
        dropped = left_behind(info, old_drivers, (node.boot_driver, node.power_driver))
        for key in dropped:  # settings of the drivers the node no longer uses
            del info[key]
        info.update(parse_sets(set_))
        for key in unset:
            info.pop(key, None)
        store_driver_info(node, info)
        if group:
            node.groups = ensure_groups(s, group)
        if state is not None:
            set_admin_state(node, state)
        validate_drivers(node_info(node))
        s.add(NodeEvent(node_id=node.id, kind="changed", message="node settings changed"))
    echo(f"updated node {name}")
    if dropped:
        echo(f"dropped the old drivers' settings: {', '.join(dropped)}")


@app.command("list")
@handles_errors
def list_nodes(json_out: bool = json_option()) -> None:
    """List nodes with their drivers, state and active job."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.nodes import node_views

    with session_scope() as s:
        views = node_views(s)
    if json_out:
        print_json(views)
        return
    table(["node", "mac", "groups", "boot", "power", "state", "boots", "active job"],
          [[v["name"], v["mac"], ",".join(v["groups"]), v["boot_driver"], v["power_driver"],
            v["admin_state"], v["boot_target"], v["active_job"] or ""] for v in views])


@app.command("show")
@handles_errors
def show(name: str, json_out: bool = json_option()) -> None:
    """Everything about one node."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.nodes import get_node

    with session_scope() as s:
        view = node_view(get_node(s, name))
    if json_out:
        print_json(view)
    else:
        for k, v in view.items():
            echo(f"{k:13} {v}")


@app.command("remove")
@handles_errors
def remove(name: str) -> None:
    """Remove a node that has no active job."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.nodes import remove_node

    with session_scope() as s:
        remove_node(s, name)
    echo(f"removed node {name}")


@app.command("import")
@handles_errors
def import_csv(
    path: Path = typer.Argument(..., help="CSV with a header: name,mac,ip,groups,boot,power,disk[,KEY...]"),
    json_out: bool = json_option(),
) -> None:
    """Add many nodes from a CSV file, all or nothing.

    Columns: name (required), mac, ip, groups (separated by ';' or spaces),
    boot, power, disk; any other column is a driver setting, checked
    like --set against the drivers' keys (`imgfarm node add --help`).
    """
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.config.settings import get_settings
    from imgfarm.models.db import session_scope
    from imgfarm.tasks.nodes import add_node

    settings = get_settings()
    if not path.is_file():
        raise InvalidInput(f"{path} does not exist")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "name" not in (rows[0].keys()):
        raise InvalidInput(f"{path}: no header with a 'name' column")
    added: list[str] = []
    with session_scope() as s:
        for lineno, row in enumerate(rows, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            extra: dict[str, Any] = {k: v for k, v in row.items()
                                     if k not in {"name", "mac", "ip", "groups", "boot", "power", "disk"} and v}
            try:
                add_node(s, row["name"], row.get("mac", ""), row.get("ip", ""),
                         [g for g in row.get("groups", "").replace(";", " ").split() if g],
                         row.get("boot") or settings.default_boot_driver,
                         row.get("power") or settings.default_power_driver, row.get("disk", ""), extra)
            except ImgfarmError as exc:
                raise type(exc)(f"{path}:{lineno}: {exc.message}", exc.hint) from exc
            added.append(row["name"])
    print_json({"added": added}) if json_out else echo(f"added {len(added)} nodes")
