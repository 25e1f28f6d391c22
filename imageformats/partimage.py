"""Streaming reader of legacy partimage 0.6.x images (volumes ``NAME.000``, ``NAME.001``, ...,
an unsplit ``NAME``, or the way Clonezilla kept them: one stream under one outer compression,
whole or cut by `split` into ``NAME.aa``, ``NAME.ab``, ...; see :mod:`layers`).

Why a reader of our own: converting the farm's old images must not need a
scratch disk or the partimage binary, and it must check everything partimage
itself checks on restore (volume headers, header sums, CHK CRCs and their
positions, the tail) so a damaged image is refused *before* anything is
registered.  The byte layouts are in docs/formats.md (section A); the
constants below name the section they come from.

Public surface:

* :func:`inspect` -- the legacy headers, without reading any block data.
* :class:`PartimageReader` -- opens an image and streams its used blocks,
  either as the raw concatenated block data (:meth:`PartimageReader.data`,
  what the converter needs) or as ``(partition_offset, bytes)`` runs
  (:meth:`PartimageReader.blocks`).  Every CRC is checked as the data passes;
  the tail (64-bit byte sum, last volume number) is checked at the end.

Every failure is an :class:`imgfarm.errors.ImageError` naming the file or the
volume and what was wrong.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import queue
import re
import struct
import threading
import types
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgfarm.errors import ImageError, NotFound
from imgfarm.imageformats import layers

_audioop: types.ModuleType | None
try:  # audioop gives a C-speed exact byte sum (see _ByteSum); gone in Python 3.13
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop as _audioop
except ImportError:  # pragma: no cover - Python >= 3.13
    _audioop = None

# gzip: ISA-L's inflate when python-isal is installed (layers.INFLATE); its crc32 (same
# polynomial and API as zlib.crc32) is ~10x faster for the CHK CRCs.
INFLATE = layers.INFLATE
_isal_zlib: Any = layers._isal_zlib
crc32: Callable[..., int] = _isal_zlib.crc32 if INFLATE == "isal" else zlib.crc32

# --- docs/formats.md A1: volume header ------------------------------------------------
VOLUME_MAGIC = b"PaRtImAgE-VoLuMe"
VOLUME_HEADER_SIZE = 512
ACCEPTED_VERSIONS = ("0.6.0", "0.6.1")
# --- docs/formats.md A2: logical stream -----------------------------------------------
HEADER_SIZE = 16384  # CMainHeader, CLocalHeader, info header
MAGIC_MBR = b"MAGIC-BEGIN-MBRBACKUP"
MAGIC_LOCAL = b"MAGIC-BEGIN-LOCALHEADER"
MAGIC_BITMAP = b"MAGIC-BEGIN-BITMAP"
MAGIC_INFO = b"MAGIC-BEGIN-INFO"
MAGIC_DATA = b"MAGIC-BEGIN-DATABLOCKS"
MAGIC_TAIL = b"MAGIC-BEGIN-TAIL"
EXT_SLOTS = 10
MBR_SIZE = 2048
# --- docs/formats.md A3/A4 ------------------------------------------------------------
CHECK_FREQUENCY = 65536  # bytes of block data between two CHK records
CHECK_SIZE = 16
COPYBUF_SIZE = 262144  # caps a used run: qwPos is the start of the capped run
COMPRESSIONS = {0: "none", 1: "gzip", 2: "bzip2", 3: "lzo", 4: "lzma"}

_VOL_SUFFIX = re.compile(r"\.(\d{3})$")
# compressions whose container checks every decompressed byte (CRC32, CRC64)
_SELF_CHECKED = ("gzip", "bzip2", "xz")
_CRC_EMPTY = zlib.crc32(b"")


class _Crc64kShift:
    """crc32(A + B) from crc32(A) and crc32(B) when len(B) == 64 KiB, in O(1).

    crc(AB) = L(crc(A)) ^ crc(B) with L linear over GF(2) (zlib's crc32_combine);
    L is tabulated per byte once.  Lets the reader hand the partclone writer the
    CRC of a 1 MiB group folded from the 16 CHK CRCs it already computed, saving
    a second CRC pass over the data.
    """

    def __init__(self, n: int = CHECK_FREQUENCY) -> None:
        zeros = bytes(n)
        base = zlib.crc32(zeros, 0)
        cols = [zlib.crc32(zeros, 1 << k) ^ base for k in range(32)]
        self.tables = []
        for j in range(4):
            t = [0] * 256
            for b in range(1, 256):
                low = b & -b
                t[b] = t[b ^ low] ^ cols[8 * j + low.bit_length() - 1]
            self.tables.append(t)

    def combine(self, crc_a: int, crc_b: int) -> int:
        t0, t1, t2, t3 = self.tables
        return (t0[crc_a & 255] ^ t1[(crc_a >> 8) & 255] ^ t2[(crc_a >> 16) & 255]
                ^ t3[crc_a >> 24] ^ crc_b)


_SHIFT64K: _Crc64kShift | None = None


def _shift64k() -> _Crc64kShift:
    global _SHIFT64K
    if _SHIFT64K is None:
        _SHIFT64K = _Crc64kShift()
    return _SHIFT64K


# ======================================================================================
# Small helpers
# ======================================================================================
def _cstr(raw: bytes) -> str:
    """A NUL-terminated C string field as text (latin-1 never fails)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def signed_sum(buf: bytes) -> int:
    """partimage's header "CRC": the sum of the bytes as signed chars, as a u32.

    Not a CRC at all (docs/formats.md A2); kept bit-exact so that we accept exactly
    what partimage accepts.
    """
    high = len(buf) - len(buf.translate(None, bytes(range(128, 256)))) if buf else 0
    # bytes >= 0x80 count as b - 256: total = unsigned sum - 256 * (number of high bytes)
    return (sum(buf) - 256 * high) & 0xFFFFFFFF


class _ResidueSum:
    """The byte sum modulo 65521 only (``zlib.adler32``, ~2.5 GB/s, releases the GIL).

    Used for the block data when converting: those bytes are already covered by
    the CHK CRC32s, so the tail check only has to catch damage elsewhere (headers,
    bitmap, CHK records), which are summed exactly.  The stored tail then has to
    agree modulo 65521 and lie in the range the data length allows.
    """

    def __init__(self) -> None:
        self.residue = 0
        self.length = 0

    def update(self, buf: bytes | bytearray | memoryview) -> None:
        self.residue = (self.residue + (zlib.adler32(buf) & 0xFFFF) - 1) % 65521
        self.length += len(buf)


class _LengthOnly:
    """No data sum at all: for gzip/bzip2 volumes when converting.

    Every decompressed byte of such a volume is already covered by the
    container's own CRC (zlib checks the gzip trailer's CRC32 and length, bzip2
    its block and stream CRCs) and the block data by the CHK CRC32s, so summing
    it again buys nothing; the tail is then only range-checked against the data
    length, while everything outside the data is still summed exactly.
    """

    def __init__(self) -> None:
        self.length = 0

    def update(self, buf: bytes | bytearray | memoryview) -> None:
        self.length += len(buf)


class _ByteSum:
    """Exact unsigned byte sum of a stream, at C speed, without numpy.

    The tail's qwCRC (docs/formats.md A4) is a plain 64-bit sum of every byte;
    summing gigabytes with ``sum()`` would run at ~150 MB/s and dominate the
    conversion.  For each piece of at most 32 KiB: ``zlib.adler32`` gives the
    sum modulo 65521 and ``audioop.avg`` (after ``audioop.bias`` moves the bytes
    to signed range) gives it to within the piece length; since the piece is
    shorter than 65521 the two together fix the exact value.
    """

    PIECE = 32768

    def __init__(self) -> None:
        self.total = 0

    def update(self, buf: bytes | bytearray | memoryview) -> None:
        n = len(buf)
        if n == 0:
            return
        if _audioop is None or n < 1024:
            self.total += sum(buf)
            return
        mv = memoryview(buf)
        biased = _audioop.bias(mv, 1, 128)  # each byte b -> b ^ 0x80, i.e. signed b - 128
        bmv = memoryview(biased)
        total = 0
        piece = self.PIECE
        for off in range(0, n, piece):
            seg = mv[off : off + piece]
            ln = len(seg)
            lo = (_audioop.avg(bmv[off : off + piece], 1) + 128) * ln  # sum in [lo, lo + ln)
            residue = ((zlib.adler32(seg) & 0xFFFF) - 1) % 65521
            total += lo + (residue - lo) % 65521
        self.total += total


@dataclass
class MbrBackup:
    """One CMbr record (docs/formats.md A5): sector 0 of a disk saved with the partition."""

    device: str
    sector0: bytes = field(repr=False)
    size_kib: int
    model: str


@dataclass
class VolumeFile:
    """One volume: a file, or the pieces of a `split` set that together hold it."""

    index: int
    path: str  # the file, or the first piece
    compression: str  # detected from the content: gzip, bzip2, lzo, xz, zstd, lzma, none
    size: int  # bytes on disk (all pieces)
    pieces: list[str] = field(default_factory=list)  # names of a split set's pieces, in order


@dataclass
class LegacyInfo:
    """The legacy headers of a partimage image (what ``partimage imginfo`` shows)."""

    path: str
    image_name: str
    filesystem: str
    description: str
    original_device: str
    partition_size: int
    block_size: int
    block_count: int
    used_blocks: int
    bitmap_size: int
    bad_blocks: int
    label: str
    compression: str
    compression_code: int
    date: str
    hostname: str
    uname: dict[str, str]
    version: str
    identifier: int
    mbr_count: int
    volumes: list[VolumeFile]
    mbrs: list[MbrBackup] = field(default_factory=list, repr=False)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the manifest's ``origin.legacy``)."""
        d = asdict(self)
        d.pop("mbrs")
        d["identifier"] = f"0x{self.identifier:016x}"
        d["used_bytes"] = self.used_bytes
        return d


# ======================================================================================
# Volumes and decompression
# ======================================================================================
def volume_paths(path: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Return (first volume, base, display name) for an image path.

    partimage strips a trailing ``.NNN`` to get the base; volume n is
    ``base.%03d``.  An unsplit image is one file with no suffix.  Passing the
    base name of a split image (``img`` when only ``img.000`` exists) works too,
    and so does any later volume (``img.001`` -> ``img.000``): an image is read
    from its first volume.  A `split` set (``sda1.aa``, ``sda1.ab``, ...; see
    :func:`layers.split_pieces`) is one volume whose first file is its first
    piece, given as any piece or as the base name ``sda1``.
    """
    p = Path(path)
    m = _VOL_SUFFIX.search(p.name)
    if m:
        base = p.with_name(p.name[: m.start()])
        first = base.with_name(f"{base.name}.000")
        return (first if m.group(1) != "000" and first.is_file() else p), base, base.name
    pieces = layers.split_pieces(p)
    if pieces is not None:
        base = pieces[0].with_suffix("")
        return pieces[0], base, base.name
    if not p.exists() and p.with_name(p.name + ".000").exists():
        return p.with_name(p.name + ".000"), p, p.name
    return p, p, p.name


def legacy_first_volume(directory: Path) -> Path:
    """The NAME.000 (or the single unsplit file) of a directory holding one legacy image."""
    vols = sorted(directory.glob("*.000"))
    if vols:
        return vols[0]
    sets = sorted(directory.glob("*.aa")) + sorted(directory.glob("*.aaa"))
    if len(sets) == 1:
        return sets[0]
    files = [p for p in directory.iterdir() if p.is_file()]
    if len(files) == 1:
        return files[0]
    raise NotFound(f"no partimage volume (NAME.000) in {directory}")


def _volume_path(first: Path, base: Path, n: int) -> Path:
    return first if n == 0 else base.with_name(f"{base.name}.{n:03d}")


def _volume_files(first: Path, base: Path, n: int) -> list[Path]:
    """The file(s) holding volume n: one file, or for volume 0 perhaps a split set."""
    if n == 0:
        return layers.split_pieces(first) or [first]
    return [_volume_path(first, base, n)]


def detect_compression(head: bytes) -> str:
    """Compression of one volume (or split set) from its first bytes, never from its name.

    gzip, bzip2, lzop (partimage's own "LZO" test, bytes 1-3), xz, zstd, legacy
    lzma, or "none" when the bytes are partimage's volume magic; anything else
    is "unknown" (docs/formats.md A1).
    """
    kind = layers.detect(head)
    if kind == "none":
        return "none" if head[:16] == VOLUME_MAGIC else "unknown"
    return kind


_Decompressor = layers.Decompressor


def _parse_volume_header(raw: bytes, where: str) -> tuple[str, int, int]:
    if len(raw) < VOLUME_HEADER_SIZE or raw[:16] != VOLUME_MAGIC or raw[16:32].strip(b"\0"):
        raise ImageError(f"{where} is not a partimage image (no volume header)")
    version = _cstr(raw[32:96])
    number, identifier = struct.unpack_from("<IQ", raw, 96)
    return version, number, identifier


def _decode_volumes(first: Path, base: Path, name: str) -> Generator[tuple[str, Any], None, None]:
    """The logical stream across volumes, as ("data", bytes) / ("endvol", n) items.

    Each volume is one file or a split set, under at most one compression
    layer detected from its content (partimage's own gzip/bzip2, or one put
    around it from outside: gzip, bzip2, lzop, xz, zstd).  Each volume's
    header is checked (magic, version, identifier == volume 0's, number ==
    expected) and stripped.  Errors are raised lazily, at the point of the
    stream where they occur, so a consumer that has already reached the tail
    never sees a problem with a stray later volume.
    """
    identifier: int | None = None
    n = 0
    split_set: layers.Pieces | None = None
    while True:
        if n and split_set is not None:
            raise ImageError(
                f"{split_set.last.name}: the partimage stream ends before its tail",
                hint=f"{split_set.last.name} (the last piece present) was cut short, or "
                     "pieces after it are missing")
        paths = _volume_files(first, base, n)
        path = paths[0]
        if not path.is_file():
            if n == 0:
                raise ImageError(f"{path.name}: no such file")
            raise ImageError(
                f"{path.name} is missing (volume {n} of image {name})",
                hint="all volumes NAME.000, NAME.001, ... must be in the same directory",
            )
        with layers.Pieces(paths) as src:
            if len(paths) > 1:
                split_set = src
            try:
                head = src.head(16)
            except OSError as exc:
                raise ImageError(f"{path.name}: cannot open ({exc.strerror})") from exc
            if not head:
                raise ImageError(f"{path.name} is not a partimage image: empty file "
                                 f"(volume {n} of image {name})")
            kind = detect_compression(head)
            if kind == "unknown":
                raise ImageError(f"{path.name} is not a partimage image",
                                 hint="give NAME.000, an unsplit image, or the first piece "
                                      "of a split set (NAME.aa)")
            display = src.name
            header = bytearray()
            for out in layers.decode(src, kind):
                if len(header) < VOLUME_HEADER_SIZE:
                    need = VOLUME_HEADER_SIZE - len(header)
                    header += out[:need]
                    out = out[need:]
                    if len(header) < VOLUME_HEADER_SIZE:
                        continue
                    where = path.name if kind == "none" else f"{display} ({kind})"
                    version, number, ident = _parse_volume_header(bytes(header), where)
                    if version not in ACCEPTED_VERSIONS:
                        raise ImageError(
                            f"{path.name}: partimage format version {version!r} is "
                            f"not supported (only {', '.join(ACCEPTED_VERSIONS)})")
                    if identifier is None:
                        identifier = ident
                    elif ident != identifier:
                        raise ImageError(
                            f"{path.name}: volume belongs to another image (identifier "
                            f"0x{ident:016x}, expected 0x{identifier:016x})",
                            hint="volumes of different saves were mixed")
                    if number != n:
                        raise ImageError(
                            f"{path.name}: wrong volume number {number} (expected {n})")
                    if n == 0:
                        yield "ident", identifier
                    yield "volume", (n, display, kind)
                    if not out:
                        continue
                yield "data", out
            if len(header) < VOLUME_HEADER_SIZE:
                raise ImageError(f"{path.name} is not a partimage image (too short)")
        yield "endvol", n
        n += 1


class _Prefetch:
    """Run a generator in a thread with a bounded queue (decompression overlaps the rest).

    Exceptions travel through the queue and are raised where the consumer reaches
    them.  ``close()`` stops the thread; memory stays bounded by ``depth`` items.
    """

    _END = object()

    def __init__(self, gen: Iterator[Any], depth: int = 4) -> None:
        self._gen = gen
        self._q: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="partimage-decode", daemon=True)
        self._t.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(("ok", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            self._put(("err", exc))
        finally:
            with contextlib.suppress(Exception):
                self._gen.close()  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, item = self._q.get()
            if kind == "ok":
                yield item
            elif kind == "end":
                return
            else:
                raise item

    def close(self) -> None:
        self._stop.set()
        while self._t.is_alive():
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.05)
        self._t.join()


class _Stream:
    """The logical stream (volume headers removed), with a running byte sum."""

    def __init__(self, items: Iterator[tuple[str, Any]], name: str) -> None:
        self._items = iter(items)
        self.name = name
        self._buf = memoryview(b"")
        self._pos = 0
        self.volume = 0
        self.volume_path = ""
        self.volumes: list[tuple[int, str, str]] = []
        self.identifier: int | None = None
        self.ended_volume = -1  # last volume whose end was reached
        self.summer = _ByteSum()
        self.consumed = 0

    def _fill(self) -> bool:
        for kind, val in self._items:
            if kind == "data":
                self._buf = memoryview(val)
                self._pos = 0
                return True
            if kind == "volume":
                self.volume, self.volume_path = val[0], val[1]
                self.volumes.append(val)
            elif kind == "ident":
                self.identifier = val
            elif kind == "endvol":
                self.ended_volume = val
        return False

    def where(self) -> str:
        return Path(self.volume_path).name or self.name

    def read_upto(self, n: int, what: str) -> memoryview:
        """Up to n (>0) bytes of the current chunk, without copying."""
        if self._pos >= len(self._buf) and not self._fill():
            raise ImageError(f"{self.name}: image ends inside the {what}",
                             hint="the last volume is missing or truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.consumed += len(out)
        return out

    def read_exact(self, n: int, what: str, summed: bool = True) -> bytes:
        parts = []
        left = n
        while left:
            piece = self.read_upto(left, what)
            parts.append(piece)
            left -= len(piece)
        out = b"".join(parts)
        if summed:
            self.summer.total += sum(out)
        return out

    def trailing_bytes(self) -> int:
        """Bytes left in the current volume after the tail (reads to its end)."""
        extra = len(self._buf) - self._pos
        self._buf = memoryview(b"")
        for kind, val in self._items:
            if kind == "data":
                extra += len(val)
            elif kind == "endvol":
                self.ended_volume = val
                break
            elif kind in ("volume", "ident"):
                break
        return extra


# ======================================================================================
# Headers
# ======================================================================================
def _check_header_sum(raw: bytes, what: str, where: str) -> None:
    stored = struct.unpack_from("<I", raw, HEADER_SIZE)[0]
    computed = signed_sum(raw[:HEADER_SIZE])
    if stored != computed:
        raise ImageError(f"{where}: {what} header checksum mismatch "
                         f"(stored 0x{stored:08x}, computed 0x{computed:08x})")


def _expect_magic(stream: _Stream, magic: bytes) -> None:
    got = stream.read_exact(len(magic), f"{magic.decode()} marker")
    if got != magic:
        raise ImageError(f"{stream.where()}: expected {magic.decode()} marker, "
                         f"found {got[:24]!r}", hint="the image is corrupt")


def _date(fields: tuple[int, ...]) -> str:
    sec, minute, hour, mday, mon, year = fields[:6]
    try:
        return _dt.datetime(year + 1900, mon + 1, mday, hour, minute, min(sec, 59)).isoformat()
    except ValueError:
        return ""


@dataclass
class _Headers:
    info: LegacyInfo
    bitmap: bytes
    fs_info: bytes


def _read_headers(stream: _Stream, first: Path, base: Path, name: str) -> _Headers:
    """Parse everything up to MAGIC-BEGIN-DATABLOCKS (docs/formats.md A2, items 2-13)."""
    try:
        main = stream.read_exact(HEADER_SIZE + 4, "main header")
    except ImageError as exc:
        if "ends inside" not in exc.message:
            raise
        raise ImageError(f"{first.name} is not a partimage image (too short)") from None
    where = stream.where()
    _check_header_sum(main, "main", where)
    filesystem = _cstr(main[0:512])
    compression_code, _flags = struct.unpack_from("<II", main, 9540)
    date = _date(struct.unpack_from("<11I", main, 9548))
    partition_size = struct.unpack_from("<Q", main, 9592)[0]
    mbr_count, mbr_size, encryption = struct.unpack_from("<III", main, 9792)
    if encryption != 0:
        raise ImageError(f"{where}: encrypted images are not supported")
    if mbr_count and mbr_size != MBR_SIZE:
        raise ImageError(f"{where}: unexpected MBR record size {mbr_size} (expected {MBR_SIZE})")
    uname_keys = ("sysname", "nodename", "release", "version", "machine")
    uname = {k: _cstr(main[9215 + 65 * i : 9215 + 65 * (i + 1)]) for i, k in enumerate(uname_keys)}

    _expect_magic(stream, MAGIC_MBR)
    mbrs = []
    for i in range(mbr_count):
        rec = stream.read_exact(MBR_SIZE, "MBR backup")
        sector0 = rec[:512]
        stored = struct.unpack_from("<I", rec, 512)[0]
        if stored != signed_sum(sector0):
            raise ImageError(f"{where}: MBR backup {i} checksum mismatch")
        mbrs.append(MbrBackup(device=_cstr(rec[516:1028]), sector0=sector0,
                              size_kib=struct.unpack_from("<Q", rec, 1028)[0],
                              model=_cstr(rec[1036:1164])))
    for i in range(EXT_SLOTS):
        _expect_magic(stream, f"MAGIC-BEGIN-EXT{i:03d}".encode())
        (length,) = struct.unpack("<I", stream.read_exact(4, "extension slot"))
        if length > 1 << 20:
            raise ImageError(f"{where}: implausible extension slot length {length}")
        stream.read_exact(length, "extension slot")

    _expect_magic(stream, MAGIC_LOCAL)
    local = stream.read_exact(HEADER_SIZE + 4, "local header")
    _check_header_sum(local, "local", stream.where())
    block_size, used_blocks, block_count, bitmap_size, bad_blocks = struct.unpack_from("<5Q", local)
    label = _cstr(local[40:104])
    if block_size == 0 or block_size > 1 << 20 or block_count == 0:
        raise ImageError(f"{where}: implausible block size/count {block_size}/{block_count}")
    if bitmap_size < (block_count + 7) // 8 or bitmap_size > (block_count + 7) // 8 + 4096:
        raise ImageError(f"{where}: bitmap size {bitmap_size} does not fit {block_count} blocks")

    _expect_magic(stream, MAGIC_BITMAP)
    bitmap = stream.read_exact(bitmap_size, "bitmap")
    _expect_magic(stream, MAGIC_INFO)
    fs_info = stream.read_exact(HEADER_SIZE + 4, "info header")
    _check_header_sum(fs_info, "info", stream.where())
    _expect_magic(stream, MAGIC_DATA)

    bitmap = _trim_bitmap(bitmap, block_count)
    counted = count_bits(bitmap)
    if counted != used_blocks:
        raise ImageError(f"{where}: bitmap has {counted} used blocks, "
                         f"the local header says {used_blocks}")
    info = LegacyInfo(
        path=str(first), image_name=name, filesystem=filesystem,
        description=_cstr(main[512:4608]), original_device=_cstr(main[4608:5120]),
        partition_size=partition_size, block_size=block_size, block_count=block_count,
        used_blocks=used_blocks, bitmap_size=bitmap_size, bad_blocks=bad_blocks, label=label,
        compression=COMPRESSIONS.get(compression_code, f"unknown({compression_code})"),
        compression_code=compression_code, date=date, hostname=_cstr(main[9600:9728]),
        uname=uname, version=_cstr(main[9728:9792]), identifier=stream.identifier or 0,
        mbr_count=mbr_count, volumes=_list_volumes(first, base), mbrs=mbrs,
    )
    return _Headers(info=info, bitmap=bitmap, fs_info=fs_info[:HEADER_SIZE])


def _trim_bitmap(bitmap: bytes, count: int) -> bytes:
    """The first ceil(count/8) bytes with bits >= count cleared (ext2 adds 16 spare bytes)."""
    nbytes = (count + 7) // 8
    out = bytearray(bitmap[:nbytes])
    if count % 8:
        out[-1] &= (1 << (count % 8)) - 1
    return bytes(out)


def count_bits(bitmap: bytes | bytearray) -> int:
    """Number of set bits (used blocks), 1 MiB at a time (no bitmap-sized temporaries)."""
    mv = memoryview(bitmap)
    return sum(int.from_bytes(mv[i : i + (1 << 20)], "little").bit_count()
               for i in range(0, len(mv), 1 << 20))


def _list_volumes(first: Path, base: Path) -> list[VolumeFile]:
    """The volume files present on disk, consecutively from volume 0 (stat only)."""
    out = []
    n = 0
    while True:
        paths = _volume_files(first, base, n)
        try:
            size = sum(p.stat().st_size for p in paths)
        except OSError:
            break
        try:
            with open(paths[0], "rb") as fh:
                kind = detect_compression(fh.read(16))
        except OSError:
            kind = "unknown"
        out.append(VolumeFile(index=n, path=str(paths[0]), compression=kind, size=size,
                              pieces=[p.name for p in paths] if len(paths) > 1 else []))
        if len(paths) > 1:  # a split set is one volume
            break
        if first == base:  # unsplit image: one file
            nxt = base.with_name(f"{base.name}.001")
            if not nxt.exists():
                break
        n += 1
    return out


def iter_used_runs(bitmap: bytes, window: int = 1 << 16) -> Iterator[tuple[int, int]]:
    """(first block, length) of every run of used blocks, in order (LSB-first bitmap).

    Linear in the bitmap size with per-run -- never per-block -- Python work:
    each `window` of bitmap bytes is split into spans of non-zero bytes, and a
    span's run starts/ends come from two big-int bit operations.  Runs that
    cross a window boundary are joined; temporaries stay window-sized.
    """
    n = len(bitmap)
    pending: tuple[int, int] | None = None  # run touching the end of the previous window
    for w0 in range(0, n, window):
        win = bitmap[w0 : w0 + window]
        win_end_bit = (w0 + len(win)) * 8 - 1
        for m in re.finditer(rb"[^\x00]+", win):
            a, b = m.span()
            x = int.from_bytes(win[a:b], "little")
            mask = (1 << ((b - a) * 8)) - 1
            starts = (x & ~(x << 1) & mask).to_bytes(b - a, "little")
            ends = (x & ~(x >> 1)).to_bytes(b - a, "little")
            base = (w0 + a) * 8
            for s, e in zip(_bit_positions(starts), _bit_positions(ends), strict=True):
                first, last = base + s, base + e
                if pending is not None:
                    if first == pending[1] + 1:
                        first = pending[0]
                    else:
                        yield pending[0], pending[1] - pending[0] + 1
                    pending = None
                if last == win_end_bit and w0 + len(win) < n:
                    pending = (first, last)
                else:
                    yield first, last - first + 1
    if pending is not None:
        yield pending[0], pending[1] - pending[0] + 1


def _bit_positions(buf: bytes) -> Iterator[int]:
    for m in re.finditer(rb"[^\x00]", buf):
        i = m.start()
        v = buf[i]
        while v:
            low = v & -v
            yield i * 8 + low.bit_length() - 1
            v ^= low


# ======================================================================================
# The reader
# ======================================================================================
@dataclass
class ReadResult:
    """What a full read checked (returned by :meth:`PartimageReader.verify`)."""

    chk_records: int
    data_bytes: int
    byte_sum: int
    last_volume: int
    volumes: int


class PartimageReader:
    """Streams one legacy image; use as a context manager.

    Why a class: the converter needs the headers and the bitmap *before* the
    data (to write the partclone header), then the data as one pass.  Call
    :meth:`data` (or :meth:`blocks`) exactly once; it checks every CHK record
    (CRC and qwPos) and finally the tail, raising ImageError on the first fault.
    """

    def __init__(self, path: str | os.PathLike[str], *, threaded: bool = True,
                 prefetch: int = 4, exact_sum: bool = True) -> None:
        """`exact_sum=False` (the converter): sum the block data only where no other
        checksum covers it -- modulo 65521 for uncompressed volumes, not at all for
        gzip/bzip2 volumes (see _ResidueSum, _LengthOnly)."""
        self.first, self.base, self.name = volume_paths(path)
        gen = _decode_volumes(self.first, self.base, self.name)
        self._prefetch = _Prefetch(gen, prefetch) if threaded else None
        self._stream = _Stream(iter(self._prefetch) if self._prefetch else gen, self.name)
        try:
            h = _read_headers(self._stream, self.first, self.base, self.name)
        except BaseException:
            self.close()
            raise
        self.info: LegacyInfo = h.info
        self.bitmap: bytes = h.bitmap
        self.fs_info: bytes = h.fs_info
        self.result: ReadResult | None = None
        self._used = False
        self.chunk_crc: int | None = None  # zlib.crc32 of the last piece data() yielded
        self._data_sum: _ByteSum | _ResidueSum | _LengthOnly
        if exact_sum:
            self._data_sum = _ByteSum()
        elif all(v.compression in _SELF_CHECKED for v in h.info.volumes):
            self._data_sum = _LengthOnly()  # container CRCs cover every byte
        else:
            self._data_sum = _ResidueSum()

    def __enter__(self) -> PartimageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    # -- data -----------------------------------------------------------------------
    def data(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The used blocks' bytes, concatenated in block order, CHKs removed and checked.

        Yields `chunk`-byte pieces (the last one shorter) aligned to the start of
        the block data, so a partclone writer with 1 MiB checksum groups gets one
        whole group per piece: per-piece work stays in C on large buffers, which
        keeps the GIL free for the decode thread.
        """
        if self._used:
            raise RuntimeError("PartimageReader.data() can only be iterated once")
        self._used = True
        if chunk % CHECK_FREQUENCY:
            raise ValueError("chunk must be a multiple of 64 KiB")
        info = self.info
        st = self._stream
        bs = info.block_size
        total = info.used_blocks * bs
        cap = max(1, (COPYBUF_SIZE - COPYBUF_SIZE % bs) // bs)
        runs = iter_used_runs(self.bitmap)
        run_start, run_len, run_ord = 0, 0, 0  # run_ord: used-block ordinal of run_start
        summer = self._data_sum
        crc = _CRC_EMPTY
        in_group = 0
        done = 0
        chk_count = 0
        pending: list[memoryview] = []
        pending_len = 0
        shift = _shift64k()
        chunk_crc: int | None = None  # crc32 of the pending chunk, folded from CHK CRCs
        while done < total:
            piece = st.read_upto(min(CHECK_FREQUENCY - in_group, total - done,
                                     chunk - pending_len), "block data")
            crc = crc32(piece, crc)
            in_group += len(piece)
            done += len(piece)
            pending.append(piece)
            pending_len += len(piece)
            if in_group == CHECK_FREQUENCY:
                rec = st.read_exact(CHECK_SIZE, "CHK record")
                magic, stored, pos = struct.unpack("<4sIQ", rec)
                if magic[:3] != b"CHK":
                    raise ImageError(f"{st.where()}: CHK record {chk_count} missing "
                                     f"(found {magic!r})", hint="the image is corrupt")
                # expected qwPos: start of the capped used run holding the group's last byte
                ordinal = (done - 1) // bs
                while ordinal >= run_ord + run_len:
                    run_ord += run_len
                    try:
                        run_start, run_len = next(runs)
                    except StopIteration:
                        raise ImageError(f"{st.where()}: more data than the bitmap has "
                                         "used blocks") from None
                block = run_start + (ordinal - run_ord)
                expected_pos = run_start + ((block - run_start) // cap) * cap
                if stored != crc:
                    raise ImageError(
                        f"{st.where()}: CHK CRC mismatch at block {block} "
                        f"(record {chk_count}: stored 0x{stored:08x}, computed 0x{crc:08x})",
                        hint="the block data is damaged")
                if pos != expected_pos:
                    raise ImageError(f"{st.where()}: CHK position mismatch at record "
                                     f"{chk_count} (qwPos {pos}, expected {expected_pos})")
                chk_count += 1
                chunk_crc = crc if chunk_crc is None else shift.combine(chunk_crc, crc)
                crc = _CRC_EMPTY
                in_group = 0
            if pending_len == chunk or done == total:
                buf = b"".join(pending)
                pending.clear()
                summer.update(buf)
                # crc32 of buf when it is made of whole CHK groups (else None)
                self.chunk_crc = chunk_crc if in_group == 0 else None
                pending_len = 0
                chunk_crc = None
                yield buf
        self._finish(chk_count, total)

    def _finish(self, chk_count: int, total: int) -> None:
        st = self._stream
        _expect_magic(st, MAGIC_TAIL)
        tail = st.read_exact(HEADER_SIZE, "tail", summed=False)
        stored_sum, last_volume = struct.unpack_from("<QI", tail)
        where = st.where()
        rest = st.summer.total  # everything but the block data, exact
        ds = self._data_sum
        if isinstance(ds, _ByteSum):
            byte_sum = rest + ds.total
            ok = stored_sum == byte_sum & 0xFFFFFFFFFFFFFFFF
        elif isinstance(ds, _ResidueSum):
            data_part = stored_sum - rest
            ok = (0 <= data_part <= 255 * ds.length and data_part % 65521 == ds.residue)
            byte_sum = stored_sum if ok else rest + ds.residue
        else:
            if any(v[2] not in _SELF_CHECKED for v in st.volumes):
                raise ImageError(f"{where}: a volume changed compression while being read")
            ok = 0 <= stored_sum - rest <= 255 * ds.length
            byte_sum = stored_sum if ok else rest
        if not ok:
            raise ImageError(f"{where}: tail checksum mismatch (stored {stored_sum}, "
                             f"computed {byte_sum})", hint="the image is corrupt")
        if last_volume != st.volume:
            raise ImageError(f"{where}: the tail says the image ends in volume {last_volume}, "
                             f"but it ended in volume {st.volume}")
        extra = st.trailing_bytes()
        if extra:
            raise ImageError(f"{where}: {extra} unexpected bytes after the tail")
        self.result = ReadResult(chk_records=chk_count, data_bytes=total, byte_sum=byte_sum,
                                 last_volume=last_volume, volumes=st.volume + 1)
        self.info.volumes = [v for v in self.info.volumes if v.index <= st.volume]

    def blocks(self) -> Iterator[tuple[int, memoryview]]:
        """``(partition byte offset, data)`` for every run of consecutive used blocks.

        Offsets follow docs/formats.md A3: block i is at i x block_size (ext2/3:
        1 KiB logical blocks; FAT: absolute sectors, the last sector never saved).
        """
        bs = self.info.block_size
        runs = iter_used_runs(self.bitmap)
        left = 0
        offset = 0
        for buf in self.data():
            piece = memoryview(buf)
            while len(piece):
                if left == 0:
                    start, length = next(runs)
                    offset, left = start * bs, length * bs
                take = min(left, len(piece))
                yield offset, piece[:take]
                piece = piece[take:]
                offset += take
                left -= take

    def verify(self, progress: Callable[[int, int], None] | None = None) -> ReadResult:
        """Read everything, checking every CRC and the tail; return what was checked."""
        total = self.info.used_bytes
        done = 0
        for piece in self.data():
            done += len(piece)
            if progress is not None and done % (16 << 20) < len(piece):
                progress(done, total)
        if progress is not None:
            progress(total, total)
        assert self.result is not None
        return self.result


def inspect(path: str | os.PathLike[str]) -> LegacyInfo:
    """The legacy headers of an image (filesystem, sizes, volumes, ...) without reading data.

    Only volume 0's headers are decompressed; the volume list is what exists on
    disk (the last volume's number is only known from the tail).
    """
    first, base, name = volume_paths(path)
    gen = _decode_volumes(first, base, name)
    try:
        stream = _Stream(gen, name)
        return _read_headers(stream, first, base, name).info
    finally:
        gen.close()


def restore_to_file(path: str | os.PathLike[str], target: str | os.PathLike[str]) -> ReadResult:
    """Write the used blocks to `target` (an existing file/device) at their offsets.

    A pure-Python ``partimage restore`` (free blocks are left untouched), used
    by tests to cross-check the reader against the real tool.
    """
    with PartimageReader(path) as r, open(target, "r+b") as out:
        for offset, piece in r.blocks():
            out.seek(offset)
            out.write(piece)
        assert r.result is not None
        return r.result
