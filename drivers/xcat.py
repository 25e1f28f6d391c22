"""The xcat boot and power drivers: xCAT's `nodeset`, `rpower`, `nodestat`.

What the original xCAT plugin did, done from the farm: to boot the agent,
give the node its job's kernel parameters in `bootparams.addkcmdline`
(`chdef -z`, a stanza so one call carries a different line per node), then
`nodeset NODES osimage=<settings.xcat.osimage>`; to go back to disk,
`nodeset NODES boot` and clear the line (the token must not linger). Every
change is read back with `nodeset NODES stat`; a node whose state is not
what was asked is a DriverError. Power is `rpower NODES on|off|boot|stat`.

Every call is per node (a job's thread), but the commands run per batch: the
`Coalescer` gathers calls arriving within `settings.xcat.batch_window` into
one command of up to `batch_size` nodes, so 200 jobs ending together cost a
few `nodeset` processes, not 200.

driver_info keys (all optional): `xcat_node` - the node's name in xCAT when
it differs from the farm's.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.drivers import _xcat_cmd as xc
from imgfarm.drivers._xcat_batch import Coalescer
from imgfarm.drivers.base import (
    AgentOrders,
    BootInterface,
    BootTarget,
    NodeInfo,
    PowerInterface,
    PowerState,
)
from imgfarm.errors import DriverError, DriverSettingsError

log = logging.getLogger(__name__)

AGENT_STATES = ("netboot", "install", "statelite")  # first word of `nodeset stat`
_POWER_WORDS = {"on": PowerState.ON, "running": PowerState.ON,
                "off": PowerState.OFF, "not activated": PowerState.OFF}


def xcat_name(node: NodeInfo) -> str:
    """The node's name in xCAT; checked so one bad name cannot fail a whole batch."""
    name = str(node.driver_info.get("xcat_node") or node.name)
    if not xc.NODE_NAME.match(name):
        raise DriverSettingsError(
            f"node {node.name}: {name!r} is not a valid xCAT node name",
            hint=f"give its xCAT name with `imgfarm node set {node.name} --set xcat_node=NAME`",
        )
    return name


def target_of(state_text: str) -> BootTarget:
    """Map a `nodeset stat` answer ("boot", "netboot rhels8-x86_64-x") to a BootTarget."""
    word = state_text.strip().split(" ", 1)[0].lower() if state_text.strip() else ""
    if word == "boot":
        return BootTarget.LOCAL
    if word in AGENT_STATES:
        return BootTarget.AGENT
    return BootTarget.UNKNOWN


# --- batch runners: key -> {node: payload} -> {node: result | Exception} ----

def _nodes_cmd(cmd: str, nodes: list[str], *args: str) -> dict[str, Any]:
    """Run `cmd NODES args`, drop nodes xCAT does not know and rerun the rest.

    xcatd refuses a whole noderange when one name in it is unknown, so one
    mistyped node must not fail its batch-mates.
    """
    out: dict[str, Any] = {}
    todo = list(nodes)
    while todo:
        result = xc.run(cmd, [",".join(todo), *args])
        invalid = [n for n in result.invalid_nodes() if n in todo]
        if invalid:
            for n in invalid:
                out[n] = DriverError(
                    f"{cmd}: node {n} is not defined in xCAT (exit {result.returncode})",
                    hint="define it (`mkdef -t node ...`), or give its xCAT name with "
                    f"`imgfarm node set {n} --set xcat_node=NAME`",
                )
            todo = [n for n in todo if n not in invalid]
            continue
        general = "; ".join(result.general_errors())
        for n, answer in xc.per_node(result, todo).items():
            if answer is None:
                out[n] = xc.node_error(result, n, general or f"no answer ({result.tail()})")
            elif not answer.ok:
                out[n] = xc.node_error(result, n, answer.text)
            else:
                out[n] = answer.text
        break
    return out


def _stanza(kcmdlines: Mapping[str, str]) -> str:
    lines = []
    for node, line in kcmdlines.items():
        lines += [f"{node}:", "    objtype=node", f'    addkcmdline="{line}"', ""]
    return "\n".join(lines)


