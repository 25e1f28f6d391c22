"""Helpers for the image-format tests: real partimage/partclone runs on loop devices.

Every image is made by the real partimage 0.6.9 from a real filesystem on a
loop device; the reference for "correct" is always what the real tools give
(``partimage restore`` onto a zero-filled device), never our own reader.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from imgfarm import protocol

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import loop_backing, loop_device, mounted, run  # noqa: E402

DATA = ROOT / "tests" / "data" / "legacy"
IS_ROOT = os.geteuid() == 0
HAVE_TOOLS = all(shutil.which(t) for t in ("partimage", "partclone.restore", "zstd", "mcopy",
                                           "mkfs.vfat", "mkfs.ext3", "losetup"))
needs_root = pytest.mark.skipif(not (IS_ROOT and HAVE_TOOLS),
                                reason="needs root, loop devices, partimage, partclone, mtools")
ENV = {**os.environ, "TERM": os.environ.get("TERM") or "xterm"}
MiB = 1 << 20
# Modules that run partimage (and mount loop devices): root, and one worker for all of them,
# so that one partimage runs at a time and each module's module-scoped images are made once.
# It is the VM tests' worker (xdist group "vm"), after them. (The saves that failed in full
# runs, once put down to a QEMU machine booting beside them, were the mount copies that
# tests.support.mounted describes.)
PARTIMAGE_GROUP = pytest.mark.xdist_group("vm")
PARTIMAGE_TESTS = [needs_root, pytest.mark.root, PARTIMAGE_GROUP]


def sha256_file(path: Path) -> str:
    return protocol.sha256_file(path).sha256


def zero_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def partimage_save(dev: str, out: Path, *, z: int, volume_mib: int | None = None) -> None:
    """``partimage save`` in batch mode (no MBR backup: a loop device has no disk)."""
    args = ["partimage", "-b", f"-z{z}", "-o", "-d", "-f3", "-M"]
    if volume_mib:
        args.append(f"-V{volume_mib}")
    args += ["save", dev, str(out)]
    _save_once_more_if_it_fails(args, dev, out, "partimage save")


def _save_once_more_if_it_fails(args: list[str], dev: str, out: Path, what: str) -> None:
    """Run a partimage save; on a failure record why, and run it once more.

    A failure is not expected: the one seen in full parallel runs (partimage's "Can't read
    bitmap block 0", the superblock's counts still those of mkfs) is what tests.support.mounted
    now prevents. Should another appear, the first try's partimage log and what the device was
    bound to become a warning in the run's summary; a second failure fails the test.
    """
    p = subprocess.run(args, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if p.returncode == 0:
        return
    first = (f"exit {p.returncode}; {dev} bound to {loop_backing(dev) or 'nothing'}; stderr {p.stderr[-600:]!r}; "
             f"partimage's log: {_partimage_log_tail()}")
    for leftover in out.parent.glob(f"{out.name}*"):
        leftover.unlink()
    p = subprocess.run(args, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert p.returncode == 0, (f"{what} failed twice: {first}; then exit {p.returncode}: "
                               f"{_partimage_log_tail()} {p.stderr[-2000:]!r}")
    warnings.warn(f"{what} of {dev} failed once, then worked: {first}", stacklevel=3)


def _partimage_log_tail() -> str:
    """The lines of partimage's debug log that say what went wrong (another partimage run
    may have rewritten it since)."""
    try:
        lines = Path("/var/log/partimage/partimage-debug.log").read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    keep = [line for line in lines if any(w in line.lower() for w in (
        "error", "fail", "lock", "mount", "exception", "throw", "err_"))]
    return " | ".join((keep or lines)[-12:])[-3000:]


def partimage_restore_sha(image: Path, size: int, work: Path) -> str:
    """sha256 of what ``partimage restore`` writes onto a zero-filled device of `size`."""
    target = zero_file(work / "pi-restore.img", size)
    try:
        with loop_device(target) as dev:
            p = subprocess.run(["partimage", "-b", "-f3", "restore", dev, str(image)], env=ENV,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
            assert p.returncode == 0, f"partimage restore failed: {p.stdout[-2000:]!r}"
        return sha256_file(target)
    finally:
        target.unlink(missing_ok=True)


def partclone_restore_sha(zst: Path, size: int, work: Path) -> str:
    """sha256 of ``zstd -dc zst | partclone.restore -s - -O FILE`` on a zero-filled file."""
    target = zero_file(work / "pc-restore.img", size)
    try:
        p = subprocess.run(f"zstd -dc '{zst}' | partclone.restore -s - -O '{target}'",
                           shell=True, capture_output=True, timeout=300, env=ENV)
        assert p.returncode == 0, f"partclone.restore failed: {p.stderr[-2000:]!r}"
        assert target.stat().st_size == size
        return sha256_file(target)
    finally:
        target.unlink(missing_ok=True)


def _fill_ext(dev: str, mnt: Path, random_mib: int, seed: int) -> None:
    with mounted(dev, mnt):
        (mnt / "hello.txt").write_text("hello from imgfarm\n")
        (mnt / "numbers.txt").write_text("".join(f"{i}\n" for i in range(200000)))
        rnd = hashlib.sha256(str(seed).encode()).digest()
        with open(mnt / "random.bin", "wb") as fh:  # deterministic, incompressible
            for i in range(random_mib * MiB // 32):
                fh.write(hashlib.sha256(rnd + i.to_bytes(8, "little")).digest())
        (mnt / "sub").mkdir()
        (mnt / "sub" / "zeros.bin").write_bytes(bytes(MiB))
        (mnt / "sub" / "text.txt").write_text("imgfarm " * 50000)
        run("sync")


class Legacy:
    """One legacy image made by real partimage, with the reference restore hash."""

    def __init__(self, image: Path, size: int, reference_sha: str) -> None:
        self.image = image
        self.size = size
        self.reference_sha = reference_sha


def make_ext(work: Path, label: str, *, fs: str, size_mib: int, random_mib: int, z: int,
             volume_mib: int | None = None, saves: int = 1) -> list[Legacy]:
    """Make an ext2/3 fs on a loop device, fill it, save it `saves` times."""
    d = work / label
    d.mkdir()
    src = zero_file(d / "fs.img", size_mib * MiB)
    run(f"mkfs.{fs}", "-q", "-F", "-b", "1024", "-L", label, src)
    out = []
    with loop_device(src) as dev:
        _fill_ext(dev, d / "mnt", random_mib, seed=size_mib)
        for i in range(saves):
            img_dir = d / f"save{i}"
            img_dir.mkdir()
            partimage_save(dev, img_dir / label, z=z, volume_mib=volume_mib)
    src.unlink()
    for i in range(saves):
        img_dir = d / f"save{i}"
        first = img_dir / f"{label}.000"
        if not first.exists():
            first = img_dir / label
        out.append(Legacy(first, size_mib * MiB, partimage_restore_sha(first, size_mib * MiB, d)))
    return out


def _save_gzip(src: Path, label: str) -> Legacy:
    """Save the file system in `src` (a file) with partimage -z1 from a loop device, drop
    `src`, and take the reference restore of the image."""
    d = src.parent
    img_dir = d / "save"
    img_dir.mkdir()
    size = src.stat().st_size
    with loop_device(src) as dev:
        partimage_save(dev, img_dir / label, z=1)
    src.unlink()
    first = img_dir / f"{label}.000"
    return Legacy(first, size, partimage_restore_sha(first, size, d))


def make_fat32(work: Path, label: str, *, size_mib: int = 64) -> Legacy:
    """FAT32 filled with mtools (no vfat driver here), saved with gzip."""
    d = work / label
    d.mkdir()
    src = zero_file(d / "fat.img", size_mib * MiB)
    run("mkfs.vfat", "-F", "32", "-n", "IMGFARM", src)
    files = d / "files"
    files.mkdir()
    (files / "readme.txt").write_text("FAT32 sample for imgfarm\n" * 1000)
    with open(files / "random.bin", "wb") as fh:
        seed = b"fat32"
        for i in range(2 * MiB // 32):
            fh.write(hashlib.sha256(seed + i.to_bytes(8, "little")).digest())
    (files / "dir").mkdir()
    (files / "dir" / "nested.txt").write_text("nested\n" * 5000)
    env = {**ENV, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-s", "-i", str(src), str(files / "readme.txt"),
                    str(files / "random.bin"), str(files / "dir"), "::"],
                   check=True, capture_output=True, env=env)
    return _save_gzip(src, label)


def _deterministic(seed: bytes, size: int) -> bytes:
    return b"".join(hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
                    for i in range(size // 32))


# mkfs command line per partimage file system beyond ext2/3 and FAT32 (the minimum size
# each mkfs accepts: XFS 300 MiB, ReiserFS its 32 MiB journal + some)
OTHER_FS = {
    "ntfs": (["mkntfs", "-q", "-F", "-f", "-L", "IMGFARM"], 64),
    "reiserfs": (["mkreiserfs", "-q", "-f", "-l", "imgfarm"], 64),
    # partimage 0.6.9 knows XFS v4 only (no metadata CRCs)
    "xfs": (["mkfs.xfs", "-q", "-f", "-m", "crc=0", "-L", "imgfarm"], 320),
    "fat16": (["mkfs.vfat", "-F", "16", "-n", "IMGFARM"], 64),
}


def make_other_fs(work: Path, fs: str) -> Legacy:
    """A partimage gzip image of `fs` (see OTHER_FS), with files where userspace can add them.

    No kernel driver is needed: NTFS is filled with ntfscp, FAT16 with mcopy;
    ReiserFS and XFS are saved fresh (their journal, bitmaps and inode areas
    are already spread over the partition, which is what the mapping test needs).
    Skips when the mkfs tool is missing or refuses (XFS v4 will be dropped one day).
    """
    cmd, size_mib = OTHER_FS[fs]
    if not shutil.which(cmd[0]):
        pytest.skip(f"{cmd[0]} is not installed")
    d = work / fs
    d.mkdir()
    src = zero_file(d / f"{fs}.img", size_mib * MiB)
    p = subprocess.run([*cmd, str(src)], capture_output=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        pytest.skip(f"{cmd[0]} refused: {p.stderr.decode(errors='replace')[-300:]}")
    files = d / "files"
    files.mkdir()
    (files / "random.bin").write_bytes(_deterministic(fs.encode(), 3 * MiB))
    (files / "numbers.txt").write_text("".join(f"{i}\n" for i in range(100000)))
    if fs == "ntfs":
        for f in files.iterdir():
            run("ntfscp", "-f", src, f, f.name)
    elif fs == "fat16":
        subprocess.run(["mcopy", "-i", str(src), *map(str, files.iterdir()), "::"], check=True,
                       capture_output=True, env={**ENV, "MTOOLS_SKIP_CHECK": "1"})
    return _save_gzip(src, fs)


# ------------------------------------------------------------- Clonezilla's partimage mode
# ocs-functions, save_part_by_partimage: one uncompressed partimage stream on stdout,
# compressed from outside, cut by split (-a 2, -b VOL_LIMIT MB)
CLONEZILLA_PARTIMAGE = ("partimage -M -f3 -o -d -b -c -z0 --volume=0 -B gui=no save {dev} stdout")
# the compressors Clonezilla offers for it, and how each is undone for the reference restore
COMPRESSORS = {
    "gzip": ("gzip -c", "gzip -dc"),
    "pigz": ("pigz -c -p 2 -b 128", "gzip -dc"),
    "bzip2": ("bzip2 -c", "bzip2 -dc"),
    "pbzip2": ("pbzip2 -c -p2 -b1", "bzip2 -dc"),
    "lzop": ("lzop -c", "lzop -dc"),
    "xz": ("xz -c -0", "xz -dc"),
    "zstd": ("zstd -c -q", "zstd -dcq"),
    "none": ("cat", "cat"),
}


def clonezilla_save(dev: str, out: Path, *, comp: str, split_bytes: int | None,
                    suffix_len: int = 2) -> list[Path]:
    """Save `dev` the way Clonezilla does; returns the files written (pieces in order)."""
    cmd = (f"{CLONEZILLA_PARTIMAGE.format(dev=dev)} | {COMPRESSORS[comp][0]} | "
           + (f"split -a {suffix_len} -b {split_bytes} - '{out}.'" if split_bytes
              else f"cat > '{out}'"))
    _save_once_more_if_it_fails(["bash", "-o", "pipefail", "-c", cmd], dev, out, "Clonezilla recipe")
    files = sorted(out.parent.glob(f"{out.name}.{'[a-z]' * suffix_len}")) if split_bytes \
        else [out]
    assert files and all(f.stat().st_size for f in files)
    return files


def clonezilla_restore_sha(files: list[Path], comp: str, size: int, work: Path) -> str:
    """sha256 of ``cat PIECES | DECOMPRESS | partimage restore DEV stdin`` (Clonezilla's
    restore of such an image) onto a zero-filled device of `size`."""
    target = zero_file(work / "cz-restore.img", size)
    try:
        with loop_device(target) as dev:
            names = " ".join(f"'{f}'" for f in files)
            p = subprocess.run(["bash", "-o", "pipefail", "-c",
                                f"cat {names} | {COMPRESSORS[comp][1]} | "
                                f"partimage -b -f3 restore {dev} stdin"],
                               env=ENV, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=300)
            assert p.returncode == 0, f"partimage restore failed: {p.stdout[-2000:]!r}"
        return sha256_file(target)
    finally:
        target.unlink(missing_ok=True)


class ClonezillaSave:
    """A partition saved by Clonezilla's partimage recipe, with the reference restore."""

    def __init__(self, files: list[Path], size: int, reference_sha: str) -> None:
        self.files = files
        self.size = size
        self.reference_sha = reference_sha


