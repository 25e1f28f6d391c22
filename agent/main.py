"""imgfarm-agent: do one job's imaging on this node and report to the farm.

    imgfarm-agent [--cmdline-file /proc/cmdline]
    imgfarm-agent --self-check

Steps: read orders (imgfarm.api, imgfarm.job, imgfarm.disk on the kernel
command line) -> take the job's token from the farm (first call: job id and
this machine's MACs; the boot files carry no credential) -> fetch the job spec -> find the disk -> mount
the image store -> run the tool, posting progress every few seconds -> post
the result (sha256 of every file written or read, or the error and the
tool's stderr tail). Exit 0 when the job succeeded. This module is the way to
the first calls, and imports only what they need; the job itself is job.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from imgfarm.agent.client import ApiError, FarmClient
from imgfarm.protocol import Orders, ProtocolError

SYS_NET = Path("/sys/class/net")


def log(msg: str) -> None:
    print(f"imgfarm-agent: {msg}", file=sys.stderr, flush=True)


def wait_for_file(path: str, timeout: float) -> bool:
    """Until `path` exists (no path: at once); False at the deadline. /init marks its steps
    with such files, so the agent's first calls need not wait for the slow ones."""
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def machine_macs(cmdline: str = "", sys_net: Path = SYS_NET) -> list[str]:
    """This machine's MACs, the one it booted from first (pxelinux's BOOTIF=01-aa-bb-...)."""
    macs: list[str] = []
    for word in cmdline.split():
        if word.startswith("BOOTIF=") and len(word) == len("BOOTIF=01-") + 17:
            macs.append(word[len("BOOTIF=01-"):].replace("-", ":").lower())
    try:
        for dev in sorted(sys_net.iterdir()):
            addr = (dev / "address").read_text().strip().lower()
            if addr and addr != "00:00:00:00:00:00" and addr not in macs:
                macs.append(addr)
    except OSError:
        pass
    return macs[:64]


def run(orders: Orders, cmdline: str = "") -> int:
    client = FarmClient(orders)
    started = time.monotonic()
    try:
        if not client.token:
            client.claim(machine_macs(cmdline))
    except ApiError as exc:
        log(f"cannot take job {orders.job_id}'s token: {exc}")
        return 2
    try:
        spec = client.spec()
    except ApiError as exc:
        log(f"cannot fetch job {orders.job_id}: {exc}")
        return 2
    except ProtocolError as exc:  # a farm this agent does not understand: say so, and stop
        log(f"job {orders.job_id}: the job spec is not one this agent reads: {exc}")
        try:
            from imgfarm.agent.job import failure  # lazy: the job's modules, for this one report

            client.result(failure(f"the agent cannot read its job spec: {exc}", "", started))
        except ApiError as api_exc:
            log(f"could not report the failure: {api_exc}")
        return 1
    # The job's modules (tools, disks, transfers) load after the first calls, which come
    # about half a second sooner without them under emulation.
    from imgfarm.agent.job import work  # lazy: tools, disks, transfers, progress threads

    return work(client, orders, spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmdline_file = "/proc/cmdline"
    if argv:  # /init runs the agent without options: argparse only loads for a person's options
        args = _parse(argv)
        if args.self_check:
            from imgfarm.agent.selfcheck import self_check  # lazy: shutil and the tool table

            return self_check()
        cmdline_file = args.cmdline_file
    try:
        cmdline = Path(cmdline_file).read_text()
        orders = Orders.from_cmdline(cmdline)
    except (OSError, ProtocolError) as exc:
        log(str(exc))
        return 2
    return run(orders, cmdline)


def _parse(argv: list[str]) -> Any:
    import argparse  # lazy: a boot runs the agent without options

    parser = argparse.ArgumentParser(prog="imgfarm-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cmdline-file", default="/proc/cmdline",
                        help="where the orders are (default: /proc/cmdline)")
    parser.add_argument("--self-check", action="store_true",
                        help="print the tools the agent runs, with their versions; exit 1 if one is missing")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