def _set_kcmdline(kcmdlines: Mapping[str, str]) -> dict[str, Any]:
    """One `chdef -z` for many nodes; chdef's output is not per node."""
    if not kcmdlines:
        return {}
    result = xc.run("chdef", ["-z"], stdin=_stanza(kcmdlines))
    if result.returncode == 0:
        return {n: None for n in kcmdlines}
    return {n: xc.node_error(result, n, result.tail()) for n in kcmdlines}


def _verify(nodes: list[str], want: BootTarget, done: dict[str, Any]) -> None:
    """Read back `nodeset stat` for nodes still ok in `done`; mismatches fail."""
    ok = [n for n in nodes if not isinstance(done.get(n), Exception)]
    if not ok:
        return
    for n, state in _nodes_cmd("nodeset", ok, "stat").items():
        if isinstance(state, Exception):
            done[n] = state
        elif target_of(state) is not want:
            done[n] = DriverError(
                f"nodeset stat for {n} says {state!r}, not {want.value} as just set",
                hint="another tool (or a chain/runcmd) changed the node's boot state; "
                "check `nodeset NODE stat` and the chain table",
            )
        else:
            done[n] = state


def _run_batch(key: Hashable, payloads: Mapping[str, Any]) -> Mapping[str, Any]:
    assert isinstance(key, tuple)
    op, *rest = key
    nodes = list(payloads)
    if op == "agent":
        (osimage,) = rest
        # Unknown nodes are filtered first: chdef would create them.
        done: dict[str, Any] = {n: s for n, s in _nodes_cmd("nodeset", nodes, "stat").items()
                                if isinstance(s, Exception)}
        known = [n for n in nodes if n not in done]
        done.update(_set_kcmdline({n: payloads[n] for n in known}))
        ready = [n for n in known if not isinstance(done.get(n), Exception)]
        if ready:
            done.update(_nodes_cmd("nodeset", ready, f"osimage={osimage}"))
        _verify(ready, BootTarget.AGENT, done)
        return done
    if op == "local":
        done = _nodes_cmd("nodeset", nodes, "boot")
        _verify(nodes, BootTarget.LOCAL, done)
        cleared = [n for n in nodes if not isinstance(done[n], Exception)]
        for n, err in _set_kcmdline({n: "" for n in cleared}).items():
            if isinstance(err, Exception):  # the node boots locally; only log it
                log.warning("could not clear addkcmdline of %s: %s", n, err)
        return done
    if op in ("stat", "rpower", "nodestat"):
        return _nodes_cmd("nodeset" if op == "stat" else op, nodes, *rest)
    raise ValueError(f"unknown xcat batch {key!r}")


_batcher = Coalescer(
    _run_batch,
    window=lambda: get_settings().xcat.batch_window,
    size=lambda: get_settings().xcat.batch_size,
    # A batch runs at most 4 commands, each bounded by command_timeout.
    limit=lambda: 5 * get_settings().xcat.command_timeout + get_settings().xcat.batch_window,
)


def batcher() -> Coalescer:
    """The process's coalescer (tests read `batches_run`)."""
    return _batcher


# --- drivers -----------------------------------------------------------------

_SAFE_KCMDLINE = re.compile(r'^[^"\n\r\\]*$')


def _validate_name(node: NodeInfo) -> None:
    xcat_name(node)


class XcatBoot(BootInterface):
    """Boot through `nodeset`: the agent osimage with the job's orders, or the disk."""

    name = "xcat"

    def validate(self, node: NodeInfo) -> None:
        _validate_name(node)

    def boot_agent(self, node: NodeInfo, orders: AgentOrders) -> None:
        cfg = get_settings().xcat
        line = " ".join(p for p in (orders.kernel_params(), cfg.agent_kcmdline) if p)
        if not _SAFE_KCMDLINE.match(line):
            raise DriverError(f"kernel parameters for {node.name} contain a quote or newline")
        _batcher.submit(("agent", cfg.osimage), xcat_name(node), line)

    def boot_local(self, node: NodeInfo) -> None:
        _batcher.submit(("local",), xcat_name(node))

    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        return target_of(_batcher.submit(("stat", "stat"), xcat_name(node)))

    def boot_local_many(self, nodes: Iterable[NodeInfo]) -> dict[str, Exception | None]:
        by_xname = {xcat_name(n): n.name for n in nodes}
        results = _batcher.run_now(("local",), {x: None for x in by_xname})
        return {
            by_xname[x]: (r if isinstance(r, Exception) else None) for x, r in results.items()
        }


