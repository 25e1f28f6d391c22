"""The partclone 0002 writer against partclone itself: the same bytes.

partclone saves a small file system made here in a regular file (no loop
device, no root). Its stream's own bitmap and block data, written again
through PartcloneWriter, must give exactly the bytes partclone wrote: the
header with every field and its CRC, the bitmap and its CRC, a checksum after
every 1 MiB of blocks (reseeded) and after the last partial group
(docs/formats.md B1-B3). So a converted image is what partclone would have
written for the same blocks.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from imgfarm.imageformats import partclone as pc

TOOLS = ("partclone.extfs", "partclone.fat16", "mkfs.ext2", "mkfs.ext4", "mkfs.vfat", "mcopy")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason="needs partclone, e2fsprogs, dosfstools and mtools")


def _content(d: Path) -> Path:
    d.mkdir()
    (d / "random.bin").write_bytes(random.Random(11).randbytes(1_500_000))
    (d / "numbers.txt").write_text("".join(f"{i}\n" for i in range(20_000)))
    return d


def _make(kind: str, tmp: Path) -> tuple[Path, str]:
    img = tmp / f"{kind}.img"
    content = _content(tmp / "content")
    if kind == "fat16":
        subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
        subprocess.run(["mkfs.vfat", "-F", "16", str(img)], check=True, capture_output=True)
        for f in content.iterdir():
            subprocess.run(["mcopy", "-i", str(img), str(f), f"::/{f.name}"], check=True)
        return img, "partclone.fat16"
    mkfs, block, size = {"ext2-1k": ("mkfs.ext2", "1024", "8M"), "ext4-4k": ("mkfs.ext4", "4096", "16M")}[kind]
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run([mkfs, "-q", "-F", "-b", block, "-d", str(content), str(img)], check=True)
    return img, "partclone.extfs"


@pytest.mark.parametrize("kind", ["ext2-1k", "ext4-4k", "fat16"])
def test_writer_gives_the_bytes_partclone_writes(kind: str, tmp_path: Path) -> None:
    img, tool = _make(kind, tmp_path)
    out = tmp_path / "tool.pc"
    subprocess.run([tool, "-c", "-s", str(img), "-o", str(out), "-L", str(tmp_path / "pc.log")],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    theirs = out.read_bytes()

    h = pc.PartcloneHeader.unpack(theirs[: pc.HEADER_SIZE])
    assert (h.checksum_mode, h.checksum_size, h.reseed, h.bitmap_mode) == (pc.CHECKSUM_CRC32, 4, True,
                                                                          pc.BITMAP_BIT)
    assert h.blocks_per_checksum == pc.DEFAULT_BUFFER // h.block_size
    bitmap = theirs[pc.HEADER_SIZE : pc.HEADER_SIZE + (h.total_blocks + 7) // 8]
    data = b"".join(bytes(piece) for _h, _bm, piece in pc.iter_data(io.BytesIO(theirs)))
    assert len(data) == h.used_blocks * h.block_size > pc.DEFAULT_BUFFER  # more than one group

    ours = io.BytesIO()
    writer = pc.PartcloneWriter(ours, fs_type=h.fs_type, device_size=h.device_size,
                                total_blocks=h.total_blocks, block_size=h.block_size, bitmap=bitmap,
                                partclone_version=h.partclone_version)
    writer.write(data)
    writer.close()
    assert ours.getvalue() == theirs
