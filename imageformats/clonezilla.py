"""Clonezilla image directories -> one partimage-ng image.

Why: Clonezilla is how most sites kept their disks for years.  A saved disk is
a directory (``ocs-functions``, the savedisk task) holding:

* ``disk`` (``sda``) and ``parts`` (``sda1 sda2``), the disk and its saved partitions;
* ``sda-pt.sf``, an ``sfdisk -d`` dump, and ``sda-mbr``, the first 512 bytes
  (``sda-hidden-data-after-mbr``, the sectors up to the first partition, when
  Clonezilla kept them);
* per partition one image, in one of Clonezilla's modes:

  - partimage mode: ``partimage -z0 ... stdout | COMPRESS | split`` -> ``sda1``
    or ``sda1.aa``, ``sda1.ab``, ... (read by :mod:`partimage` through
    :mod:`layers`);
  - partclone mode: ``partclone.FS -c ... -o - | COMPRESS | split`` ->
    ``sda2.FS-ptcl-img.COMP`` or ``....COMP.aa``, ...;
  - ntfsclone (``sda1.ntfs-img...``) and dd (``sda1.dd-img...``,
    ``sda1.dd-ptcl-img...``): refused, by name -- they carry no block bitmap
    the farm could restore with partclone.

Every partition becomes a partclone 0002 stream in zstd: partimage-mode ones
through the legacy converter; partclone-mode 0002 streams are recompressed as
they are, every CRC checked on the way.  The partition table and the boot
area go into the manifest the way a capture keeps them (the sfdisk dump, and
the bytes before the first partition as ``disk-head.bin``), so the farm's
ordinary restore writes the whole disk back.  As with one legacy image,
everything is written into a temporary directory and renamed into place only
when every partition has converted and verified.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfarm.errors import ImageError
from imgfarm.imageformats import convert, layers, partclone, partimage
from imgfarm.imageformats.convert import ZSTD_LEVEL, compress_into
from imgfarm.protocol import (
    CONVERT_VERIFY_DEFAULT,
    HEAD_FILE,
    IMAGE_NAME,
    IMAGE_NAME_HINT,
    MAX_PARTITIONS,
    MAX_SFDISK,
    ConvertOrigin,
    Disk,
    DiskHead,
    ImageFormat,
    LegacyMbr,
    Manifest,
    Partition,
    PartitionTable,
    part_file,
    part_name,
    timestamp,
)

PARTS_FILE = "parts"
MAX_SMALL_FILE = 1 << 20  # disk, parts, the sfdisk dump: text files of a few lines
MAX_HEAD = 1 << 30  # Clonezilla skips hidden data after the MBR larger than 1 GiB too
_DEV = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")  # sda1, nvme0n1p2, cciss-c0d0p1 (to_filename)
_SF_LINE = re.compile(r"^(?P<dev>/dev/\S+)\s*:\s*(?P<fields>.*)$")
_PTCL = re.compile(r"^(?P<part>[^.]+)\.(?P<fs>[a-z0-9+]+)-ptcl-img\.(?P<comp>[a-z0-9]+)"
                   r"(?:\.(?P<suffix>[a-z]{2,3}))?$")


def is_clonezilla_dir(path: str | os.PathLike[str]) -> bool:
    """A directory Clonezilla saved: it has a ``parts`` file."""
    p = Path(path)
    return p.is_dir() and (p / PARTS_FILE).is_file()


@dataclass
class CzPart:
    """One partition of the saved disk and where its image is."""

    dev: str  # sda1
    number: int
    start_bytes: int
    size_bytes: int
    type: str
    mode: str  # "partimage" or "partclone"
    files: list[Path]
    fs: str = ""  # partclone mode: the partclone program's suffix (ext4, vfat, ...)
    compression: str = ""  # partclone mode: Clonezilla's suffix (gz, bz2, lzo, zst, ...)


@dataclass
class CzDir:
    directory: Path
    disk: str
    sfdisk: str
    table_type: str
    sector_size: int
    head: bytes = field(repr=False)
    mbr: bytes = field(repr=False)
    parts: list[CzPart] = field(default_factory=list)

    last_lba: int = 0  # gpt: the dump's last-lba (the backup GPT's 33 sectors follow it)

    @property
    def size_bytes(self) -> int:
        end = max(p.start_bytes + p.size_bytes for p in self.parts)
        if self.table_type == "gpt":  # the backup GPT (32 entry sectors + header) at the end
            end = max(end + 33 * self.sector_size, (self.last_lba + 34) * self.sector_size)
        return end


def _small_text(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SMALL_FILE + 1)
    except FileNotFoundError:
        raise ImageError(f"{path.parent.name}/{path.name} is missing",
                         hint="a Clonezilla disk image has disk, parts and DISK-pt.sf") from None
    except OSError as exc:
        raise ImageError(f"{path.name}: cannot read ({exc.strerror})") from exc
    if len(raw) > MAX_SMALL_FILE:
        raise ImageError(f"{path.name} is larger than {MAX_SMALL_FILE} bytes: not Clonezilla's")
    return raw.decode("utf-8", "replace")


def _names(path: Path) -> list[str]:
    names = _small_text(path).split()
    for n in names:
        if not _DEV.match(n):
            raise ImageError(f"{path.name}: {n!r} is not a device name",
                             hint="Clonezilla writes names like sda1 or nvme0n1p2")
    return names


def last_lba(text: str) -> int:
    """The ``last-lba:`` of a gpt dump (0 when there is none)."""
    for line in text.splitlines():
        if line.strip().startswith("last-lba:"):
            try:
                return int(line.split(":", 1)[1])
            except ValueError:
                return 0
    return 0


def parse_sfdisk(text: str, where: str) -> tuple[str, int, dict[str, tuple[int, int, str]]]:
    """(label, sector size, {device name: (start sector, sectors, type)}) of an ``sfdisk -d``."""
    label = "dos"
    sector = 512
    parts: dict[str, tuple[int, int, str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("label:"):
            label = line.split(":", 1)[1].strip()
        elif line.startswith("sector-size:"):
            try:
                sector = int(line.split(":", 1)[1])
            except ValueError:
                raise ImageError(f"{where}: bad sector-size line {line[:80]!r}") from None
        elif m := _SF_LINE.match(line):
            fields = dict(f.strip().split("=", 1) for f in m.group("fields").split(",")
                          if "=" in f)
            try:
                start, size = int(fields["start"]), int(fields["size"])
            except (KeyError, ValueError):
                raise ImageError(f"{where}: partition line without start and size: "
                                 f"{line[:80]!r}") from None
            parts[Path(m.group("dev")).name] = (start, size, fields.get("type", "").strip())
    if label not in ("dos", "gpt"):
        raise ImageError(f"{where}: partition table type {label!r} is not supported",
                         hint="dos (MBR) and gpt tables are")
    if sector not in (512, 4096):
        raise ImageError(f"{where}: sector size {sector} is not supported")
    return label, sector, parts


def _find_image(directory: Path, dev: str) -> tuple[str, list[Path], str, str]:
    """(mode, files, fs, compression) of partition `dev`'s image; refuses what is not ours."""
    names = sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{dev}."))
    for n in names:
        if n.startswith((f"{dev}.ntfs-img", f"{dev}.dd-img")):
            tool = "ntfsclone" if "ntfs-img" in n else "dd"
            raise ImageError(
                f"partition {dev} was saved by {tool} ({n}): the farm cannot convert that",
                hint=f"restore {dev} with Clonezilla and save it again in partclone mode; "
                     "nothing was registered")
    for n in names:
        m = _PTCL.match(n)
        if m is None or m.group("part") != dev:
            continue
        if m.group("fs") == "dd":
            raise ImageError(
                f"partition {dev} was saved by partclone.dd ({n}): raw data without a block "
                "bitmap, the farm cannot convert that",
                hint="save it again with the file system's own partclone tool; nothing was "
                     "registered")
        base = directory / n
        files = layers.split_pieces(base) if m.group("suffix") else [base]
        if files is None:
            continue
        return "partclone", files, m.group("fs"), m.group("comp")
    whole = directory / dev
    pieces = layers.split_pieces(whole)
    if pieces is not None:
        return "partimage", pieces, "", ""
    if whole.is_file():
        return "partimage", [whole], "", ""
    raise ImageError(f"{directory.name}/parts names {dev}, but the directory has no image of it",
                     hint=f"expected {dev}.aa (partimage mode) or {dev}.FS-ptcl-img.COMP "
                          "(partclone mode); nothing was registered")