class XcatPower(PowerInterface):
    """Power through `rpower`; xCAT holds the BMC credentials, the farm none."""

    name = "xcat"

    def validate(self, node: NodeInfo) -> None:
        _validate_name(node)

    def get_power_state(self, node: NodeInfo) -> PowerState:
        text = _batcher.submit(("rpower", "stat"), xcat_name(node))
        return _POWER_WORDS.get(str(text).strip().lower(), PowerState.UNKNOWN)

    def set_power_state(self, node: NodeInfo, state: PowerState) -> None:
        if state not in (PowerState.ON, PowerState.OFF):
            raise DriverError(f"cannot set power state {state!r}")
        _batcher.submit(("rpower", state.value), xcat_name(node))

    def reboot(self, node: NodeInfo) -> None:
        # `rpower boot`: on if off, hard reset if on - one call, not two.
        _batcher.submit(("rpower", "boot"), xcat_name(node))


# --- nodestat progress, site table ---------------------------------------------

@dataclass(frozen=True)
class NodeStatus:
    text: str  # what nodestat said: "sshd", "noping", "partimage-ng: 43%"
    percent: int | None  # progress when the node's listener reports one


_PERCENT = re.compile(r"(\d{1,3})\s*%")


def xcat_node_status(node: NodeInfo) -> NodeStatus:
    """Progress fallback: the old plugin's listener let `nodestat` show "tool: 43%"."""
    text = str(_batcher.submit(("nodestat",), xcat_name(node)))
    m = _PERCENT.search(text)
    pct = int(m.group(1)) if m and int(m.group(1)) <= 100 else None
    return NodeStatus(text, pct)


_site_lock = threading.Lock()
_site_cache: tuple[float, dict[str, str]] | None = None


def site_table(refresh: bool = False) -> dict[str, str]:
    """xCAT's site table as {key: value}, from `tabdump site` (CSV), cached."""
    global _site_cache
    ttl = get_settings().xcat.site_cache_seconds
    with _site_lock:
        if not refresh and _site_cache and time.monotonic() - _site_cache[0] < ttl:
            return dict(_site_cache[1])
    result = xc.run("tabdump", ["site"])
    if result.returncode != 0:
        raise DriverError(
            f"tabdump site failed (exit {result.returncode}): {result.tail()}",
            hint="is xcatd running, and may this user read the site table?",
        )
    table: dict[str, str] = {}
    rows = csv.reader(io.StringIO(result.stdout))
    for row in rows:
        if not row or row[0].startswith("#") or len(row) < 2:
            continue
        if len(row) >= 4 and row[3].strip() in ("1", "yes"):
            continue  # disabled row
        table[row[0]] = row[1]
    with _site_lock:
        _site_cache = (time.monotonic(), table)
    return dict(table)


def xcat_image_store() -> str | None:
    """The image store's NFS location "server:/dir" from IMAGELIBSERVER/IMAGELIBINSTALLDIR.

    None when the site table does not name both (or use_site_table is off):
    the farm then uses its own `image_store_nfs` setting.
    """
    if not get_settings().xcat.use_site_table:
        return None
    site = site_table()
    server = site.get("IMAGELIBSERVER", "").strip()
    directory = site.get("IMAGELIBINSTALLDIR", "").strip()
    if not server or not directory:
        return None
    return f"{server}:{directory if directory.startswith('/') else '/' + directory}"


def _reset_for_tests() -> None:
    global _site_cache
    with _site_lock:
        _site_cache = None


__all__ = ["NodeStatus", "XcatBoot", "XcatPower", "batcher", "site_table",
           "xcat_image_store", "xcat_node_status"]
