"""partclone image format 0001 (partclone before 0.3) rewritten as 0002 (root).

Stock partclone 0.3 writes only 0002 but still restores 0001, so the test writes a
0001 image itself from what partclone.ext2 saved (header_v1, one byte per block,
``BiTmAgIc``, a crc32_0001 after every block, computed here byte by byte the way the
old C routine did) and first proves that stock ``partclone.restore`` accepts it and
restores the source file system.  Then the converter's 0002 rewrite, in zstd, must
restore with stock ``zstd -dc | partclone.restore`` to the same bytes, and a damaged
0001 block must be refused.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from pi_helpers import PARTIMAGE_TESTS, MiB, partclone_restore_sha, sha256_file, zero_file

from imgfarm.errors import ImageError
from imgfarm.imageformats import clonezilla, partclone
from tests.support import loop_device, run

pytestmark = PARTIMAGE_TESTS

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0xEDB88320 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32_0001(crc: int, block: bytes) -> int:
    """partclone's old crc32: the pointer never moves, so the first byte is hashed size times."""
    b = block[0]
    for _ in range(len(block)):
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc


def write_v1(v2: Path, out: Path) -> None:
    """The 0001 image of the same blocks as the 0002 image `v2`."""
    with open(v2, "rb") as fh:
        pieces = list(partclone.iter_data(fh, "v2"))
    h, bitmap = pieces[0][0], pieces[0][1]
    data = b"".join(bytes(p) for _h, _b, p in pieces)
    bs = h.block_size
    head = struct.pack("<15s15s4s2xiQQQ", b"partclone-image", h.fs_type.encode(), b"0001", bs,
                       h.device_size, h.total_blocks, h.used_blocks) + bytes(4096)
    assert len(head) == 4160
    used = [(bitmap[i >> 3] >> (i & 7)) & 1 for i in range(h.total_blocks)]
    body = bytearray(head + bytes(used) + b"BiTmAgIc")
    crc = 0xFFFFFFFF
    for k in range(len(data) // bs):
        block = data[k * bs : (k + 1) * bs]
        crc = crc32_0001(crc, block)
        body += block + struct.pack("<I", crc)
    out.write_bytes(bytes(body))


@pytest.fixture(scope="module")
def v1_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pcv1")
    src = zero_file(d / "fs.img", 8 * MiB)
    files = d / "files"
    files.mkdir()
    (files / "text.txt").write_text("partclone 0001\n" * 30000)
    (files / "bytes.bin").write_bytes(bytes(range(256)) * 4096)
    run("mkfs.ext2", "-q", "-F", "-b", "1024", "-d", files, src)
    v2 = d / "v2.img"
    with loop_device(src) as dev:
        subprocess.run(["partclone.ext2", "-c", "-s", dev, "-o", str(v2), "-L", "/dev/null"],
                       check=True, capture_output=True)
    v1 = d / "sda1.ext2-ptcl-img.gz"
    raw = d / "v1.img"
    write_v1(v2, raw)
    v1.write_bytes(gzip.compress(raw.read_bytes(), 1))
    return src, v1


def _part(path: Path) -> clonezilla.CzPart:
    return clonezilla.CzPart(dev="sda1", number=1, start_bytes=0, size_bytes=8 * MiB, type="83",
                             mode="partclone", files=[path], fs="ext2", compression="gz")


def test_stock_partclone_reads_the_test_0001(v1_image: tuple[Path, Path], tmp_path: Path) -> None:
    src, v1 = v1_image
    target = zero_file(tmp_path / "t.img", 8 * MiB)
    p = subprocess.run(f"gzip -dc '{v1}' | partclone.restore -s - -O '{target}' -L /dev/null",
                       shell=True, capture_output=True)
    assert p.returncode == 0, p.stderr[-1000:]
    assert sha256_file(target) == sha256_file(src)


def test_0001_rewritten_as_0002(v1_image: tuple[Path, Path], tmp_path: Path) -> None:
    src, v1 = v1_image
    out = tmp_path / "part1.ptcl.zst"
    p, origin = clonezilla._partclone_part(_part(v1), out, 1, None)
    assert origin["image_format"] == "0001, rewritten as 0002"
    assert p.partclone_fs == "EXTFS" and p.block_size == 1024
    assert partclone_restore_sha(out, 8 * MiB, tmp_path) == sha256_file(src)
    head = subprocess.run(f"zstd -dc '{out}' | head -c 34", shell=True, capture_output=True).stdout
    assert head[30:34] == b"0002"


def test_0001_damage_is_refused(v1_image: tuple[Path, Path], tmp_path: Path) -> None:
    """crc32_0001 covers only each block's first byte (the old bug), so that is where a
    changed byte is caught by the 0001 checksum; any other byte is covered by the outer
    compression's own CRC, caught when a byte of the compressed file changes."""
    _src, v1 = v1_image
    raw = bytearray(gzip.decompress(v1.read_bytes()))
    raw[-4 - 1024] ^= 0x01  # the first byte of the last block
    bad = tmp_path / "sda1.ext2-ptcl-img.gz"
    bad.write_bytes(gzip.compress(bytes(raw), 1))
    out = tmp_path / "part1.ptcl.zst"
    with pytest.raises(ImageError, match="partclone 0001 checksum mismatch"):
        clonezilla._partclone_part(_part(bad), out, 1, None)
    orig = v1.read_bytes()
    comp = bytearray(orig)
    for pos in range(len(comp) // 2, len(comp)):  # a flip that changes what gzip decodes
        comp[pos] ^= 0x01  # (one in an unused Huffman code length can leave it the same)
        try:
            same = gzip.decompress(bytes(comp)) == gzip.decompress(orig)
        except (OSError, EOFError, zlib.error):
            same = False
        if not same:
            break
        comp[pos] ^= 0x01
    bad.write_bytes(bytes(comp))
    with pytest.raises(ImageError, match="corrupt gzip data|checksum mismatch"):
        clonezilla._partclone_part(_part(bad), out, 1, None)
