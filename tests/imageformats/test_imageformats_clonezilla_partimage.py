"""Legacy archives the way Clonezilla wrote them: partimage -z0 to stdout, compressed from
outside, whole or cut by split (real partimage, gzip, pigz, bzip2, pbzip2, lzop, xz, zstd
and split, on loop devices; root).

Every converted image is restored with stock ``zstd -dc | partclone.restore`` and must
give exactly the bytes ``partimage restore`` gives from the original (fed through stdin
after the outer layer is removed, as Clonezilla restores it).  Damaged sets are refused
with an error naming the piece, and leave nothing behind.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
from pi_helpers import (
    PARTIMAGE_TESTS,
    ClonezillaSave,
    make_clonezilla,
    partclone_restore_sha,
)

from imgfarm.errors import ImageError
from imgfarm.imageformats import convert_legacy, inspect, verify_image
from imgfarm.imageformats import partimage as pi

pytestmark = PARTIMAGE_TESTS


@pytest.fixture(scope="module")
def ext3_gzip_split(work: Path) -> ClonezillaSave:
    """Case 1: ext3, the recipe with gzip, split into several pieces (1 MB each)."""
    return make_clonezilla(work, "e3gz", fs="ext3", size_mib=24, random_mib=3, comp="gzip",
                           split_bytes=1_000_000)


@pytest.fixture(scope="module")
def fat32_lzop(work: Path) -> ClonezillaSave:
    """Case 2: FAT32 filled with mtools, lzop, written whole."""
    return make_clonezilla(work, "f32lzo", fs="fat32", size_mib=64, comp="lzop",
                           split_bytes=None)


@pytest.fixture(scope="module")
def ext2_bzip2_split(work: Path) -> ClonezillaSave:
    """Case 3: ext2 with bzip2, split (three-letter suffixes: .aaa, .aab, ...)."""
    return make_clonezilla(work, "e2bz", fs="ext2", size_mib=16, random_mib=2, comp="bzip2",
                           split_bytes=700_000, suffix_len=3)


def _convert_and_compare(save: ClonezillaSave, given: Path, dest: Path, work: Path) -> dict:
    m = convert_legacy(given, dest, name="cz").to_json()
    part = m["partitions"][0]
    assert part["size_bytes"] == save.size == m["disk"]["size_bytes"]
    assert partclone_restore_sha(dest / "cz" / part["file"], save.size, work) \
        == save.reference_sha
    verify_image(dest / "cz")
    return m


def test_ext3_gzip_split(ext3_gzip_split: ClonezillaSave, dest: Path, work: Path) -> None:
    files = ext3_gzip_split.files
    assert len(files) >= 3 and files[0].name == "sda1.aa"
    # any piece, or the base name, opens the set
    assert pi.volume_paths(files[1])[0] == files[0]
    assert pi.volume_paths(files[0].with_name("sda1"))[0] == files[0]
    info = inspect(files[2])
    assert info.filesystem == "ext3fs" and len(info.volumes) == 1
    assert info.volumes[0].compression == "gzip"
    assert info.volumes[0].pieces == [f.name for f in files]
    m = _convert_and_compare(ext3_gzip_split, files[1], dest, work)
    assert m["origin"]["legacy"]["volumes"][0]["pieces"] == [f.name for f in files]


def test_fat32_lzop_whole(fat32_lzop: ClonezillaSave, dest: Path, work: Path) -> None:
    (f,) = fat32_lzop.files
    info = inspect(f)
    assert info.filesystem == "fat32" and info.volumes[0].compression == "lzo"
    m = _convert_and_compare(fat32_lzop, f, dest, work)
    assert m["partitions"][0]["partclone_fs"] == "FAT32"


def test_ext2_bzip2_split(ext2_bzip2_split: ClonezillaSave, dest: Path, work: Path) -> None:
    files = ext2_bzip2_split.files
    assert len(files) >= 2 and files[0].name == "sda1.aaa"
    assert inspect(files[0]).volumes[0].compression == "bzip2"
    _convert_and_compare(ext2_bzip2_split, files[0], dest, work)


@pytest.mark.parametrize("comp", ["pigz", "pbzip2", "xz", "zstd", "none"])
def test_other_compressors(comp: str, work: Path, tmp_path: Path) -> None:
    """pigz and pbzip2 (parallel, the same formats), xz, zstd and no compression at all."""
    save = make_clonezilla(work, f"e2-{comp}", fs="ext2", size_mib=8, random_mib=1, comp=comp,
                           split_bytes=400_000)
    assert inspect(save.files[0]).volumes[0].compression == {
        "pigz": "gzip", "pbzip2": "bzip2"}.get(comp, comp)
    dest = tmp_path / "store"
    dest.mkdir()
    _convert_and_compare(save, save.files[-1], dest, tmp_path)


def test_gzip_members(ext3_gzip_split: ClonezillaSave, dest: Path, work: Path,
                      tmp_path: Path) -> None:
    """Several gzip members in one file (as pigz -i and appending writers make) are one stream."""
    raw = gzip.decompress(b"".join(f.read_bytes() for f in ext3_gzip_split.files))
    cut = len(raw) // 3
    multi = tmp_path / "sda1"
    multi.write_bytes(gzip.compress(raw[:cut], 1) + gzip.compress(raw[cut:], 1))
    _convert_and_compare(ext3_gzip_split, multi, dest, work)


# ------------------------------------------------------------------------------ refusals
def _copy_set(save: ClonezillaSave, to: Path) -> list[Path]:
    to.mkdir()
    for f in save.files:
        shutil.copyfile(f, to / f.name)
    return [to / f.name for f in save.files]


def _refuse(src: Path, dest: Path, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as ei:
        convert_legacy(src, dest)
    assert list(dest.iterdir()) == [], "a failed conversion must leave nothing behind"
    return ei.value


def test_refuses_missing_middle_piece(ext3_gzip_split: ClonezillaSave, dest: Path,
                                      tmp_path: Path) -> None:
    files = _copy_set(ext3_gzip_split, tmp_path / "set")
    files[1].unlink()
    err = _refuse(files[0], dest, r"sda1\.ab is missing")
    assert "truncated" not in err.message
    with pytest.raises(ImageError, match=r"sda1\.ab is missing"):
        inspect(files[0])


def test_refuses_piece_cut_short(ext3_gzip_split: ClonezillaSave, dest: Path,
                                 tmp_path: Path) -> None:
    files = _copy_set(ext3_gzip_split, tmp_path / "set")
    with open(files[1], "r+b") as fh:
        fh.truncate(files[1].stat().st_size - 5000)
    _refuse(files[0], dest, r"sda1\.ab is \d+ bytes, but sda1\.aa is \d+: .* cut short")
    # the last piece cut short: the gzip stream ends early, and the last piece is named
    files = _copy_set(ext3_gzip_split, tmp_path / "set2")
    with open(files[-1], "r+b") as fh:
        fh.truncate(files[-1].stat().st_size // 2)
    err = _refuse(files[0], dest, rf"{files[-1].name}: gzip stream is truncated")
    assert "cut short, or pieces after it are missing" in (err.hint or "")
    # the last piece missing altogether: the same, naming the last piece present
    files = _copy_set(ext3_gzip_split, tmp_path / "set3")
    files[-1].unlink()
    _refuse(files[0], dest, rf"{files[-2].name}: gzip stream is truncated")


def test_refuses_lzop_cut_short(fat32_lzop: ClonezillaSave, dest: Path, tmp_path: Path) -> None:
    cut = tmp_path / "sda1"
    cut.write_bytes(fat32_lzop.files[0].read_bytes()[:-3000])
    _refuse(cut, dest, r"sda1: lzo stream is truncated")


@pytest.mark.parametrize("which", ["gzip", "lzop", "bzip2"])
def test_refuses_flipped_byte(which: str, ext3_gzip_split: ClonezillaSave,
                              fat32_lzop: ClonezillaSave, ext2_bzip2_split: ClonezillaSave,
                              dest: Path, tmp_path: Path) -> None:
    save = {"gzip": ext3_gzip_split, "lzop": fat32_lzop, "bzip2": ext2_bzip2_split}[which]
    files = _copy_set(save, tmp_path / "set")
    victim = files[len(files) // 2]
    orig = victim.read_bytes()
    undo = {"gzip": "gzip -dc", "lzop": "lzop -dc", "bzip2": "bzip2 -dc"}[which]

    def decoded(data: bytes) -> bytes | None:
        victim.write_bytes(data)
        p = subprocess.run(f"cat {' '.join(map(str, files))} | {undo}", shell=True,
                           capture_output=True)
        return p.stdout if p.returncode == 0 else None

    good = decoded(orig)
    raw = bytearray(orig)
    for pos in range(len(raw) // 2, len(raw)):  # a flip that changes what the tool decodes
        raw[pos] ^= 0x04  # (one in an unused Huffman code length can leave it the same)
        if decoded(bytes(raw)) != good:
            break
        raw[pos] ^= 0x04
    victim.write_bytes(bytes(raw))
    kind = {"lzop": "lzo"}.get(which, which)
    _refuse(files[0], dest, rf"corrupt {kind} data|CHK CRC mismatch|checksum mismatch")
