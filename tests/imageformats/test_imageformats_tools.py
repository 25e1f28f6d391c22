"""Conversion against the real tools, on loop devices (root).

For every legacy image made here by real partimage 0.6.9, restoring the
converted image with stock tools (``zstd -dc | partclone.restore -O``) onto a
zero-filled target must give exactly the bytes ``partimage restore`` of the
original gives onto a zero-filled device.  Damaged images must be refused
with a clear ImageError and leave nothing in the store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pi_helpers import (
    PARTIMAGE_TESTS,
    Legacy,
    make_ext,
    make_fat32,
    partclone_restore_sha,
)

from imgfarm.errors import ImageError
from imgfarm.imageformats import convert_legacy, inspect, verify_image
from imgfarm.imageformats import partimage as pi

pytestmark = PARTIMAGE_TESTS


@pytest.fixture(scope="module")
def ext3_gzip(work: Path) -> Legacy:
    return make_ext(work, "e3gz", fs="ext3", size_mib=32, random_mib=3, z=1)[0]


@pytest.fixture(scope="module")
def ext2_bzip2_split(work: Path) -> list[Legacy]:
    """Saved twice (two identifiers), bzip2, 1 MiB volumes -> at least 3 volumes each."""
    return make_ext(work, "e2bz", fs="ext2", size_mib=16, random_mib=4, z=2, volume_mib=1,
                    saves=2)


@pytest.fixture(scope="module")
def fat32_gzip(work: Path) -> Legacy:
    return make_fat32(work, "f32")


@pytest.fixture(scope="module")
def ext3_raw(work: Path) -> Legacy:
    return make_ext(work, "e3raw", fs="ext3", size_mib=16, random_mib=2, z=0)[0]


def _convert_and_compare(legacy: Legacy, dest: Path, work: Path) -> dict:
    m = convert_legacy(legacy.image, dest).to_json()
    part = m["partitions"][0]
    assert part["size_bytes"] == legacy.size == m["disk"]["size_bytes"]
    zst = dest / m["name"] / part["file"]
    assert partclone_restore_sha(zst, legacy.size, work) == legacy.reference_sha
    verify_image(dest / m["name"])
    return m


def test_ext3_gzip(ext3_gzip: Legacy, dest: Path, work: Path) -> None:
    m = _convert_and_compare(ext3_gzip, dest, work)
    assert m["partitions"][0]["filesystem"] == "ext3"
    assert m["origin"]["legacy"]["compression"] == "gzip"


def test_ext2_bzip2_split(ext2_bzip2_split: list[Legacy], dest: Path, work: Path) -> None:
    legacy = ext2_bzip2_split[0]
    vols = inspect(legacy.image).volumes
    assert len(vols) >= 3 and all(v.compression == "bzip2" for v in vols)
    m = _convert_and_compare(legacy, dest, work)
    assert len(m["origin"]["legacy"]["volumes"]) == len(vols)
    assert verify_image(legacy.image).legacy.last_volume == len(vols) - 1  # type: ignore[union-attr]


def test_fat32_gzip(fat32_gzip: Legacy, dest: Path, work: Path) -> None:
    info = inspect(fat32_gzip.image)
    assert info.filesystem == "fat32" and info.block_size == 512
    assert info.block_count == info.partition_size // 512 - 1  # partimage's FAT quirk
    m = _convert_and_compare(fat32_gzip, dest, work)
    assert m["partitions"][0]["partclone_fs"] == "FAT32"


def test_uncompressed(ext3_raw: Legacy, dest: Path, work: Path) -> None:
    assert inspect(ext3_raw.image).volumes[0].compression == "none"
    _convert_and_compare(ext3_raw, dest, work)


def test_partclone_W_restore(ext3_gzip: Legacy, dest: Path, work: Path, tmp_path: Path) -> None:
    """docs/formats.md B4: -W makes a full-size sparse file identical to the partition."""
    import subprocess

    from pi_helpers import sha256_file

    m = convert_legacy(ext3_gzip.image, dest, name="w").to_json()
    out = tmp_path / "w.img"
    subprocess.run(f"zstd -dc '{dest / 'w' / 'part0.ptcl.zst'}' | partclone.restore -s - -W "
                   f"-O '{out}'", shell=True, check=True, capture_output=True)
    assert out.stat().st_size == m["disk"]["size_bytes"]
    assert sha256_file(out) == ext3_gzip.reference_sha


def test_reader_matches_partimage_everywhere(ext2_bzip2_split: list[Legacy],
                                             fat32_gzip: Legacy, tmp_path: Path) -> None:
    from pi_helpers import sha256_file, zero_file

    for legacy in (ext2_bzip2_split[0], fat32_gzip):
        target = zero_file(tmp_path / "r.img", legacy.size)
        pi.restore_to_file(legacy.image, target)
        assert sha256_file(target) == legacy.reference_sha


# ------------------------------------------------------------------------------ refusals
def _refuse(src: Path, dest: Path, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as ei:
        convert_legacy(src, dest)
    assert list(dest.iterdir()) == [], "a failed conversion must leave nothing behind"
    return ei.value


def _copy_volumes(legacy: Legacy, to: Path) -> Path:
    to.mkdir()
    for p in legacy.image.parent.iterdir():
        shutil.copy(p, to / p.name)
    return to / legacy.image.name


def test_refuses_flipped_byte_in_gzip(ext3_gzip: Legacy, dest: Path, tmp_path: Path) -> None:
    img = _copy_volumes(ext3_gzip, tmp_path / "flip")
    raw = bytearray(img.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    img.write_bytes(raw)
    _refuse(img, dest, rf"{img.name}: (corrupt gzip data|CHK CRC mismatch)")


def test_refuses_missing_middle_volume(ext2_bzip2_split: list[Legacy], dest: Path,
                                       tmp_path: Path) -> None:
    img = _copy_volumes(ext2_bzip2_split[0], tmp_path / "missing")
    (img.parent / "e2bz.001").unlink()
    err = _refuse(img, dest, r"e2bz\.001 is missing \(volume 1 of image e2bz\)")
    assert err.hint


def test_refuses_volume_of_another_image(ext2_bzip2_split: list[Legacy], dest: Path,
                                         tmp_path: Path) -> None:
    a, b = ext2_bzip2_split
    assert inspect(a.image).identifier != inspect(b.image).identifier
    img = _copy_volumes(a, tmp_path / "mixed")
    shutil.copy(b.image.parent / "e2bz.001", img.parent / "e2bz.001")
    _refuse(img, dest, r"e2bz\.001: volume belongs to another image \(identifier 0x[0-9a-f]+, "
                       r"expected 0x[0-9a-f]+\)")


def test_refuses_chk_crc_mismatch(ext3_raw: Legacy, dest: Path, tmp_path: Path) -> None:
    img = _copy_volumes(ext3_raw, tmp_path / "chk")
    info = inspect(img)
    data_start = (512 + 16388 + 21 + 220 + 23 + 16388 + 18 + info.bitmap_size + 16 + 16388
                  + 22)
    raw = bytearray(img.read_bytes())
    assert raw[data_start - 22 : data_start] == b"MAGIC-BEGIN-DATABLOCKS"
    pos = data_start + 5 * (65536 + 16) + 12345  # block data of CHK group 5
    raw[pos] ^= 0xFF
    img.write_bytes(raw)
    _refuse(img, dest, rf"{img.name}: CHK CRC mismatch at block \d+ \(record 5")


def test_refuses_non_partimage(tmp_path: Path, dest: Path) -> None:
    junk = tmp_path / "x.bin"
    junk.write_bytes(b"\x1f\x8b" + bytes(5000))  # looks like gzip by its magic only
    _refuse(junk, dest, r"x\.bin")
    (tmp_path / "y.bin").write_bytes(b"hello world" * 1000)
    _refuse(tmp_path / "y.bin", dest, r"y\.bin is not a partimage image")


def test_refuses_swapped_volumes(ext2_bzip2_split: list[Legacy], dest: Path,
                                 tmp_path: Path) -> None:
    img = _copy_volumes(ext2_bzip2_split[0], tmp_path / "swapped")
    v1, v2 = img.parent / "e2bz.001", img.parent / "e2bz.002"
    v1.rename(tmp_path / "tmpvol")
    v2.rename(v1)
    (tmp_path / "tmpvol").rename(v2)
    _refuse(img, dest, r"e2bz\.001: wrong volume number 2 \(expected 1\)")


def test_full_destination_leaves_nothing(tmp_path: Path) -> None:
    """ENOSPC half-way through: a clear ImageError, and no partial image on the full disk."""
    import subprocess

    from pi_helpers import DATA

    full = tmp_path / "small"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(full)], check=True)
    try:
        with pytest.raises(ImageError, match="No space left on device"):
            convert_legacy(DATA / "sample-ext2.000", full)  # ~350 KiB of output
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
