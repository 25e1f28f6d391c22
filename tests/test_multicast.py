"""Multicast restore on a simulated network: one udpcast stream, every node verified.

The farm (API, worker, its own Redis, SQLite) runs in the store namespace; each sim
node's agent runs in a namespace of its own (the sim power driver's `netns`), reads
the store over HTTP and the partition streams from udp-receiver. Nothing here leaves
the machine: the addresses exist only inside the namespaces.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.farm import Farm
from tests.netlib import STORE_ADDR, SimNet, netns_available
from tests.support import wait_for

REASON = netns_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(REASON), reason=REASON or "namespaces available"),
]


def _procs(name: str) -> list[int]:
    """Pids of processes called `name` on this machine (any namespace)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == name:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _in_ns(net: SimNet, ns: str, name: str) -> list[int]:
    return [p for p in net.pids_in(ns) if p in set(_procs(name))]


@pytest.fixture
def netfarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Farm, SimNet]]:
    nodes = getattr(request, "param", 7)
    with SimNet(nodes, store_mbit=200, node_mbit=1000) as net:
        redis = net.popen(net.store, ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        farm = Farm(tmp_path, f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}", 0,
                    IMGFARM_BROKER_URL="redis://127.0.0.1:6379/0", IMGFARM_API_HOST="0.0.0.0",
                    IMGFARM_MULTICAST__INTERFACE="e0", IMGFARM_MULTICAST__MAX_WAIT="20",
                    IMGFARM_API_TOKEN="netfarm-operator-token",
                    IMGFARM_IMAGE_TRANSPORT="http")  # no NFS client here; a window has no --transport
        farm.env["IMGFARM_API_URL"] = f"http://{STORE_ADDR}:{farm.port}"
        farm.prefix = net.wrap(net.store, [])
        try:
            farm.cli("db", "upgrade")
            farm.start_api()
            farm.start_worker()
            yield farm, net
        finally:
            farm.stop()
            redis.kill()
            redis.wait()