def fill_fat(src: Path, seed: bytes) -> None:
    """Files on a FAT image through mtools (no vfat driver needed)."""
    files = src.parent / f"files-{src.stem}"
    files.mkdir()
    (files / "readme.txt").write_text("FAT sample for imgfarm\n" * 1000)
    (files / "random.bin").write_bytes(_deterministic(seed, 2 * MiB))
    (files / "dir").mkdir()
    (files / "dir" / "nested.txt").write_text("nested\n" * 5000)
    subprocess.run(["mcopy", "-s", "-i", str(src), str(files / "readme.txt"),
                    str(files / "random.bin"), str(files / "dir"), "::"],
                   check=True, capture_output=True, env={**ENV, "MTOOLS_SKIP_CHECK": "1"})


def make_clonezilla(work: Path, label: str, *, fs: str, size_mib: int, comp: str,
                    split_bytes: int | None, random_mib: int = 2,
                    suffix_len: int = 2) -> ClonezillaSave:
    """A file system on a loop device, filled, saved with Clonezilla's partimage recipe."""
    d = work / label
    d.mkdir()
    src = zero_file(d / "fs.img", size_mib * MiB)
    if fs == "fat32":
        run("mkfs.vfat", "-F", "32", "-n", "IMGFARM", src)
        fill_fat(src, label.encode())
    else:
        run(f"mkfs.{fs}", "-q", "-F", "-b", "1024", "-L", label, src)
    out_dir = d / "img"
    out_dir.mkdir()
    with loop_device(src) as dev:
        if fs != "fat32":
            _fill_ext(dev, d / "mnt", random_mib, seed=size_mib)
        files = clonezilla_save(dev, out_dir / "sda1", comp=comp, split_bytes=split_bytes,
                                suffix_len=suffix_len)
    src.unlink()
    return ClonezillaSave(files, size_mib * MiB,
                          clonezilla_restore_sha(files, comp, size_mib * MiB, d))
