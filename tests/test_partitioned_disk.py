"""A disk with a partition table (ext4 + FAT32), captured and restored by the real agent.

The agent attaches the disk file to a loop device with partitions (as a real
node has /dev/sdaN), captures each partition with its own partclone tool,
keeps the sfdisk dump and the boot area before the first partition, and
restores all of it onto a blank disk: the two disk files must be identical.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.farm import Farm
from tests.support import loop_device_at, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")]


def make_partitioned_disk(path: Path, tmp: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(96 << 20)
    run("sfdisk", "-q", path, input="label: dos\nstart=2048, size=40960, type=83\nstart=43008, type=c\n")
    with open(path, "r+b") as fh:  # something in the boot area, as a boot loader would leave
        fh.seek(1024)
        fh.write(b"BOOTCODE" * 64)
    content = tmp / "root"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("parted\n")
    (content / "blob").write_bytes(os.urandom(1 << 20))
    # one loop device per partition, at its offset (no partition scanning needed)
    with loop_device_at(path, 2048 * 512, 40960 * 512) as p1, loop_device_at(path, 43008 * 512, None) as p2:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", content, p1)
        run("mkfs.vfat", "-F", "32", p2)
        efi = tmp / "BOOTX64.EFI"
        efi.write_bytes(os.urandom(300 << 10))
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        subprocess.run(["mmd", "-i", p2, "::/EFI"], check=True, env=env)
        subprocess.run(["mcopy", "-i", p2, str(efi), "::/EFI/BOOTX64.EFI"], check=True, env=env)


def test_partitioned_disk_round_trip(farm: Farm, tmp_path: Path) -> None:
    farm.start_api()
    farm.start_worker()
    src = farm.root / "disks" / "p1.img"
    make_partitioned_disk(src, tmp_path)
    farm.cli("node", "add", "p1", "--disk", str(src))
    dst = farm.add_node("p2", size_mib=96)

    farm.cli("capture", "p1", "--image", "parted", "--wait")
    manifest = json.loads((farm.root / "data" / "images" / "parted" / "manifest.json").read_text())
    assert manifest["disk"]["partition_table"]["type"] == "dos"
    fs = [(p["index"], p["filesystem"], p["tool"]) for p in manifest["partitions"]]
    assert fs == [(1, "ext4", "extfs"), (2, "vfat", "fat")]
    farm.cli("image", "verify", "parted")

    farm.cli("restore", "p2", "--image", "parted", "--wait")
    assert filecmp.cmp(src, dst, shallow=False), "restored disk differs from the source"
    loops = run("losetup", "-a").stdout  # the agent detached its loops (other tests' may be there)
    assert str(src) not in loops and str(dst) not in loops
