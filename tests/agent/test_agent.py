"""The node agent's own logic: orders from the kernel command line, disk discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgfarm.agent.disks import DiskError, find_disk, partclone_for
from imgfarm.protocol import Orders, ProtocolError


def test_orders_from_kernel_cmdline() -> None:
    o = Orders.from_cmdline("BOOT_IMAGE=x quiet imgfarm.api=http://10.0.0.1:8470/ imgfarm.job=42 "
                      "imgfarm.token=abc imgfarm.disk=/dev/nvme0n1 console=ttyS0")
    assert (o.api_url, o.job_id, o.token, o.disk) == ("http://10.0.0.1:8470", 42, "abc", "/dev/nvme0n1")


@pytest.mark.parametrize("line,missing", [("quiet", "imgfarm.api="), ("imgfarm.api=x", "imgfarm.job=")])
def test_orders_name_what_is_missing(line: str, missing: str) -> None:
    with pytest.raises(ProtocolError, match=missing):
        Orders.from_cmdline(line)


def _block(root: Path, name: str, size: int = 1000, removable: int = 0) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "size").write_text(str(size))
    (d / "removable").write_text(str(removable))


def test_finds_disks_beyond_sda(tmp_path: Path) -> None:
    _block(tmp_path, "loop0")
    _block(tmp_path, "sr0", removable=1)
    _block(tmp_path, "nvme0n1")
    assert find_disk(sys_block=tmp_path) == "/dev/nvme0n1"
    _block(tmp_path, "vda")
    assert find_disk(sys_block=tmp_path) == "/dev/vda"  # virtio before nvme, sd/hd before both
    _block(tmp_path, "sda", removable=1)  # a USB stick is not the target
    assert find_disk(sys_block=tmp_path) == "/dev/vda"


def test_no_disk_is_a_clear_error(tmp_path: Path) -> None:
    _block(tmp_path, "mmcblk0", size=0)
    with pytest.raises(DiskError, match="imgfarm.disk="):
        find_disk(sys_block=tmp_path)
    with pytest.raises(DiskError, match="/dev/nope does not exist"):
        find_disk("/dev/nope")


def test_partclone_tool_per_filesystem() -> None:
    assert partclone_for("ext4") == ("extfs", "EXTFS")
    assert partclone_for("vfat")[0] == "fat"
    assert partclone_for("")[0] == "dd"
