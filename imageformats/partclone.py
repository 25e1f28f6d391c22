"""partclone image format "0002": streaming writer and streaming reader/verifier.

Why our own writer: a converted legacy image must be restorable with stock
``partclone.restore`` without running partclone on a device first, so we emit
the exact bytes partclone 0.3.x writes (docs/formats.md section B): the 110-byte
header with its CRC, a BIT bitmap with its CRC, then the used blocks with a
CRC32 after every ``blocks_per_checksum`` blocks (reseed on).

The CRC is partclone's variant: reflected 0xEDB88320, start 0xFFFFFFFF, *no*
final inversion, i.e. ``zlib.crc32(x) ^ 0xFFFFFFFF`` (docs/formats.md B3).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from imgfarm.errors import ImageError
from imgfarm.imageformats.partimage import iter_used_runs

_isal_crc32: Callable[..., int] | None
try:  # ISA-L's crc32 (python-isal, optional): same result as zlib.crc32, ~10x faster
    import os as _os

    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # pragma: no cover - optional dependency
    _isal_crc32 = None
crc32: Callable[..., int] = (_isal_crc32 if _isal_crc32 is not None
                             and _os.environ.get("IMGFARM_INFLATE") != "zlib" else zlib.crc32)

MAGIC = b"partclone-image\0"
IMAGE_VERSION_TXT = b"0002"
ENDIAN_MARK = 0xC0DE
HEADER_SIZE = 110
FEATURE_SIZE = 18
DEFAULT_PARTCLONE_VERSION = "0.3.23"
CHECKSUM_NONE = 0x00
CHECKSUM_CRC32 = 0x20
CHECKSUM_XXH64 = 0x30
CHECKSUM_XXH128 = 0x31
BITMAP_NONE = 0
BITMAP_BIT = 1
BITMAP_BYTE = 8
DEFAULT_BUFFER = 1 << 20  # partclone's -z default; bpc = buffer // block_size

_HDR = struct.Struct("<16s14s4sH16sQQQQIIHHHHIBB")
assert _HDR.size == 106

# partimage filesystem names -> (our short name, partclone FS type string)
LEGACY_FS = {
    "ext2fs": ("ext2", "EXTFS"),
    "ext3fs": ("ext3", "EXTFS"),
    "fat16": ("fat16", "FAT16"),
    "fat32": ("fat32", "FAT32"),
    "ntfs": ("ntfs", "NTFS"),
    "reiserfs-3.5": ("reiserfs", "REISERFS"),
    "reiserfs-3.6": ("reiserfs", "REISERFS"),
    "jfs": ("jfs", "JFS"),
    "xfs": ("xfs", "XFS"),
    "hfs": ("hfs", "raw"),  # HFS classic: partclone only knows "HFS Plus"
    "hpfs": ("hpfs", "raw"),
    "ufs": ("ufs", "UFS"),
}


def _count_bits(bitmap: bytes | bytearray) -> int:
    mv = memoryview(bitmap)
    return sum(int.from_bytes(mv[i : i + (1 << 20)], "little").bit_count()
               for i in range(0, len(mv), 1 << 20))


def pc_crc32(data: bytes | bytearray | memoryview, state: int = 0xFFFFFFFF) -> int:
    """partclone's CRC32 (no final inversion); `state` is the running value."""
    return zlib.crc32(data, state ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


class _Source(Protocol):
    """What a stream is read from: a file, a zstd stream reader, a pipe."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class PartcloneHeader:
    """The fields of a 0002 header (docs/formats.md B1)."""

    partclone_version: str
    fs_type: str
    device_size: int
    total_blocks: int
    used_blocks_super: int
    used_blocks: int
    block_size: int
    feature_size: int
    image_version: int
    cpu_bits: int
    checksum_mode: int
    checksum_size: int
    blocks_per_checksum: int
    reseed: bool
    bitmap_mode: int

    def pack(self) -> bytes:
        body = _HDR.pack(
            MAGIC, self.partclone_version.encode()[:14], IMAGE_VERSION_TXT, ENDIAN_MARK,
            self.fs_type.encode()[:16], self.device_size, self.total_blocks,
            self.used_blocks_super, self.used_blocks, self.block_size, self.feature_size,
            self.image_version, self.cpu_bits, self.checksum_mode, self.checksum_size,
            self.blocks_per_checksum, 1 if self.reseed else 0, self.bitmap_mode,
        )
        return body + struct.pack("<I", pc_crc32(body))

    @classmethod
    def unpack(cls, raw: bytes, where: str = "image") -> PartcloneHeader:
        if len(raw) < HEADER_SIZE or raw[:16] != MAGIC:
            raise ImageError(f"{where} is not a partclone image (bad magic)")
        if raw[30:34] != IMAGE_VERSION_TXT:
            raise ImageError(f"{where}: partclone image version {raw[30:34]!r} is not supported "
                             "(only 0002)")
        f = _HDR.unpack_from(raw)
        if f[3] != ENDIAN_MARK:
            raise ImageError(f"{where}: partclone image of the other byte order")
        (stored,) = struct.unpack_from("<I", raw, 106)
        if stored != pc_crc32(raw[:106]):
            raise ImageError(f"{where}: partclone header CRC mismatch")
        return cls(
            partclone_version=f[1].split(b"\0", 1)[0].decode("ascii", "replace"),
            fs_type=f[4].split(b"\0", 1)[0].decode("ascii", "replace"),
            device_size=f[5], total_blocks=f[6], used_blocks_super=f[7], used_blocks=f[8],
            block_size=f[9], feature_size=f[10], image_version=f[11], cpu_bits=f[12],
            checksum_mode=f[13], checksum_size=f[14], blocks_per_checksum=f[15],
            reseed=bool(f[16]), bitmap_mode=f[17],
        )


class PartcloneWriter:
    """Writes one partclone 0002 stream to `out` (anything with ``write``).

    Usage: construct (writes header + bitmap), :meth:`write` the used blocks'
    bytes in block order in pieces of any size, then :meth:`close` (writes the
    final partial checksum and checks the byte count).  Pieces are passed to
    `out` without copies; the CRC is computed with ``zlib.crc32`` on slices.
    """

    def __init__(self, out: _Sink, *, fs_type: str, device_size: int, total_blocks: int,
                 block_size: int, bitmap: bytes, used_blocks: int | None = None,
                 blocks_per_checksum: int | None = None,
                 partclone_version: str = DEFAULT_PARTCLONE_VERSION) -> None:
        nbytes = (total_blocks + 7) // 8
        if len(bitmap) < nbytes:
            raise ValueError(f"bitmap has {len(bitmap)} bytes, {nbytes} needed")
        bm = bytearray(bitmap[:nbytes])
        if total_blocks % 8:
            bm[-1] &= (1 << (total_blocks % 8)) - 1
        counted = _count_bits(bm)
        if used_blocks is not None and used_blocks != counted:
            raise ValueError(f"used_blocks {used_blocks} != {counted} bits set in the bitmap")
        bpc = blocks_per_checksum or max(1, DEFAULT_BUFFER // block_size)
        self.header = PartcloneHeader(
            partclone_version=partclone_version, fs_type=fs_type, device_size=device_size,
            total_blocks=total_blocks, used_blocks_super=counted, used_blocks=counted,
            block_size=block_size, feature_size=FEATURE_SIZE, image_version=2, cpu_bits=64,
            checksum_mode=CHECKSUM_CRC32, checksum_size=4, blocks_per_checksum=bpc,
            reseed=True, bitmap_mode=BITMAP_BIT,
        )
        self._out = out
        self._group = bpc * block_size
        self._expected = counted * block_size
        self._in_group = 0
        self._crc = zlib.crc32(b"")
        self.data_bytes = 0
        self.checksums = 0
        out.write(self.header.pack())
        out.write(bytes(bm))
        out.write(struct.pack("<I", pc_crc32(bm)))
        self.stream_bytes = HEADER_SIZE + len(bm) + 4

    def write(self, data: bytes | memoryview, crc: int | None = None) -> None:
        """Append block data.  `crc`: zlib.crc32(data) if the caller already has it
        (used only when `data` is exactly one whole checksum group)."""
        mv = memoryview(data)
        if self.data_bytes + len(mv) > self._expected:
            raise ImageError("more block data than the bitmap has used blocks")
        out = self._out
        if crc is not None and self._in_group == 0 and len(mv) == self._group:
            out.write(mv)
            self.data_bytes += self._group
            self.stream_bytes += self._group
            self._crc = crc
            self._in_group = self._group
            self._emit()
            return
        while len(mv):
            take = min(len(mv), self._group - self._in_group)
            piece = mv[:take] if take < len(mv) else mv
            self._crc = crc32(piece, self._crc)
            out.write(piece)
            self._in_group += take
            self.data_bytes += take
            self.stream_bytes += take
            mv = mv[take:]
            if self._in_group == self._group:
                self._emit()

    def _emit(self) -> None:
        self._out.write(struct.pack("<I", self._crc ^ 0xFFFFFFFF))
        self.stream_bytes += 4
        self.checksums += 1
        self._crc = zlib.crc32(b"")
        self._in_group = 0

    def close(self) -> None:
        if self.data_bytes != self._expected:
            raise ImageError(f"partclone stream got {self.data_bytes} bytes of block data, "
                             f"expected {self._expected}")
        if self._in_group:
            self._emit()


@dataclass
class PartcloneReport:
    header: PartcloneHeader
    data_bytes: int
    checksums: int
    stream_bytes: int


class _Reader:
    def __init__(self, src: _Source, where: str) -> None:
        self.src = src
        self.where = where
        self.pos = 0

    def exact(self, n: int, what: str) -> bytes:
        parts = []
        left = n
        while left:
            b = self.src.read(min(left, 4 << 20))
            if not b:
                raise ImageError(f"{self.where}: stream ends inside the {what}",
                                 hint="the image file is truncated")
            parts.append(b)
            left -= len(b)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_data(src: _Source, where: str = "image", *, chunk: int = 4 << 20
              ) -> Iterator[tuple[PartcloneHeader, bytes, memoryview]]:
    """Read and check a partclone stream; yields (header, bitmap, data piece).

    Checks the header CRC, the bitmap CRC and every data checksum (CRC32 with or
    without reseed); raises ImageError naming the checksum group on a mismatch.
    XXH64/XXH128 images are refused (no xxhash in the standard library).
    """
    rd = _Reader(src, where)
    h = PartcloneHeader.unpack(rd.exact(HEADER_SIZE, "header"), where)
    if h.block_size == 0 or h.block_size > 1 << 24:
        raise ImageError(f"{where}: implausible block size {h.block_size}")
    if h.bitmap_mode == BITMAP_BIT:
        nbytes = (h.total_blocks + 7) // 8
        bitmap = rd.exact(nbytes, "bitmap")
        (stored,) = struct.unpack("<I", rd.exact(4, "bitmap checksum"))
        if stored != pc_crc32(bitmap):
            raise ImageError(f"{where}: partclone bitmap CRC mismatch")
        used = _count_bits(bitmap)
        if used != h.used_blocks:
            raise ImageError(f"{where}: bitmap has {used} used blocks, header says "
                             f"{h.used_blocks}")
    elif h.bitmap_mode == BITMAP_NONE:
        bitmap = b""
        used = h.total_blocks
    else:
        raise ImageError(f"{where}: partclone bitmap mode {h.bitmap_mode} is not supported")
    if h.checksum_mode == CHECKSUM_NONE:
        group = 0
    elif h.checksum_mode == CHECKSUM_CRC32 and h.checksum_size == 4 and h.blocks_per_checksum:
        group = h.blocks_per_checksum * h.block_size
    else:
        raise ImageError(f"{where}: partclone checksum mode 0x{h.checksum_mode:02x} is not "
                         "supported (only none and CRC32)")
    total = used * h.block_size
    done = 0
    crc = zlib.crc32(b"")
    in_group = 0
    n = 0
    while done < total:
        want = min(chunk, total - done)
        if group:
            want = min(want, group - in_group)
        piece = memoryview(rd.exact(want, "block data"))
        done += want
        if group:
            crc = crc32(piece, crc)
            in_group += want
        yield h, bitmap, piece
        if group and (in_group == group or done == total):
            (stored,) = struct.unpack("<I", rd.exact(4, "checksum"))
            if stored != crc ^ 0xFFFFFFFF:
                raise ImageError(f"{where}: partclone checksum mismatch in group {n} "
                                 f"(blocks from {n * h.blocks_per_checksum} of the used ones)",
                                 hint="the block data is damaged")
            n += 1
            in_group = 0
            if h.reseed:
                crc = zlib.crc32(b"")
    if src.read(1):
        raise ImageError(f"{where}: unexpected data after the last block")


def verify_stream(src: _Source, where: str = "image",
                  progress: Callable[[int, int], None] | None = None) -> PartcloneReport:
    """Check a whole partclone stream (see :func:`iter_data`); return what was seen."""
    header: PartcloneHeader | None = None
    done = 0
    rd_src = _CountingReader(src)
    for h, _bm, piece in iter_data(rd_src, where):
        header = h
        done += len(piece)
        if progress is not None:
            progress(done, h.used_blocks * h.block_size)
    if header is None:  # no used blocks at all: read the header again for the report
        raise ImageError(f"{where}: partclone image with no used blocks")
    group = header.blocks_per_checksum * header.block_size if header.checksum_size else 0
    checksums = -(-done // group) if group else 0
    return PartcloneReport(header=header, data_bytes=done, checksums=checksums,
                           stream_bytes=rd_src.count)


class _CountingReader:
    def __init__(self, src: _Source) -> None:
        self.src = src
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.src.read(n)
        self.count += len(b)
        return b


def restore_to_file(src: _Source, target: str, where: str = "image") -> PartcloneHeader:
    """Write a partclone stream's blocks to an existing file at block_id x block_size.

    Pure-Python restore used by tests; stock partclone.restore is the real path.
    """
    header: PartcloneHeader | None = None
    with open(target, "r+b") as out:
        runs: Iterator[tuple[int, int]] | None = None
        left = 0
        offset = 0
        for h, bitmap, piece in iter_data(src, where):
            header = h
            if runs is None:
                runs = iter_used_runs(bitmap)
            while len(piece):
                if left == 0:
                    start, length = next(runs)
                    offset, left = start * h.block_size, length * h.block_size
                take = min(left, len(piece))
                out.seek(offset)
                out.write(piece[:take])
                piece = piece[take:]
                offset += take
                left -= take
    if header is None:
        raise ImageError(f"{where}: partclone image with no used blocks")
    return header


# --- partclone image format 0001 (partclone before 0.3; docs/formats.md B5) ------------
V1_VERSION_TXT = b"0001"
V1_HEADER_SIZE = 4160  # image_head_v1: magic 15, fs 15, version 4, 2 padding, 3 x u64, 4096
V1_BITMAP_MAGIC = b"BiTmAgIc"
_V1 = struct.Struct("<15s15s4s2xiQQQ")


def _byte_bitmap_table() -> bytes:
    """translate() table: byte 1 -> "1", every other value -> "0" (partclone: == 1 is used)."""
    return bytes(0x31 if i == 1 else 0x30 for i in range(256))


_BYTE_TO_DIGIT = _byte_bitmap_table()


@dataclass
class PartcloneV1Header:
    fs_type: str
    block_size: int
    device_size: int
    total_blocks: int
    used_blocks: int  # what the header says (the file system's count)


class V1Stream:
    """Reads and checks a format 0001 stream; use :attr:`bitmap` then :meth:`data` once.

    0001 differs from 0002 in three ways (partclone's partclone.c, IMAGE_FORMATS.md):
    a 4160-byte header without a CRC; a bitmap of one *byte* per block (1 = used,
    anything else free) followed by ``BiTmAgIc``; and a 4-byte checksum after
    *every* block, computed by ``crc32_0001`` -- the old CRC routine whose pointer
    never advanced, so it hashes the block's first byte block-size times -- with
    the state carried from block to block (no reseed), starting at 0xFFFFFFFF.
    The bitmap is packed into 0002's bits as it is read, 1 MiB at a time.
    """

    def __init__(self, src: _Source, where: str) -> None:
        self._rd = _Reader(src, where)
        self.where = where
        raw = self._rd.exact(V1_HEADER_SIZE, "header")
        magic, fs, version, bs, dev_size, total, used = _V1.unpack_from(raw)
        if magic != MAGIC[:15] or version != V1_VERSION_TXT:
            raise ImageError(f"{where} is not a partclone 0001 image")
        if not 0 < bs <= 1 << 24 or total == 0 or used > total or total * bs > dev_size + bs:
            raise ImageError(f"{where}: implausible partclone 0001 header (block size {bs}, "
                             f"{total} blocks, {used} used, device {dev_size} bytes)")
        self.header = PartcloneV1Header(
            fs_type=fs.split(b"\0", 1)[0].decode("ascii", "replace"), block_size=bs,
            device_size=dev_size, total_blocks=total, used_blocks=used)
        bits = bytearray()
        left = total
        while left:
            n = min(left, 1 << 20)
            digits = self._rd.exact(n, "bitmap").translate(_BYTE_TO_DIGIT)
            bits += int(digits[::-1], 2).to_bytes((n + 7) // 8, "little")
            left -= n
        if self._rd.exact(8, "bitmap magic") != V1_BITMAP_MAGIC:
            raise ImageError(f"{where}: partclone 0001 bitmap does not end in BiTmAgIc",
                             hint="the image is damaged")
        self.bitmap = bytes(bits)
        self.used = _count_bits(self.bitmap)
        self._src = src
        self._reps: dict[int, bytes] = {}

    def _crc(self, state: int, first_byte: int) -> int:
        rep = self._reps.get(first_byte)
        if rep is None:
            rep = self._reps[first_byte] = bytes([first_byte]) * self.header.block_size
        return zlib.crc32(rep, state ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def data(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The used blocks' bytes in block order, each block's checksum checked."""
        bs = self.header.block_size
        per = max(1, chunk // bs)
        state = 0xFFFFFFFF
        done = 0
        while done < self.used:
            n = min(per, self.used - done)
            raw = self._rd.exact(n * (bs + 4), "block data")
            mv = memoryview(raw)
            out = bytearray()
            for i in range(n):
                off = i * (bs + 4)
                state = self._crc(state, raw[off])
                (stored,) = struct.unpack_from("<I", raw, off + bs)
                if stored != state:
                    raise ImageError(
                        f"{self.where}: partclone 0001 checksum mismatch at used block "
                        f"{done + i}", hint="the block data is damaged (or the image has the "
                        "8-byte checksums of an old 64-bit partclone, which is not supported)")
                out += mv[off : off + bs]
            done += n
            yield bytes(out)
        if self._src.read(1):
            raise ImageError(f"{self.where}: unexpected data after the last block")