def read_dir(directory: str | os.PathLike[str]) -> CzDir:
    """Parse and check a Clonezilla disk directory, without reading any image data."""
    d = Path(directory)
    disks = _names(d / "disk") if (d / "disk").exists() else []
    if len(disks) != 1:
        raise ImageError(
            f"{d.name}: " + (f"saved {len(disks)} disks ({' '.join(disks)})" if disks
                             else "has no disk file (Clonezilla's saveparts)")
            + ": a farm image is one disk",
            hint="convert the partitions one at a time: imgfarm image convert DIR/sda1.aa")
    disk = disks[0]
    parts = _names(d / PARTS_FILE)
    if not parts:
        raise ImageError(f"{d.name}/parts lists no partition")
    sf_path = d / f"{disk}-pt.sf"
    sfdisk = _small_text(sf_path)
    if len(sfdisk) > MAX_SFDISK:
        raise ImageError(f"{sf_path.name} is larger than {MAX_SFDISK} bytes: not an sfdisk dump")
    if len(parts) > MAX_PARTITIONS:
        raise ImageError(f"{d.name}/parts lists {len(parts)} partitions (at most "
                         f"{MAX_PARTITIONS} in one image)")
    label, sector, table = parse_sfdisk(sfdisk, sf_path.name)
    mbr_path = d / f"{disk}-mbr"
    try:
        mbr = mbr_path.read_bytes()[:513]
    except FileNotFoundError:
        raise ImageError(f"{d.name}/{mbr_path.name} is missing",
                         hint="Clonezilla saves the first 512 bytes of the disk there") from None
    if len(mbr) != 512:
        raise ImageError(f"{mbr_path.name} is {len(mbr)} bytes, not the 512 of a boot sector")
    head = mbr
    hidden = d / f"{disk}-hidden-data-after-mbr"
    first = min(start for start, _size, _type in table.values()) * sector if table else 0
    if hidden.is_file():
        size = hidden.stat().st_size
        if size > MAX_HEAD or 512 + size > first:
            raise ImageError(f"{hidden.name} is {size} bytes: it does not fit before the "
                             "first partition")
        head = mbr + hidden.read_bytes()
    out = CzDir(directory=d, disk=disk, sfdisk=sfdisk, table_type=label, sector_size=sector,
                head=head, mbr=mbr, last_lba=last_lba(sfdisk))
    for dev in parts:
        if dev not in table:
            raise ImageError(f"{d.name}/parts names {dev}, which {sf_path.name} does not list")
        m = re.search(r"(\d+)$", dev)
        if m is None or not dev.startswith(disk):
            raise ImageError(f"{d.name}/parts: {dev} is not a partition of {disk}")
        start, size, ptype = table[dev]
        mode, files, fs, comp = _find_image(d, dev)
        out.parts.append(CzPart(dev=dev, number=int(m.group(1)), start_bytes=start * sector,
                                size_bytes=size * sector, type=ptype, mode=mode, files=files,
                                fs=fs, compression=comp))
    numbers = [p.number for p in out.parts]
    if len(set(numbers)) != len(numbers):
        raise ImageError(f"{d.name}/parts lists a partition twice")
    return out


