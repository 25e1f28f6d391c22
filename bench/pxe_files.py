"""Bench: per-node PXE boot files for 2,500 nodes, written and reverted.

Why: a bulk window restores a whole lab at once; the pxe driver writes one
file per node (temp file + fsync + rename) when the jobs start and reverts
each to local boot when they end. Target: 2,500 nodes both ways in under 5 s
on one worker. Runs the real driver against a temporary TFTP root.

    /tmp/probe-venv/bin/python bench/pxe_files.py [--nodes 2500] [--loader pxelinux]
        [--threads 16] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2500)
    ap.add_argument("--loader", default="all", choices=["pxelinux", "ipxe", "grub", "all"])
    ap.add_argument("--threads", type=int, default=16, help="like job threads in a worker")
    ap.add_argument("--root", help="TFTP root to use (default: a temp dir, removed after)")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds allowed, both ways")
    args = ap.parse_args(argv)

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="pxe-bench-"))
    os.environ["IMGFARM_PXE__TFTP_ROOT"] = str(root)
    from imgfarm.config.settings import get_settings
    from imgfarm.drivers.base import AgentOrders, NodeInfo
    from imgfarm.drivers.pxe import PxeBoot

    get_settings.cache_clear()
    loaders = ["pxelinux", "ipxe", "grub"] if args.loader == "all" else [args.loader]
    nodes = [
        NodeInfo(name=f"n{i:05d}", mac=f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                 f"{i & 255:02x}", boot_driver="pxe",
                 driver_info={"loader": loaders[i % len(loaders)]})
        for i in range(args.nodes)
    ]
    boot = PxeBoot()
    ok = True
    try:
        with ThreadPoolExecutor(args.threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda n: boot.boot_agent(
                n, AgentOrders(api_url="http://10.0.0.1:8470", job_id=int(n.name[1:]) + 1,
                               token="t" * 43)), nodes))
            t1 = time.perf_counter()
            list(pool.map(boot.boot_local, nodes))
            t2 = time.perf_counter()
        files = sum(1 for p in root.rglob("*") if p.is_file())
        total = t2 - t0
        ok = total < args.budget and files == args.nodes
        print(f"pxe_files: {args.nodes} nodes ({'/'.join(loaders)}), {args.threads} threads, "
              f"root {root}")
        print(f"  boot_agent: {t1 - t0:6.3f} s  ({args.nodes / (t1 - t0):8.0f} files/s)")
        print(f"  boot_local: {t2 - t1:6.3f} s  ({args.nodes / (t2 - t1):8.0f} files/s)")
        print(f"  total:      {total:6.3f} s  budget {args.budget:g} s -> "
              f"{'OK' if ok else 'OVER'}; {files} files on disk")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
