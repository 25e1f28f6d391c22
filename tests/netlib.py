"""A simulated network for one test or benchmark: namespaces, veth pairs, one bridge, tc caps.

Layout (every name carries a per-run prefix, so parallel runs never collide):

    <p>br   the switch: a Linux bridge `br0` (mcast_snooping 0: nobody sends IGMP queries)
    <p>st   the farm's store host, 198.18.0.1/24 on `e0`; its uplink may be capped
    <p>nK   sim node K, 198.18.0.(10+K)/24 on `e0`; its link may be capped

Addresses come from 198.18.0.0/15 (the benchmarking range) and exist only inside the
namespaces, so no test traffic leaves the machine. Every address is added with `brd +`:
udpcast sends its connect request to the interface's broadcast address, and without one
that is 0.0.0.0 and the sender waits for ever. Each namespace has a multicast route on
`e0`. A cap is `tbf` on both ends of the link's veth pair (egress each way), so the store's
uplink caps what the store sends and what it receives.

`SimNet.close()` deletes every namespace it made (deleting a namespace removes its veth
ends and kills nothing else); use it as a context manager so a failing test still tears
down. `netns_available()` says whether `ip netns` works here, for skips with a reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from typing import Any

SUBNET = "198.18.0"
STORE_ADDR = f"{SUBNET}.1"


def node_addr(index: int) -> str:
    return f"{SUBNET}.{10 + index}"


def _ip(*args: str, ns: str = "") -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")


def netns_available() -> str:
    """Empty when namespaces, veth and bridges can be made here; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    name = f"probe{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", "b0", "type", "bridge", ns=name)
        _ip("link", "add", "v0", "type", "veth", "peer", "name", "v1", ns=name)
    except RuntimeError as exc:
        return f"`ip netns` is not allowed here ({exc})"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def _tbf(ns: str, dev: str, rate_mbit: float) -> None:
    # burst: at least one jiffy's worth of bytes at this rate (and a few packets)
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))
    out = subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                          "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tc on {ns}/{dev}: {out.stderr.strip()}")


class SimNet:
    """The bridge, the store namespace and `nodes` node namespaces; see the module doc."""

    def __init__(self, nodes: int, *, store_mbit: float = 0, node_mbit: float = 0, mtu: int = 1500) -> None:
        self.prefix = "if" + uuid.uuid4().hex[:6]
        self.bridge = f"{self.prefix}br"
        self.store = f"{self.prefix}st"
        self.nodes = [f"{self.prefix}n{k}" for k in range(nodes)]
        self._made: list[str] = []
        self._started: list[subprocess.Popen[Any]] = []  # by popen(): killed at close
        self.mtu = mtu
        try:
            self._build(store_mbit, node_mbit)
        except BaseException:
            self.close()
            raise

    def _build(self, store_mbit: float, node_mbit: float) -> None:
        for ns in (self.bridge, self.store, *self.nodes):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.bridge)
        _ip("link", "set", "br0", "mtu", str(self.mtu), ns=self.bridge)
        _ip("link", "set", "br0", "up", ns=self.bridge)
        self._attach(self.store, "pst", STORE_ADDR, store_mbit)
        for k, ns in enumerate(self.nodes):
            self._attach(ns, f"p{k}", node_addr(k), node_mbit)

    def _attach(self, ns: str, port: str, addr: str, mbit: float) -> None:
        _ip("link", "add", port, "type", "veth", "peer", "name", "e0", "netns", ns, ns=self.bridge)
        _ip("link", "set", port, "mtu", str(self.mtu), ns=self.bridge)
        _ip("link", "set", "e0", "mtu", str(self.mtu), ns=ns)
        _ip("link", "set", port, "master", "br0", ns=self.bridge)
        _ip("link", "set", port, "up", ns=self.bridge)
        _ip("addr", "add", f"{addr}/24", "brd", "+", "dev", "e0", ns=ns)
        _ip("link", "set", "e0", "up", ns=ns)
        _ip("route", "add", "224.0.0.0/4", "dev", "e0", ns=ns)
        if mbit:
            _tbf(ns, "e0", mbit)
            _tbf(self.bridge, port, mbit)

    # ------------------------------------------------------------ running things inside
    @staticmethod
    def wrap(ns: str, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def run(self, ns: str, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.wrap(ns, args), **kw)

    def popen(self, ns: str, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.wrap(ns, args), **kw)
        self._started.append(proc)
        return proc

    def pids_in(self, ns: str) -> list[int]:
        """Processes running in namespace `ns` (what `ip netns pids` sees)."""
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        # What this net started, by its own pid: `ip netns exec` may not have entered its
        # namespace yet when a test fails at once, and `ip netns pids` does not see it then
        # (it then ran on in a namespace already deleted). `ip netns exec` execs the command,
        # so the pid is the command's.
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self._started.clear()
        for ns in reversed(self._made):
            for pid in self.pids_in(ns):  # what a test started in there and left behind
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> SimNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