class _Reader:
    """read(n) over an iterator of byte pieces (partclone's readers take a file-like)."""

    def __init__(self, pieces: Any) -> None:
        self._it = iter(pieces)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return b""
        if n < 0 or n >= len(self._buf):
            b, self._buf = self._buf, b""
        else:
            b, self._buf = self._buf[:n], self._buf[n:]
        return b


class _Tee(_Reader):
    """A :class:`_Reader` that hands every byte it returns to `out` too (and counts them)."""

    def __init__(self, pieces: Any, out: Any) -> None:
        super().__init__(pieces)
        self._out = out
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = super().read(n)
        if b:
            self._out.write(b)
            self.count += len(b)
        return b


def _rewrite_v1(src: _Reader, out: Any, where: str, seen: dict[str, Any]) -> int:
    """A format 0001 stream (partclone < 0.3) written out as 0002, every 0001 checksum
    checked; stock partclone.restore reads the result like any 0002 image."""
    v1 = partclone.V1Stream(src, where)
    h = v1.header
    writer = partclone.PartcloneWriter(
        out, fs_type=h.fs_type, device_size=h.device_size, total_blocks=h.total_blocks,
        block_size=h.block_size, bitmap=v1.bitmap)
    for piece in v1.data():
        writer.write(piece)
    writer.close()
    seen.update(fs_type=h.fs_type, device_size=h.device_size, block_size=h.block_size,
                total_blocks=h.total_blocks, used_blocks=v1.used, version="before 0.3",
                image_format="0001, rewritten as 0002")
    return writer.stream_bytes


