"""Reading a Clonezilla disk directory: what is found where, and every refusal by name.

Only the directory's text files and file names matter here (no image data is read),
so this runs without root; the conversion and restore of a real directory is in
tests/test_clonezilla_dir.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgfarm.errors import ImageError
from imgfarm.imageformats import clonezilla as cz

SFDISK = """label: dos
label-id: 0x1badcafe
device: /dev/sda
unit: sectors
sector-size: 512

/dev/sda1 : start=        2048, size=       40960, type=83, bootable
/dev/sda2 : start=       43008, size=      153600, type=c
"""


@pytest.fixture
def d(tmp_path: Path) -> Path:
    img = tmp_path / "2026-img"
    img.mkdir()
    (img / "disk").write_text("sda\n")
    (img / "parts").write_text("sda1 sda2\n")
    (img / "sda-pt.sf").write_text(SFDISK)
    (img / "sda-mbr").write_bytes(b"\xeb" + bytes(511))
    (img / "sda-hidden-data-after-mbr").write_bytes(b"G" * 2047 * 512)
    (img / "Info-packages.txt").write_text("whatever\n")
    for s in ("aa", "ab"):
        (img / f"sda1.{s}").write_bytes(b"\x1f\x8b" + bytes(98))
    (img / "sda2.vfat-ptcl-img.gz.aa").write_bytes(b"\x1f\x8b" + bytes(98))
    return img


def test_reads_the_layout(d: Path) -> None:
    assert cz.is_clonezilla_dir(d)
    r = cz.read_dir(d)
    assert r.disk == "sda" and r.table_type == "dos" and r.sector_size == 512
    assert len(r.head) == 2048 * 512 and r.head[:1] == b"\xeb"
    assert [(p.dev, p.number, p.mode, p.start_bytes, p.size_bytes, p.type) for p in r.parts] == [
        ("sda1", 1, "partimage", 2048 * 512, 40960 * 512, "83"),
        ("sda2", 2, "partclone", 43008 * 512, 153600 * 512, "c")]
    assert [f.name for f in r.parts[0].files] == ["sda1.aa", "sda1.ab"]
    assert r.parts[1].fs == "vfat" and r.parts[1].compression == "gz"
    assert r.size_bytes == (43008 + 153600) * 512


def _refused(d: Path, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        cz.read_dir(d)


def test_partition_without_image(d: Path) -> None:
    (d / "sda2.vfat-ptcl-img.gz.aa").unlink()
    _refused(d, r"2026-img/parts names sda2, but the directory has no image of it")


def test_ntfsclone_and_dd_are_named(d: Path) -> None:
    (d / "sda2.vfat-ptcl-img.gz.aa").rename(d / "sda2.ntfs-img.gz.aa")
    _refused(d, r"partition sda2 was saved by ntfsclone \(sda2\.ntfs-img\.gz\.aa\)")
    (d / "sda2.ntfs-img.gz.aa").rename(d / "sda2.dd-img.aa")
    _refused(d, r"partition sda2 was saved by dd \(sda2\.dd-img\.aa\)")
    (d / "sda2.dd-img.aa").rename(d / "sda2.dd-ptcl-img.gz.aa")
    _refused(d, r"partition sda2 was saved by partclone\.dd")


def test_split_gap_in_a_partclone_set(d: Path) -> None:
    (d / "sda2.vfat-ptcl-img.gz.ac").write_bytes(b"x" * 100)
    _refused(d, r"sda2\.vfat-ptcl-img\.gz\.ab is missing")


def test_table_and_disk_files(d: Path) -> None:
    (d / "parts").write_text("sda1 sda3\n")
    _refused(d, r"parts names sda3, which sda-pt\.sf does not list")
    (d / "parts").write_text("sda1 ../etc\n")
    _refused(d, r"'\.\./etc' is not a device name")
    (d / "parts").write_text("sda1 sda2\n")
    (d / "disk").write_text("sda sdb\n")
    _refused(d, r"saved 2 disks \(sda sdb\): a farm image is one disk")
    (d / "disk").unlink()
    _refused(d, r"has no disk file \(Clonezilla's saveparts\)")
    (d / "disk").write_text("sda\n")
    (d / "sda-mbr").write_bytes(bytes(100))
    _refused(d, r"sda-mbr is 100 bytes, not the 512 of a boot sector")
    (d / "sda-mbr").write_bytes(bytes(512))
    (d / "sda-hidden-data-after-mbr").write_bytes(bytes(2048 * 512))
    _refused(d, r"does not fit before the first partition")
    (d / "sda-hidden-data-after-mbr").unlink()
    (d / "sda-pt.sf").write_text(SFDISK.replace("label: dos", "label: sun"))
    _refused(d, r"partition table type 'sun' is not supported")
    (d / "sda-pt.sf").unlink()
    _refused(d, r"2026-img/sda-pt\.sf is missing")


def test_gpt_dump_from_sfdisk(d: Path, tmp_path: Path) -> None:
    """A gpt table as sfdisk itself dumps it: the disk reaches past last-lba by the backup GPT."""
    import subprocess

    disk = tmp_path / "g.img"
    with open(disk, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, capture_output=True, text=True,
                   input="label: gpt\nstart=2048, size=20480, type=L\nstart=22528, type=U\n")
    dump = subprocess.run(["sfdisk", "-d", str(disk)], check=True, capture_output=True,
                          text=True).stdout.replace(str(disk), "/dev/sda")
    (d / "sda-pt.sf").write_text(dump)
    (d / "sda-hidden-data-after-mbr").unlink()
    r = cz.read_dir(d)
    assert r.table_type == "gpt" and [p.start_bytes for p in r.parts] == [2048 * 512, 22528 * 512]
    assert r.size_bytes == 64 << 20 and len(r.head) == 512
