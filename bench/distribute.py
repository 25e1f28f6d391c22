"""Restore one image to N nodes by unicast (HTTP) and by multicast, on a simulated network.

    sudo .venv/bin/python bench/distribute.py [--mib 200] [--nodes 1,4,8,16] [--json]

The real farm (API, worker, its own Redis, SQLite) runs in the store namespace of a
tests/netlib.py network: the store's uplink capped at 200 Mbit/s, every node link at
1 Gbit/s, sim nodes whose agents run in namespaces of their own. The image is an ext4
disk holding `--mib` MiB of random data (so the bytes on the wire are that many).
For each N it restores the image to nodes n1..nN over HTTP (`--transport http`), then
by multicast (`--multicast`), timing submit to the last job's end, and counts the nodes
whose whole disk is byte-identical to the source (sha256).

Goals: multicast at N=16 within 1.3x multicast at N=1; multicast at least 8x faster
than unicast at N=16; every node verified. Beside our figures, the EZIO paper's
published table (50 GB, gigabit, N=32), scaled to this image and this uplink.

`--json` prints {"runs": [{"mode", "nodes", "seconds", "verified"}, ...], ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.farm import Farm  # noqa: E402
from tests.netlib import STORE_ADDR, SimNet, netns_available  # noqa: E402

STORE_MBIT, NODE_MBIT = 200, 1000
EZIO = {"image_gb": 50, "link_mbit": 1000, "nodes": 32, "single": 390.0,
        "unicast": 15168.0, "multicast": 2203.0, "bittorrent": 1143.0}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_source(farm: Farm, mib: int, disk_mib: int) -> Path:
    path = farm.root / "disks" / "n0.img"
    with open(path, "wb") as fh:
        fh.truncate(disk_mib << 20)
    content = farm.root / "disks" / "n0-content"
    content.mkdir(parents=True, exist_ok=True)
    with open(content / "noise.bin", "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True, capture_output=True)
    (content / "noise.bin").unlink()
    return path


def blocksize(mtu: int) -> int:
    """udp-sender's block for this MTU, one block a frame (a block in IP fragments is lost
    with any one of them): 8192 at jumbo frames (9000); 63488 at 65000, which no real
    network carries (a figure that shows what the per-packet cost is); below 9000 0,
    udpcast's default 1456."""
    return 0 if mtu < 9000 else min(63488, (mtu - 800) // 1024 * 1024)


def job_span(farm: Farm, n: int) -> tuple[float, dict[str, int]]:
    """Seconds from the first job's submit to the last job's end, from the job database.

    Why not the CLI's wall time: `imgfarm` started in a namespace and its --wait add
    seconds of their own that are the same for both modes and say nothing about them.
    """
    jobs = [farm.cli_json("jobs", "--node", f"n{k}")[0] for k in range(1, n + 1)]
    first, last = [], []
    states: dict[str, int] = {}
    for job in jobs:
        states[job["state"]] = states.get(job["state"], 0) + 1
        events = farm.cli_json("job", str(job["id"]))["events"]
        first.append(datetime.fromisoformat(events[0]["at"].replace("Z", "+00:00")))
        last.append(datetime.fromisoformat(events[-1]["at"].replace("Z", "+00:00")))
    return round((max(last) - min(first)).total_seconds(), 1), states


def run(args: argparse.Namespace) -> dict:
    counts = [int(n) for n in args.nodes.split(",")]
    top = max(counts)
    disk_mib = args.mib + 64
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imgfarm-distribute-", dir=args.workdir) as tmp, \
            SimNet(top + 1, store_mbit=STORE_MBIT, node_mbit=NODE_MBIT, mtu=args.mtu) as net:
        root = Path(tmp)
        redis = net.popen(net.store, ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        token = "bench-operator-token"
        farm = Farm(root, f"sqlite:///{root / 'data' / 'imgfarm.db'}", 0,
                    IMGFARM_BROKER_URL="redis://127.0.0.1:6379/0", IMGFARM_API_HOST="0.0.0.0",
                    IMGFARM_MULTICAST__INTERFACE="e0", IMGFARM_MULTICAST__MAX_WAIT="30",
                    IMGFARM_MULTICAST__BLOCKSIZE=str(blocksize(args.mtu)),
                    IMGFARM_MULTICAST__MAX_BITRATE=args.max_bitrate, IMGFARM_API_TOKEN=token,
                    # the farm's default (config/settings.py), not the test farm's 0.5 s
                    IMGFARM_PROGRESS_INTERVAL="5")
        farm.env["IMGFARM_API_URL"] = f"http://{STORE_ADDR}:{farm.port}"
        farm.prefix = net.wrap(net.store, [])
        try:
            farm.cli("db", "upgrade")
            farm.start_api()
            farm.start_worker(concurrency=top + 4)
            src = make_source(farm, args.mib, disk_mib)
            farm.cli("node", "add", "n0", "--disk", str(src), "--set", f"netns={net.nodes[0]}")
            farm.cli("capture", "n0", "--image", "base", "--wait", timeout=1800)
            want = sha256_of(src)
            disks = {}
            for k in range(1, top + 1):
                disk = root / "disks" / f"n{k}.img"
                with open(disk, "wb") as fh:
                    fh.truncate(disk_mib << 20)
                farm.cli("node", "add", f"n{k}", "--disk", str(disk), "--set", f"netns={net.nodes[k]}")
                disks[k] = disk
            for n in counts:
                for mode in args.modes.split(","):
                    for k in range(1, n + 1):  # a blank disk each time: nothing left from before
                        with open(disks[k], "wb") as fh:
                            fh.truncate(disk_mib << 20)
                    extra = ["--multicast"] if mode == "multicast" else []
                    t0 = time.monotonic()
                    out = farm.cli("restore", f"n[1-{n}]" if n > 1 else "n1", "--image", "base",
                                   "--transport", "http", *extra, "--wait", check=False, timeout=3600)
                    wall = round(time.monotonic() - t0, 1)
                    seconds, states = job_span(farm, n)
                    verified = sum(sha256_of(disks[k]) == want for k in range(1, n + 1))
                    runs.append({"mode": mode, "nodes": n, "seconds": seconds, "verified": verified,
                                 "cli_wall_seconds": wall, "exit": out.returncode, "states": states})
                    if not args.json:
                        print(f"  {mode:9} N={n:2}  {seconds:7.1f} s  verified {verified}/{n}", flush=True)
                    if args.verbose:  # where the time went: node n1's job events
                        job = farm.cli_json("jobs", "--node", "n1")[0]
                        for e in farm.cli_json("job", str(job["id"]))["events"]:
                            print(f"    {e['at']}  {e['message'][:150]}", file=sys.stderr)
        finally:
            farm.stop()
            redis.kill()
            redis.wait()
    return report(runs, args)


def report(runs: list[dict], args: argparse.Namespace) -> dict:
    def t(mode: str, n: int) -> float | None:
        return next((r["seconds"] for r in runs if r["mode"] == mode and r["nodes"] == n), None)

    top = max(r["nodes"] for r in runs)
    mc1, mcn, ucn = t("multicast", 1), t("multicast", top), t("unicast", top)
    goals = {
        f"multicast N={top} within 1.3x of N=1": bool(mc1 and mcn and mcn <= 1.3 * mc1),
        f"multicast >= 8x faster than unicast at N={top}": bool(mcn and ucn and ucn >= 8 * mcn),
        "every node verified": all(r["verified"] == r["nodes"] for r in runs),
    }
    scale = (args.mib / 1024 / EZIO["image_gb"]) * (EZIO["link_mbit"] / STORE_MBIT)
    ezio = {k: round(EZIO[k] * scale, 1) for k in ("single", "unicast", "multicast", "bittorrent")}
    return {"runs": runs, "goals": goals,
            "ezio_scaled": {"note": f"EZIO's published seconds (50 GB, gigabit, N=32) x {scale:.5f} "
                            f"(this image / 50 GB x 1000 / {STORE_MBIT} Mbit)", **ezio},
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")},
            "setup": {"image_mib": args.mib, "store_mbit": STORE_MBIT, "node_mbit": NODE_MBIT, "mtu": args.mtu,
                      "load_average_at_end": os.getloadavg()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=200, help="MiB of used (random) data in the image")
    parser.add_argument("--nodes", default="1,4,8,16", help="node counts to restore to")
    parser.add_argument("--mtu", type=int, default=9000, help="MTU of the simulated network (9000: "
                        "jumbo frames, and udp-sender sends 8192-byte blocks; 65000, more than real "
                        "networks carry: 63488-byte blocks)")
    parser.add_argument("--modes", default="unicast,multicast", help="which transports to run, in order "
                        "(unicast,multicast); the goals need both")
    parser.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the farm, its image store and the sim disks live (default /dev/shm, "
                        "a tmpfs: 16 sim disks on one machine written to a real file system measure its "
                        "page cache and writeback, which real nodes do not share)")
    parser.add_argument("--max-bitrate", default="", help="udp-sender --max-bitrate (empty: no cap)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print node n1's job events of each run")
    args = parser.parse_args()
    why = netns_available()
    if why:
        print(f"distribute: cannot run: {why}", file=sys.stderr)
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if all(result["goals"].values()) else 1
    e = result["ezio_scaled"]
    print(f"\nEZIO (scaled): single {e['single']} s, unicast N=32 {e['unicast']} s, "
          f"multicast N=32 {e['multicast']} s, BitTorrent N=32 {e['bittorrent']} s")
    for goal, ok in result["goals"].items():
        print(f"  {'met' if ok else 'NOT met'}: {goal}")
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