def _partclone_part(part: CzPart, out_path: Path, level: int,
                    progress: Callable[[int], None] | None, roundtrip: bool = True
                    ) -> tuple[Partition, dict[str, Any]]:
    src = layers.Pieces(part.files)
    where = src.name
    head = src.head(16)
    kind = layers.detect(head)
    seen: dict[str, Any] = {}

    def fill(out: Any) -> int:
        with src:
            decoded = layers.decode(src, kind)
            first = next(decoded, b"")
            if first[:15] != partclone.MAGIC[:15]:
                raise ImageError(f"{where}: {kind} data, but not a partclone image inside")

            def pieces() -> Any:
                yield first
                yield from decoded

            if first[30:34] == partclone.V1_VERSION_TXT:
                return _rewrite_v1(_Reader(pieces()), out, where, seen)
            tee = _Tee(pieces(), out)
            r = partclone.verify_stream(
                tee, where, None if progress is None else (lambda d, _t: progress(d)))
            h = r.header
            seen.update(fs_type=h.fs_type, device_size=h.device_size, block_size=h.block_size,
                        total_blocks=h.total_blocks, used_blocks=h.used_blocks,
                        version=h.partclone_version, image_format="0002")
            return tee.count

    sha, count = compress_into(out_path, fill, level=level, roundtrip=roundtrip)
    if seen["device_size"] > part.size_bytes:
        raise ImageError(f"{where}: the file system ({seen['device_size']} bytes) is larger "
                         f"than partition {part.dev} ({part.size_bytes} bytes)")
    bs = seen["block_size"]
    p = Partition(
        index=part.number, name=part_name(part.number), file=out_path.name, filesystem=part.fs,
        partclone_fs=seen["fs_type"], tool=part.fs, type=part.type, block_size=bs,
        total_blocks=seen["total_blocks"], used_blocks=seen["used_blocks"],
        total_bytes=seen["total_blocks"] * bs, used_bytes=seen["used_blocks"] * bs,
        start_bytes=part.start_bytes, size_bytes=part.size_bytes, sha256=sha,
        stream_bytes=count, compression="zstd")
    origin = {"dev": part.dev, "mode": "partclone", "files": [f.name for f in part.files],
              "compression": kind, "partclone_version": seen["version"],
              "image_format": seen["image_format"]}
    return p, origin