def _source(farm: Farm, net: SimNet, random_mib: int) -> Path:
    """Node n0 (namespace 0) with an ext4 disk holding `random_mib` MiB of noise, captured as `base`."""
    path = farm.root / "disks" / "n0.img"
    with open(path, "wb") as fh:
        fh.truncate(32 << 20)
    content = farm.root / "disks" / "n0-content"
    content.mkdir(parents=True)
    (content / "noise.bin").write_bytes(os.urandom(random_mib << 20))
    (content / "hostname").write_text("n0\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True, capture_output=True)
    farm.cli("node", "add", "n0", "--disk", str(path), "--set", f"netns={net.nodes[0]}")
    farm.cli("capture", "n0", "--image", "base", "--wait")
    return path


def _events(farm: Farm, node: str) -> str:
    job = farm.cli_json("jobs", "--node", node)[0]
    return " | ".join(e["message"] for e in farm.cli_json("job", str(job["id"]))["events"])


def test_six_nodes_by_multicast_are_byte_identical(netfarm: tuple[Farm, SimNet]) -> None:
    farm, net = netfarm
    src = _source(farm, net, 4)
    disks = [farm.add_node(f"n{k}", "--set", f"netns={net.nodes[k]}") for k in range(1, 7)]
    out = farm.cli("restore", "n[1-6]", "--image", "base", "--transport", "http", "--multicast", "--wait",
                   check=False)
    assert out.returncode == 0, out.stdout + out.stderr + farm.log("worker")
    for disk in disks:
        assert filecmp.cmp(src, disk, shallow=False), f"{disk} differs from the source"
    events = [_events(farm, f"n{k}") for k in range(1, 7)]
    assert any("sent to 6 node(s)" in e for e in events), events
    assert not any("by unicast" in e for e in events), events
    assert not _in_ns(net, net.store, "udp-sender")


@pytest.mark.parametrize("netfarm", [3], indirect=True)
def test_a_multicast_window_restores_its_range_by_one_stream(netfarm: tuple[Farm, SimNet]) -> None:
    farm, net = netfarm
    src = _source(farm, net, 2)
    disks = [farm.add_node(f"n{k}", "--group", "lab1", "--set", f"netns={net.nodes[k]}") for k in (1, 2)]
    farm.cli("window", "add", "lab1-mc", "--cron", "0 3 1 1 *", "--duration", "30", "--group", "lab1",
             "--image", "base", "--max-concurrent", "2", "--multicast", "--max-wait", "10")
    opened = farm.cli_json("window", "run-now", "lab1-mc")  # the tick submits both nodes, one session
    assert sorted(opened["submitted"]) == ["n1", "n2"], opened
    wait_for(lambda: set(farm.job_states("window:lab1-mc").values()) == {"succeeded"}
             and len(farm.job_states("window:lab1-mc")) == 2, 120, interval=0.5, what="both window jobs")
    for disk in disks:
        assert filecmp.cmp(src, disk, shallow=False), f"{disk} differs from the source"
    events = [_events(farm, f"n{k}") for k in (1, 2)]
    assert any("sent to 2 node(s)" in e for e in events), events
    assert not any("by unicast" in e for e in events), events
    wait_for(lambda: not _in_ns(net, net.store, "udp-sender"), 10, what="no udp-sender left")


@pytest.mark.parametrize("netfarm", [5], indirect=True)
def test_killed_receiver_and_late_joiner_fall_back_to_unicast(netfarm: tuple[Farm, SimNet]) -> None:
    farm, net = netfarm
    src = _source(farm, net, 12)
    disks = [farm.add_node("n1", "--set", f"netns={net.nodes[1]}",
                           "--set", "kernel_args=imgfarm.delay=12")]  # joins late
    disks += [farm.add_node(f"n{k}", "--set", f"netns={net.nodes[k]}") for k in (2, 3, 4)]
    farm.cli("restore", "n[1-4]", "--image", "base", "--transport", "http", "--multicast",
             "--max-wait", "4", "--max-bitrate", "24m")
    # kill n2's receiver once its stream flows
    victim = wait_for(lambda: _in_ns(net, net.nodes[2], "udp-receiver")
                      and farm.cli_json("jobs", "--node", "n2")[0].get("bytes_done", 0) > (1 << 20)
                      and _in_ns(net, net.nodes[2], "udp-receiver"), 120, interval=0.2,
                      what="n2's multicast stream to flow")
    os.kill(victim[0], 9)
    killed_at = time.monotonic()
    wait_for(lambda: all(farm.cli_json("jobs", "--node", f"n{k}")[0]["state"] == "succeeded" for k in (3, 4)),
             60, interval=0.5, what="n3 and n4 to succeed")
    # 12 MiB at 24 Mbit/s is ~4.5 s of stream; the dead receiver must not hold the others up for long
    assert time.monotonic() - killed_at < 30 + 5
    wait_for(lambda: all(farm.cli_json("jobs", "--node", f"n{k}")[0]["state"] in ("succeeded", "failed")
                         for k in (1, 2)), 180, interval=1, what="n1 and n2 to end")
    states = {k: farm.cli_json("jobs", "--node", f"n{k}")[0]["state"] for k in (1, 2, 3, 4)}
    assert states == dict.fromkeys((1, 2, 3, 4), "succeeded"), states
    for disk in disks:
        assert filecmp.cmp(src, disk, shallow=False), f"{disk} differs from the source"
    assert "by unicast" in _events(farm, "n2")
    assert "by unicast" in _events(farm, "n1")
    assert "by unicast" not in _events(farm, "n3")
    wait_for(lambda: not _in_ns(net, net.store, "udp-sender"), 10, what="no udp-sender left")


def test_reconciler_kills_a_sender_whose_session_is_over(settings_env: str) -> None:
    import json

    from imgfarm.tasks import multicast

    stray = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        (multicast.session_dir() / "gone.json").write_text(json.dumps({"session": "gone", "pid": stray.pid}))
        assert multicast.kill_strays() == ["gone"]
        assert stray.wait(10) == -9
        assert not list(multicast.session_dir().glob("*.json"))
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
