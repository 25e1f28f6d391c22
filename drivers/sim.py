"""Simulated nodes: the real agent and the real imaging tools on a file disk.

A sim node's "firmware" is a directory under settings.sim_dir/<node>/:
`boot.json` (what it boots next), `cmdline` (the kernel command line the
boot driver set), `power.json` (on/off and the agent's pid) and `agent.log`.
Power-on with boot target `agent` starts the real `imgfarm-agent` as a local
process in its own session (so it outlives a killed worker, like a real
node); with target `local` the node "boots its OS" and runs nothing.

Its two knobs (`agent`, `kernel_args`, in the tables below) exist for tests
and benchmarks: a node whose agent never reports, a slow agent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import (
    AgentOrders,
    BootInterface,
    BootTarget,
    NodeInfo,
    PowerInterface,
    PowerState,
    Property,
)
from imgfarm.errors import DriverError, DriverSettingsError

AGENT_MODES = ("process", "silent", "external")
BOOT_PROPERTIES = (
    Property("kernel_args", "extra kernel parameters for the agent, after the job's orders",
             example="imgfarm.delay=3"),
)
POWER_PROPERTIES = (
    Property("agent", "what power-on starts: process, the real agent; silent, nothing (an "
             "agent that never reports); external, nothing (another program plays the agent "
             "from the node's cmdline file)", default="process", choices=AGENT_MODES,
             example="silent"),
    Property("netns", "network namespace the agent runs in (`ip netns exec`), for sim nodes on a "
             "simulated network; empty: the worker's own", example="lab-n01"),
)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def node_dir(name: str) -> Path:
    d = get_settings().sim_path / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any] | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def boot_state(name: str) -> dict[str, Any]:
    """What the sim node boots next, as its firmware sees it (tests read this)."""
    return _read(node_dir(name) / "boot.json") or {"target": BootTarget.UNKNOWN}


def _validate_disk(node: NodeInfo) -> None:
    if not node.disk:
        raise DriverSettingsError(
            f"node {node.name}: a sim node needs a disk (a file or block device)",
            hint=f"give it with `imgfarm node set {node.name} --disk /path/to/disk.img`",
        )


class SimBoot(BootInterface):
    """A file-backed node on this machine (needs --disk): what it boots next is a file."""

    name = "sim"
    properties = BOOT_PROPERTIES

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        _validate_disk(node)

    def boot_agent(self, node: NodeInfo, orders: AgentOrders) -> None:
        d = node_dir(node.name)
        cmdline = orders.kernel_params()
        if "imgfarm.disk=" not in cmdline:
            cmdline += f" imgfarm.disk={node.disk}"
        extra = self.value(node, "kernel_args")
        if extra:
            cmdline += " " + extra
        if node.mac:  # what pxelinux's IPAPPEND 2 adds: the MAC the node booted from
            cmdline += " BOOTIF=01-" + node.mac.replace(":", "-")
        with _lock(node.name):
            _write(d / "cmdline", "BOOT_IMAGE=imgfarm-agent " + cmdline + "\n")
            _write(d / "boot.json", {"target": BootTarget.AGENT, "job": orders.job_id})

    def boot_local(self, node: NodeInfo) -> None:
        d = node_dir(node.name)
        with _lock(node.name):
            _write(d / "boot.json", {"target": BootTarget.LOCAL})
            (d / "cmdline").unlink(missing_ok=True)

    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        return BootTarget(boot_state(node.name).get("target", BootTarget.UNKNOWN))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SimPower(PowerInterface):
    """A file-backed node on this machine (needs --disk): power-on starts the real agent."""

    name = "sim"
    properties = POWER_PROPERTIES

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        _validate_disk(node)

    def get_power_state(self, node: NodeInfo) -> PowerState:
        st = _read(node_dir(node.name) / "power.json")
        return PowerState(st.get("state", PowerState.OFF))

    def set_power_state(self, node: NodeInfo, state: PowerState) -> None:
        with _lock(node.name):
            if state == PowerState.OFF:
                self._off(node)
            elif state == PowerState.ON:
                self._on(node)
            else:
                raise DriverError(f"node {node.name}: cannot set power state {state}")

    def reboot(self, node: NodeInfo) -> None:
        with _lock(node.name):
            self._off(node)
            self._on(node)

    def _off(self, node: NodeInfo) -> None:
        d = node_dir(node.name)
        st = _read(d / "power.json")
        pid = int(st.get("pid") or 0)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        _write(d / "power.json", {"state": PowerState.OFF, "pid": 0})

    def _on(self, node: NodeInfo) -> None:
        d = node_dir(node.name)
        boot = boot_state(node.name)
        pid = 0
        if boot.get("target") == BootTarget.AGENT and self.value(node, "agent").lower() == "process":
            log = open(d / "agent.log", "ab")  # noqa: SIM115 - handed to the child
            agent = [sys.executable, "-m", "imgfarm.agent", "--cmdline-file", str(d / "cmdline")]
            netns = self.value(node, "netns")
            if netns:
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", netns):
                    log.close()
                    raise DriverSettingsError(f"node {node.name}: bad netns {netns!r}",
                                              hint="a namespace name as `ip netns list` shows it")
                agent = ["ip", "netns", "exec", netns, *agent]
            try:
                proc = subprocess.Popen(
                    agent,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                log.close()
            pid = proc.pid
            # Reap the child when it ends so it does not linger as a zombie.
            threading.Thread(target=proc.wait, daemon=True).start()
        _write(d / "power.json", {"state": PowerState.ON, "pid": pid, "boot": boot.get("target")})