def _partimage_part(part: CzPart, out_path: Path, level: int,
                    progress: Callable[[int], None] | None, roundtrip: bool = True
                    ) -> tuple[Partition, dict[str, Any], partimage.LegacyInfo]:
    reader = partimage.PartimageReader(part.files[0], exact_sum=False)
    info = reader.info
    try:
        _fs, pc_fs = convert.fs_names(info.filesystem)
        if (info.partition_size > part.size_bytes
                or info.block_count * info.block_size > part.size_bytes):
            raise ImageError(f"{part.files[0].name}: the saved file system "
                             f"({info.partition_size} bytes) is larger than partition "
                             f"{part.dev} ({part.size_bytes} bytes)")
    except BaseException:
        reader.close()
        raise

    def fill(out: Any) -> int:
        with reader:
            return convert.write_partclone(reader, out, pc_fs, progress)

    try:
        sha, count = compress_into(out_path, fill, level=level, roundtrip=roundtrip)
    finally:
        reader.close()
    p = convert.legacy_partition(info, index=part.number, file=out_path.name, sha256=sha,
                                 stream_bytes=count, start_bytes=part.start_bytes,
                                 size_bytes=part.size_bytes, type=part.type)
    origin = {"dev": part.dev, "mode": "partimage", "files": [f.name for f in part.files],
              "legacy": info.to_dict()}
    return p, origin, info


def convert_dir(directory: str | os.PathLike[str], dest_dir: Path, *, name: str,
                progress: Callable[[int, int], None] | None = None,
                level: int = ZSTD_LEVEL, verify: str = CONVERT_VERIFY_DEFAULT) -> Manifest:
    """Convert the Clonezilla disk directory `directory` into ``dest_dir/NAME``.

    Every partition in ``parts`` is converted and checked before the new image is
    renamed into place; on any failure nothing is left in `dest_dir`.
    `progress(done, total)` counts compressed input bytes over all partitions.
    `verify`: as :func:`convert.convert_legacy`'s ("written", "stream", "full").
    """
    mode = convert.verify_mode(verify)
    roundtrip = mode != "written"
    src_dir = Path(directory)
    if not IMAGE_NAME.match(name):
        raise ImageError(f"invalid image name {name!r}", hint=IMAGE_NAME_HINT)
    cz = read_dir(src_dir)  # every refusal that needs no data comes before any work
    sizes = [sum(f.stat().st_size for f in p.files) for p in cz.parts]
    total = sum(sizes)

    def build(tmp: Path) -> Manifest:
        parts: list[Partition] = []
        origins: list[dict[str, Any]] = []
        mbrs: list[LegacyMbr] = []
        base = 0
        for part, size in zip(cz.parts, sizes, strict=True):
            out_path = tmp / part_file(part.number)
            if part.mode == "partimage":
                p, origin, info = _partimage_part(part, out_path, level, None, roundtrip)
                mbrs += convert.legacy_mbrs(info)
            else:
                p, origin = _partclone_part(part, out_path, level, None, roundtrip)
            base += size
            if progress is not None:
                progress(base, total)
            parts.append(p)
            origins.append(origin)
        (tmp / HEAD_FILE).write_bytes(cz.head)
        now = timestamp()
        ident = hashlib.sha256(cz.sfdisk.encode() + cz.mbr).hexdigest()[:16]
        return Manifest(
            created=now, name=name,
            origin=ConvertOrigin(
                source_path=str(src_dir.resolve()), identifier=f"0x{ident}",
                source_format=ImageFormat.PARTIMAGE, converted_at=now,
                legacy={"shape": "clonezilla", "disk": cz.disk,
                        "parts": [p.dev for p in cz.parts], "partitions": origins}),
            disk=Disk(size_bytes=cz.size_bytes,
                      partition_table=PartitionTable(type=cz.table_type, sfdisk=cz.sfdisk),
                      head=DiskHead(file=HEAD_FILE, bytes=len(cz.head),
                                    sha256=hashlib.sha256(cz.head).hexdigest()),
                      legacy_mbr=tuple(mbrs)),
            partitions=tuple(parts))

    return convert.build_image(Path(dest_dir), name, src_dir.name, build, full=mode == "full")
