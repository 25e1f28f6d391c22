"""Finding the disk to image, and its partitions.

The original xCAT plugin only looked at sda, sdb, hda and hdb. Here: the
disk named in the orders or the job spec if any, else the first
non-removable disk of any common kind (sd*, hd*, vd*, nvme*n*, xvd*,
mmcblk*), in that order of preference.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

DISK_PATTERNS = [r"sd[a-z]+", r"hd[a-z]+", r"vd[a-z]+", r"nvme\d+n\d+", r"xvd[a-z]+", r"mmcblk\d+"]


class DiskError(Exception):
    pass


def find_disk(hint: str = "", sys_block: Path = Path("/sys/block")) -> str:
    if hint:
        path = hint if hint.startswith("/") else f"/dev/{hint}"
        if not os.path.exists(path):
            raise DiskError(f"target disk {path} does not exist")
        return path
    names = sorted(p.name for p in sys_block.iterdir()) if sys_block.is_dir() else []
    for pattern in DISK_PATTERNS:
        for name in names:
            if not re.fullmatch(pattern, name):
                continue
            removable = sys_block / name / "removable"
            size = sys_block / name / "size"
            try:
                if removable.read_text().strip() == "1" or int(size.read_text()) == 0:
                    continue
            except (OSError, ValueError):
                pass
            return f"/dev/{name}"
    raise DiskError(
        "no target disk found (looked for sd*, hd*, vd*, nvme*n*, xvd*, mmcblk*); "
        "name one with imgfarm.disk= on the kernel command line or --disk on the node"
    )


def size_of(dev: str) -> int:
    if os.path.isfile(dev):
        return os.path.getsize(dev)
    out = subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def partition_table(dev: str) -> dict | None:
    """The disk's table as sfdisk sees it, or None for a bare filesystem."""
    out = subprocess.run(["sfdisk", "--json", dev], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    table = json.loads(out.stdout).get("partitiontable") or {}
    if not table.get("partitions"):
        return None
    dump = subprocess.run(["sfdisk", "-d", dev], capture_output=True, text=True, check=True).stdout
    return {"type": table.get("label", "dos"), "sfdisk": dump, "json": table}


def partition_device(disk: str, number: int) -> str:
    sep = "p" if re.search(r"\d$", disk) else ""
    return f"{disk}{sep}{number}"


def fs_type(dev: str) -> str:
    out = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", dev], capture_output=True, text=True
    )
    return out.stdout.strip()


PARTCLONE_TOOL = {
    "ext2": ("extfs", "EXTFS"), "ext3": ("extfs", "EXTFS"), "ext4": ("extfs", "EXTFS"),
    "vfat": ("fat", "FAT"), "msdos": ("fat", "FAT"), "ntfs": ("ntfs", "NTFS"),
    "xfs": ("xfs", "XFS"), "btrfs": ("btrfs", "BTRFS"), "exfat": ("exfat", "EXFAT"),
    "hfsplus": ("hfsp", "HFS Plus"), "f2fs": ("f2fs", "F2FS"),
}


def partclone_for(fstype: str) -> tuple[str, str]:
    """(partclone program suffix, FS label) — unknown or empty falls back to dd."""
    return PARTCLONE_TOOL.get(fstype, ("dd", "raw"))


class PartitionDevices:
    """Block devices for a disk's partitions, whatever the disk is.

    A real disk has /dev/sda1 (after the kernel re-reads its table). A disk
    *file* (sim nodes) or a device whose partitions the kernel did not
    expose (containers without partition scanning) gets one loop device per
    partition, at its offset and size. All are detached on exit.
    """

    def __init__(self, disk: str, parts: list[tuple[int, int, int]]) -> None:
        self.disk = disk
        self.parts = parts  # (number, start byte, size bytes)
        self.loops: list[str] = []

    def __enter__(self) -> dict[int, str]:
        out: dict[int, str] = {}
        if not os.path.isfile(self.disk):
            subprocess.run(["blockdev", "--rereadpt", self.disk], capture_output=True)
        for number, start, size in self.parts:
            node = partition_device(self.disk, number)
            if not os.path.isfile(self.disk) and os.path.exists(node):
                out[number] = node
                continue
            dev = subprocess.run(
                ["losetup", "-f", "--show", "--offset", str(start), "--sizelimit", str(size), self.disk],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            self.loops.append(dev)
            out[number] = dev
        return out

    def __exit__(self, *exc: object) -> None:
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


class LoopAttach:
    """Attach a disk *file* to a loop device when a tool needs a block device."""

    def __init__(self, path: str, partitions: bool = False) -> None:
        self.path = path
        self.partitions = partitions
        self.dev = ""

    def __enter__(self) -> str:
        if not os.path.isfile(self.path):
            return self.path
        args = ["losetup", "-f", "--show"] + (["-P"] if self.partitions else []) + [self.path]
        self.dev = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        return self.dev

    def __exit__(self, *exc: object) -> None:
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
