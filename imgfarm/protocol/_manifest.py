"""The partimage-ng manifest: ``manifest.json`` of an image directory.

Written by the agent for a capture and by the converter for a legacy image;
read by the agent for a restore and by the farm to verify and register. The
version field says which layout a file has; this code reads MANIFEST_VERSIONS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from imgfarm.protocol._message import (
    _OMIT,
    Count,
    ImageName,
    Message,
    Path4k,
    ProtocolError,
    Rule,
    SafeFile,
    Sha256,
)
from imgfarm.protocol._vocabulary import (
    COMPRESSIONS,
    HEAD_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MANIFEST_VERSIONS,
    MAX_PARTITIONS,
    MAX_SFDISK,
    ImageFormat,
    JobKind,
    timestamp,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureOrigin(Message):
    """Where a captured image came from: the node, its disk and the job."""

    TAG: ClassVar[str] = "kind"
    kind: JobKind = JobKind.CAPTURE
    node: str = ""
    disk: Path4k = ""
    job: Annotated[int | None, Rule(lo=1, omit=True)] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOrigin(Message):
    """Where a converted image came from: the legacy partimage image and its headers."""

    TAG: ClassVar[str] = "kind"
    kind: JobKind = JobKind.CONVERT
    source_path: Path4k
    identifier: Annotated[str, Rule(pattern=re.compile(r"^0x[0-9a-f]{16}\Z"), means="0x + 16 hex digits")]
    source_format: ImageFormat = ImageFormat.PARTIMAGE
    legacy: dict[str, Any]  # the legacy image's headers, as `imgfarm image inspect` shows them
    converted_at: str


Origin = CaptureOrigin | ConvertOrigin


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionTable(Message):
    """The source disk's partition table, as sfdisk dumps it and restores it."""

    type: Annotated[str, Rule(pattern=re.compile(r"^(dos|gpt)\Z"), means="dos or gpt")]
    sfdisk: Annotated[str, Rule(max_len=MAX_SFDISK, raw=True)]  # `sfdisk -d` of the source disk


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiskHead(Message):
    """The bytes before the first partition (boot code, the table itself), kept as a file."""

    file: SafeFile = HEAD_FILE
    bytes: Count
    sha256: Sha256


@dataclasses.dataclass(frozen=True, kw_only=True)
class LegacyMbr(Message):
    """Sector 0 of a disk that partimage saved along with the partition."""

    device: str
    sector0_b64: Annotated[str, Rule(max_len=1024, pattern=re.compile(r"^[A-Za-z0-9+/=]*\Z"), means="base64")]
    size_kib: Count


@dataclasses.dataclass(frozen=True, kw_only=True)
class Disk(Message):
    """The disk the image was taken from."""

    size_bytes: Count
    partition_table: PartitionTable | None = None  # None: one filesystem over the whole disk
    head: DiskHead | None = None
    legacy_mbr: Annotated[tuple[LegacyMbr, ...], _OMIT] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Partition(Message):
    """One partition (or the whole-disk filesystem, index 0): its place and its stream file."""

    index: Count
    name: str
    file: SafeFile
    filesystem: str
    partclone_fs: str  # what partclone wrote in the stream's header
    block_size: Annotated[int, Rule(lo=1)]
    total_blocks: Count
    used_blocks: Count
    total_bytes: Count
    used_bytes: Count
    start_bytes: Count
    size_bytes: Count
    sha256: Sha256  # of the compressed file
    stream_bytes: Count  # its size
    compression: str = "zstd"
    type: Annotated[str, _OMIT] = ""  # the partition table's type code (captures of partitioned disks)
    tool: Annotated[str, _OMIT] = ""  # the partclone program that captured it (extfs, fat, dd, ...)

    def check(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ProtocolError("compression", f"{self.compression!r} is not supported ({', '.join(COMPRESSIONS)})")
        if self.used_blocks > self.total_blocks:
            raise ProtocolError("used_blocks", f"{self.used_blocks} is more than total_blocks {self.total_blocks}")

    @property
    def raw(self) -> bool:
        """A raw (dd) stream, not a partclone image."""
        return self.tool == "dd" or self.partclone_fs == "raw"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest(Message):
    """manifest.json of a partimage-ng image directory (format and version first)."""

    format: ImageFormat = ImageFormat.NG
    version: int = MANIFEST_VERSION
    created: str = dataclasses.field(default_factory=timestamp)
    name: ImageName
    origin: Origin
    disk: Disk
    partitions: Annotated[tuple[Partition, ...], Rule(max_len=MAX_PARTITIONS)]

    def check(self) -> None:
        if self.format != ImageFormat.NG:
            raise ProtocolError("format", f"is {self.format!r}, expected {ImageFormat.NG.value!r}")
        if self.version not in MANIFEST_VERSIONS:
            raise ProtocolError("version", f"unsupported version {self.version} (this code reads "
                                f"{', '.join(map(str, MANIFEST_VERSIONS))})")
        if not self.partitions:
            raise ProtocolError("partitions", "no partitions")
        seen = {MANIFEST_FILE} | ({self.disk.head.file} if self.disk.head is not None else set())
        for i, p in enumerate(self.partitions):
            if p.file in seen:
                raise ProtocolError(f"partitions[{i}].file", f"{p.file!r} is not a plain, unique file name")
            seen.add(p.file)

    @property
    def stream_bytes(self) -> int:
        return sum(p.stream_bytes for p in self.partitions)

    @property
    def checksums(self) -> dict[str, str]:
        """sha256 per partition stream, as the registry records them."""
        return {p.file: p.sha256 for p in self.partitions}

    def to_text(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ProtocolError("", f"not valid JSON ({exc})") from None
        return cls.from_json(data)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write manifest.json atomically and durably (temp file, fsync, rename, fsync dir)."""
        d = Path(directory)
        target, tmp = d / MANIFEST_FILE, d / f".{MANIFEST_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_text())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read an image directory's manifest.json (or the file itself); OSError if unreadable."""
        p = Path(path)
        return cls.from_text((p / MANIFEST_FILE if p.is_dir() else p).read_text("utf-8"))


