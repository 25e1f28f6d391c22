"""The simulated network itself: what crosses the bridge, the caps, the teardown.

These run the real udpcast across the namespaces, because every multicast test
and the distribution benchmark stand on it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.netlib import STORE_ADDR, SimNet, netns_available, node_addr

REASON = netns_available()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "namespaces available")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_layout_caps_and_teardown() -> None:
    with SimNet(2, store_mbit=200, node_mbit=1000) as net:
        made = {net.bridge, net.store, *net.nodes}
        assert made <= _namespaces()
        addr = net.run(net.nodes[1], ["ip", "-4", "-o", "addr", "show", "dev", "e0"], text=True).stdout
        assert f"{node_addr(1)}/24 brd {node_addr(1).rsplit('.', 1)[0]}.255" in addr
        qdisc = net.run(net.store, ["tc", "qdisc", "show", "dev", "e0"], text=True).stdout
        assert "tbf" in qdisc and "200Mbit" in qdisc
        snoop = net.run(net.bridge, ["ip", "-d", "link", "show", "br0"], text=True).stdout
        assert "mcast_snooping 0" in snoop
        # unicast crosses the bridge: a node reaches the store's TCP port
        server = net.popen(net.store, ["python3", "-c",
                                       "import socket;s=socket.create_server(('0.0.0.0',7000));"
                                       "c,_=s.accept();c.sendall(b'hello');c.close()"])
        try:
            client = ("import socket,time\n"
                      "for _ in range(100):\n"
                      f"  try: c=socket.create_connection(('{STORE_ADDR}',7000),1); break\n"
                      "  except OSError: time.sleep(0.05)\n"
                      "print(c.recv(5).decode())")
            got = net.run(net.nodes[0], ["python3", "-c", client], text=True, timeout=20)
            assert got.stdout.strip() == "hello", got.stderr
        finally:
            server.kill()
            server.wait()
    assert not made & _namespaces()


def test_teardown_after_a_failure_kills_what_ran_inside() -> None:
    with pytest.raises(RuntimeError), SimNet(1) as net:
        sleeper = net.popen(net.nodes[0], ["sleep", "600"])
        made = {net.bridge, net.store, *net.nodes}
        raise RuntimeError("a test failed here")
    assert sleeper.wait(10) != 0
    assert not made & _namespaces()


def test_udpcast_to_three_nodes_byte_identical(tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    src = tmp_path / "src"
    src.write_bytes(data)
    with SimNet(3, store_mbit=200, node_mbit=1000) as net:
        receivers = [net.popen(ns, ["udp-receiver", "--interface", "e0", "--nokbd", "--file",
                                    str(tmp_path / f"dst{k}"), "--start-timeout", "30"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for k, ns in enumerate(net.nodes)]
        sender = net.popen(net.store, ["udp-sender", "--interface", "e0", "--nokbd", "--file", str(src),
                                       "--min-receivers", "3", "--max-wait", "20", "--start-timeout", "30"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
        assert [r.wait(30) for r in receivers] == [0, 0, 0]
    want = hashlib.sha256(data).hexdigest()
    assert [hashlib.sha256((tmp_path / f"dst{k}").read_bytes()).hexdigest() for k in range(3)] == [want] * 3
