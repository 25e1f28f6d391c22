"""The xcat boot driver: `chdef` + `nodeset`, every change read back.

What the original xCAT plugin did, done from the farm: to boot the agent,
give the node its job's kernel parameters in `bootparams.addkcmdline`
(`chdef -z`, a stanza so one call carries a different line per node), then
`nodeset NODES osimage=<settings.xcat.osimage>`; to go back to disk,
`nodeset NODES boot` and clear the line (no job's orders linger). Every
change is read back with `nodeset NODES stat`; a node whose state is not
what was asked is a DriverError.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import AgentOrders, BootInterface, BootTarget, NodeInfo
from imgfarm.drivers.xcat import batch
from imgfarm.drivers.xcat import commands as xc
from imgfarm.drivers.xcat.common import PROPERTIES, xcat_name
from imgfarm.errors import DriverError

log = logging.getLogger(__name__)

AGENT_STATES = ("netboot", "install", "statelite")  # first word of `nodeset stat`
_SAFE_KCMDLINE = re.compile(r'^[^"\n\r\\]*$')


def target_of(state_text: str) -> BootTarget:
    """Map a `nodeset stat` answer ("boot", "netboot rhels8-x86_64-x") to a BootTarget."""
    word = state_text.strip().split(" ", 1)[0].lower() if state_text.strip() else ""
    if word == "boot":
        return BootTarget.LOCAL
    if word in AGENT_STATES:
        return BootTarget.AGENT
    return BootTarget.UNKNOWN


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
    for n, state in xc.nodes_cmd("nodeset", ok, "stat").items():
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


# --- batch operations: {node: payload} -> {node: result | Exception} ------------

def nodeset_agent(payloads: Mapping[str, Any], osimage: str) -> dict[str, Any]:
    """Each node's kernel line (its payload) into addkcmdline, then the agent osimage."""
    nodes = list(payloads)
    # Unknown nodes are filtered first: chdef would create them.
    done: dict[str, Any] = {n: s for n, s in xc.nodes_cmd("nodeset", nodes, "stat").items()
                            if isinstance(s, Exception)}
    known = [n for n in nodes if n not in done]
    done.update(_set_kcmdline({n: payloads[n] for n in known}))
    ready = [n for n in known if not isinstance(done.get(n), Exception)]
    if ready:
        done.update(xc.nodes_cmd("nodeset", ready, f"osimage={osimage}"))
    _verify(ready, BootTarget.AGENT, done)
    return done


def nodeset_boot(payloads: Mapping[str, Any]) -> dict[str, Any]:
    """Local boot, read back, then the job's kernel line cleared."""
    nodes = list(payloads)
    done = xc.nodes_cmd("nodeset", nodes, "boot")
    _verify(nodes, BootTarget.LOCAL, done)
    cleared = [n for n in nodes if not isinstance(done[n], Exception)]
    for n, err in _set_kcmdline({n: "" for n in cleared}).items():
        if isinstance(err, Exception):  # the node boots locally; only log it
            log.warning("could not clear addkcmdline of %s: %s", n, err)
    return done


def nodeset_stat(payloads: Mapping[str, Any]) -> dict[str, Any]:
    return xc.nodes_cmd("nodeset", list(payloads), "stat")


# --- the driver ------------------------------------------------------------------

class XcatBoot(BootInterface):
    """xCAT's nodeset: the agent osimage with the job's orders, or the local disk."""

    name = "xcat"
    properties = PROPERTIES

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        xcat_name(node)

    def boot_agent(self, node: NodeInfo, orders: AgentOrders) -> None:
        cfg = get_settings().xcat
        line = " ".join(p for p in (orders.kernel_params(), cfg.agent_kcmdline) if p)
        if not _SAFE_KCMDLINE.match(line):
            raise DriverError(f"kernel parameters for {node.name} contain a quote or newline")
        batch.submit(nodeset_agent, cfg.osimage, node=xcat_name(node), payload=line)

    def boot_local(self, node: NodeInfo) -> None:
        batch.submit(nodeset_boot, node=xcat_name(node))

    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        return target_of(batch.submit(nodeset_stat, node=xcat_name(node)))

    def boot_local_many(self, nodes: Iterable[NodeInfo]) -> dict[str, Exception | None]:
        by_xname = {xcat_name(n): n.name for n in nodes}
        results = batch.run_now(nodeset_boot, payloads={x: None for x in by_xname})
        return {
            by_xname[x]: (r if isinstance(r, Exception) else None) for x, r in results.items()
        }


__all__ = ["XcatBoot", "target_of"]
