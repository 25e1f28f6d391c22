"""Convert a legacy partimage image into a partimage-ng image directory.

Why streaming and threaded: legacy images are tens of gigabytes and the
convert queue's workers have few cores.  One pass reads the volumes, checks
every CRC and writes the partclone stream through zstd, with the work spread
over threads whose C calls release the GIL: gzip/bzip2 decoding (ISA-L's
inflate when python-isal is installed) in the reader's decode thread; CHK
CRCs, byte sum and stream assembly in the calling thread; zstd compression
(level 1 by default) in a thread of its own; file writes, sha256 (and, with
``verify="stream"``, the zstd round trip) in the writer thread.  Queues are bounded and the data moves
as 1 MiB pieces, so memory stays flat whatever the image size.

Atomicity: everything is written into ``dest_dir/.NAME.tmp-XXXX/``, checked
(``verify=``: in-line, see :func:`convert_legacy`), fsynced, and only then
renamed to ``dest_dir/NAME``.  On any failure the temporary
directory is removed and nothing that looks like an image is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from imgfarm.errors import ImageError
from imgfarm.imageformats import ng, partclone, partimage
from imgfarm.protocol import (
    CONVERT_VERIFY,
    CONVERT_VERIFY_DEFAULT,
    IMAGE_NAME,
    IMAGE_NAME_HINT,
    ConvertOrigin,
    Disk,
    ImageFormat,
    LegacyMbr,
    Manifest,
    Partition,
    part_file,
    part_name,
    timestamp,
)

PART_FILE = part_file(0)  # a legacy image is one partition: the whole "disk" is its filesystem
# zstd level 1: on the bench image (1/3 text, 1/3 random, 1/6 zeros) it compresses *better*
# than 3 (ratio 2.31 vs 2.26) at half the CPU (0.55 s vs 1.03 s for 373 MiB); figures for
# levels -5..3 in bench/README.md ("convert").  Pass level= for another trade-off.
ZSTD_LEVEL = 1
VERIFY_MODES = CONVERT_VERIFY


class _ZstdFrames:
    """Walks the zstd frame structure of a byte stream fed in pieces (headers only, cheap).

    The zstd round trip (stream_reader) silently stops at the end of its input:
    a stream cut inside a frame -- even just before the 4-byte content checksum
    -- would go unnoticed.  This walker proves that the stream is whole frames,
    each with a content checksum (so the decompressor verified every one), and
    nothing else.  Layout: RFC 8878 section 3.1.
    """

    _SIZES = ((0, 1), (2, 2), (4, 4), (8, 8))  # FCS field: (multi-segment, single-segment)

    def __init__(self) -> None:
        self.frames = 0
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._last = False

    def feed(self, b: bytes) -> None:
        pos, n = 0, len(b)
        while pos < n:
            if self._skip:
                k = min(self._skip, n - pos)
                pos += k
                self._skip -= k
                continue
            take = min(self._need - len(self._buf), n - pos)
            self._buf += b[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                self._field(bytes(self._buf))
                self._buf.clear()

    def _field(self, f: bytes) -> None:
        v = int.from_bytes(f, "little")
        st = self._state
        if st == "magic":
            if v != 0xFD2FB528:
                raise ImageError(f"zstd output: not a zstd frame (magic 0x{v:08x})")
            self._state, self._need = "fhd", 1
        elif st == "fhd":
            fcs, single, did = v >> 6, (v >> 5) & 1, v & 3
            if v & 0x08 or not v & 0x04:
                raise ImageError("zstd output: a frame without content checksum")
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[did] + self._SIZES[fcs][single]
            self._state, self._need = "block", 3
        else:  # block header: last flag, type, size
            btype, size = (v >> 1) & 3, v >> 3
            if btype == 3:
                raise ImageError("zstd output: reserved block type")
            self._skip = 1 if btype == 1 else size
            if v & 1:  # last block: then the 4-byte checksum, then the next frame
                self._skip += 4
                self.frames += 1
                self._state, self._need = "magic", 4

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._buf and not self._skip


class _HashingFile:
    """Write-only sink: file + sha256 + byte count (+ zstd round trip), in a background thread.

    zstd hands its output to ``write`` from the converting thread; hashing and
    writing it there would put ~0.3 s/GiB more on that already busy thread, so a
    bounded queue passes the (immutable) bytes to a thread of their own.

    `roundtrip=True` also decompresses every byte written (output discarded into
    one reused buffer): zstd checks each frame's content checksum (XXH64 of what
    the compressor was given) and :class:`_ZstdFrames` proves the frames are
    whole, so a compressed stream that would not restore to the partclone
    stream we produced is caught before anything is renamed into place.  It uses
    ``stream_reader().readinto()``, which releases the GIL (``decompressobj``
    does not, and stalled the whole pipeline: 1.0 s instead of 0.75 s).
    """

    def __init__(self, fh: Any, depth: int = 8, roundtrip: bool = False) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.count = 0
        self.restored = 0  # decompressed bytes (roundtrip)
        self.frames = _ZstdFrames() if roundtrip else None
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._done = False
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="convert-write", daemon=True)
        self._t.start()

    def _take(self, _size: int = -1) -> bytes:
        """The next piece from the queue, written and hashed (b"" at the end)."""
        if self._done:
            return b""
        b = self._q.get()
        if b is None:
            self._done = True
            return b""
        self.fh.write(b)
        self.sha.update(b)
        if self.frames is not None:
            self.frames.feed(b)
        return b

    def _run(self) -> None:
        try:
            if self.frames is not None:
                dctx = zstandard.ZstdDecompressor()
                src = type("_Src", (), {"read": staticmethod(self._take)})()
                with dctx.stream_reader(src, read_size=1 << 20, read_across_frames=True,
                                        closefd=False) as zr:
                    buf = bytearray(1 << 20)
                    while n := zr.readinto(buf):
                        self.restored += n
            while self._take():
                pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by close()/write()
            self._error = exc
            while not self._done and self._q.get() is not None:
                pass  # drain: the producer must never block on a dead consumer
            self._done = True

    def write(self, b: bytes | memoryview) -> int:
        if self._error is not None:
            raise self._error
        if not len(b):
            return 0
        data = b if isinstance(b, bytes) else bytes(b)
        self.count += len(data)
        self._q.put(data)
        return len(data)

    def flush(self) -> None:
        pass  # close() waits for everything

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere (its own errors don't matter then)."""
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()

    def close(self) -> None:
        """Wait until every byte is hashed and written; re-raise a write error."""
        self.abort()
        if self._error is not None:
            if isinstance(self._error, zstandard.ZstdError | ImageError):
                raise ImageError(f"zstd round trip of the new image failed ({self._error})",
                                 hint="nothing was stored; report this")
            raise self._error
        if self.frames is not None and not self.frames.complete:
            raise ImageError("zstd round trip of the new image failed (the stream ends "
                             "inside a frame)", hint="nothing was stored; report this")
        self.fh.flush()


def default_name(source: Path) -> str:
    """Image name from the legacy file name: ``win7.000`` -> ``win7``."""
    _first, base, _display = partimage.volume_paths(source)
    return base.name


def fs_names(filesystem: str) -> tuple[str, str]:
    """(filesystem, partclone fs type) of a legacy image's file system; ImageError if none."""
    try:
        return partclone.LEGACY_FS[filesystem]
    except KeyError:
        raise ImageError(f"filesystem {filesystem!r} of the legacy image has no partclone "
                         "equivalent", hint="only ext2/3, FAT16/32, NTFS, ReiserFS, JFS, XFS, "
                         "HFS, UFS and HPFS images can be converted") from None


def legacy_mbrs(info: partimage.LegacyInfo) -> tuple[LegacyMbr, ...]:
    """The MBR backups a legacy image carries, as the manifest keeps them."""
    return tuple(LegacyMbr(device=m.device, sector0_b64=base64.b64encode(m.sector0).decode(),
                           size_kib=m.size_kib) for m in info.mbrs)


def legacy_partition(info: partimage.LegacyInfo, *, index: int, file: str, sha256: str,
                     stream_bytes: int, start_bytes: int = 0, size_bytes: int | None = None,
                     type: str = "") -> Partition:
    """The manifest entry of one converted legacy partition (its zstd partclone stream).

    `size_bytes`: the partition on the disk (default: the legacy partition's size)."""
    fs, pc_fs = fs_names(info.filesystem)
    bs = info.block_size
    return Partition(
        index=index, name=part_name(index), file=file, filesystem=fs, partclone_fs=pc_fs,
        type=type, block_size=bs, total_blocks=info.block_count, used_blocks=info.used_blocks,
        total_bytes=info.block_count * bs, used_bytes=info.used_blocks * bs,
        start_bytes=start_bytes,
        size_bytes=info.partition_size if size_bytes is None else size_bytes, sha256=sha256,
        stream_bytes=stream_bytes, compression="zstd")


def build_manifest(info: partimage.LegacyInfo, *, name: str, source: Path, sha256: str,
                   stream_bytes: int) -> Manifest:
    """The manifest of a converted image (always one partition covering the whole disk)."""
    now = timestamp()
    return Manifest(
        created=now,
        name=name,
        origin=ConvertOrigin(source_path=str(source), identifier=f"0x{info.identifier:016x}",
                             source_format=ImageFormat.PARTIMAGE, legacy=info.to_dict(),
                             converted_at=now),
        disk=Disk(size_bytes=info.partition_size, partition_table=None,
                  legacy_mbr=legacy_mbrs(info)),
        partitions=(legacy_partition(info, index=0, file=PART_FILE, sha256=sha256,
                                     stream_bytes=stream_bytes),),
    )


def convert_legacy(source: Path, dest_dir: Path, *, name: str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   zstd_threads: int = 1, verify: bool | str = CONVERT_VERIFY_DEFAULT,
                   level: int = ZSTD_LEVEL) -> Manifest:
    """Convert the legacy image `source` (``NAME.000`` or an unsplit file) to ``dest_dir/NAME``.

    Checks every volume header, header sum, CHK CRC and the tail while it
    writes; `progress(done_bytes, total_bytes)` is called about every 16 MiB of
    block data.  Returns the manifest.  Raises ImageError (and leaves nothing
    in `dest_dir`) if the source is damaged or anything else fails.
    `zstd_threads`: 1 (default) = compress in one background thread of ours;
    0 = in the calling thread; N >= 2 = zstd's own N worker threads.
    `level`: zstd compression level (default ZSTD_LEVEL = 1; negative = faster).

    `verify` -- what must hold before the image is renamed into place (the
    choice, and the figures behind it: docs/formats.md, "Conversion checks"):

    * ``"written"`` (default, or False): checked while writing, no second pass.
      Input: every volume header, header sum, CHK CRC + position and the tail;
      the partclone CRCs are folded from those checked CRCs.  Output: every
      byte handed to the file is sha256-hashed (the manifest's digest); then
      fsync, and the file size on disk must equal the bytes written.
    * ``"stream"``: "written", and every byte written is decompressed again in
      the writer thread, where zstd checks each frame's content checksum, the
      frame structure is walked (whole frames, each with its checksum, nothing
      else) and the round trip must give exactly the partclone stream's length.
    * ``"full"`` (or True): "stream", then a read-back of the finished
      directory with :func:`ng.verify_image` (sha256 of the file, every
      partclone CRC through zstd) -- ~0.2-0.3 s more per 373 MiB on 2 cores.
    """
    mode = verify_mode(verify)
    source = Path(source)
    name = name or default_name(source)

    def build(tmp: Path) -> Manifest:
        return _convert_into(source, tmp, name, progress, zstd_threads, level,
                             roundtrip=mode != "written")

    return build_image(Path(dest_dir), name, source.name, build, full=mode == "full")


def verify_mode(verify: bool | str) -> str:
    """`verify` as one of CONVERT_VERIFY (True = "full", False = "written"); ValueError else."""
    if verify is True or verify is False:
        verify = "full" if verify else "written"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES} or a bool, not {verify!r}")
    return verify


def build_image(dest_dir: Path, name: str, what: str, build: Callable[[Path], Manifest], *,
                full: bool) -> Manifest:
    """``build(tmp)`` in a fresh ``dest_dir/.NAME.tmp-XXXX``, then renamed to ``dest_dir/NAME``.

    Why one function: nothing may appear at the image's final name before all of
    it is written and checked, whatever was converted.  `build` writes the
    partition files into `tmp` and returns the manifest; this writes the manifest,
    reads the image back with :func:`ng.verify_image` when `full`, and renames it
    into place.  On any failure the temporary directory is removed; an OSError
    becomes an ImageError naming `what` (the source).
    """
    if not IMAGE_NAME.match(name):
        raise ImageError(f"invalid image name {name!r}", hint=IMAGE_NAME_HINT)
    final = dest_dir / name
    if final.exists():
        raise ImageError(f"{final} already exists", hint="choose another name")
    if not dest_dir.is_dir():
        raise ImageError(f"{dest_dir} is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest_dir))
    try:
        manifest = build(tmp)
        ng.write_manifest(tmp, manifest)
        if full:
            ng.verify_image(tmp)
        if final.exists():
            raise ImageError(f"{final} already exists", hint="choose another name")
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        os.rename(tmp, final)
        ng.fsync_dir(dest_dir)
        return manifest
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ImageError | KeyboardInterrupt | SystemExit):
            raise
        if isinstance(exc, OSError):
            raise ImageError(f"converting {what}: {exc.strerror or exc} "
                             f"({exc.filename or dest_dir})") from exc
        raise


def _convert_into(source: Path, tmp: Path, name: str,
                  progress: Callable[[int, int], None] | None,
                  zstd_threads: int, level: int, *, roundtrip: bool) -> Manifest:
    with partimage.PartimageReader(source, exact_sum=False) as reader:
        info = reader.info
        _fs, pc_fs = fs_names(info.filesystem)
        bs = info.block_size
        if info.block_count * bs > info.partition_size:
            raise ImageError(f"{source.name}: {info.block_count} blocks of {bs} bytes do not fit "
                             f"the partition size {info.partition_size}")
        total = info.used_bytes
        report = None if progress is None else (lambda done: progress(done, total))
        sha, count = compress_into(
            tmp / PART_FILE, lambda out: write_partclone(reader, out, pc_fs, report),
            roundtrip=roundtrip, zstd_threads=zstd_threads, level=level)
        if progress is not None:
            progress(total, total)
        return build_manifest(info, name=name, source=source.resolve(), sha256=sha,
                              stream_bytes=count)


def _as_file(sink: _HashingFile) -> IO[bytes]:
    """The sink as python-zstandard's stream_writer is typed to take it: a binary file.

    It needs only write() (and flush(), when there is one), which the sink has;
    with closefd=False it never closes it.
    """
    return cast(IO[bytes], sink)


class _CompressThread:
    """``write()`` sink that compresses in a thread of its own (bounded queue, immutable bytes).

    Why not ``ZstdCompressor(threads=1)``: python-zstandard's multi-threaded
    ``stream_writer.write`` holds the GIL for part of its work, which stalls the
    decode and writer threads; single-threaded zstd in our own thread releases it
    for the whole compression.  Measured on 200 MiB of the bench data next to a
    sha256 loop in another thread (0.45 s alone): zstd -1 with threads=1 0.39 s
    alone, 0.69 s together; threads=0 in a thread 0.41 s alone, 0.54 s together.
    """

    def __init__(self, cctx: zstandard.ZstdCompressor, sink: _HashingFile,
                 depth: int = 8) -> None:
        self._zw = cctx.stream_writer(_as_file(sink), closefd=False, write_size=1 << 20)
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="convert-zstd", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (b := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure
            try:
                self._zw.write(b)
            except BaseException as exc:  # noqa: BLE001 - re-raised by write()/close()
                self._error = exc

    def write(self, b: bytes | memoryview) -> int:
        if self._error is not None:
            raise self._error
        if isinstance(b, memoryview) and not b.readonly or not isinstance(b, bytes | memoryview):
            b = bytes(b)  # only immutable buffers may cross to the other thread
        self._q.put(b)  # type: ignore[arg-type]
        return len(b)

    def stop(self) -> None:
        """Wait for the thread (idempotent); re-raise its error."""
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Compress everything queued and end the frame."""
        self.stop()
        self._zw.flush(zstandard.FLUSH_FRAME)


def write_partclone(reader: partimage.PartimageReader, out: Any, pc_fs: str,
                    progress: Callable[[int], None] | None = None) -> int:
    """The partclone 0002 stream of the reader's blocks, written to `out` (``write()``).

    Every CHK CRC is checked by the reader as the data passes and handed on as the
    partclone CRC of its group.  `progress(done_bytes)` is called about every 16 MiB
    of block data.  Returns the length of the partclone stream."""
    info = reader.info
    writer = partclone.PartcloneWriter(
        out, fs_type=pc_fs, device_size=info.partition_size, total_blocks=info.block_count,
        block_size=info.block_size, bitmap=reader.bitmap, used_blocks=info.used_blocks)
    done = 0
    step = 16 << 20
    next_report = step
    for piece in reader.data():
        writer.write(piece, reader.chunk_crc)
        done += len(piece)
        if progress is not None and done >= next_report:
            progress(done)
            next_report = done + step
    writer.close()
    return writer.stream_bytes


def compress_into(path: Path, fill: Callable[[Any], int], *, roundtrip: bool = True,
                  zstd_threads: int = 1, level: int = ZSTD_LEVEL) -> tuple[str, int]:
    """Write the stream `fill(out)` produces (through ``out.write``) to `path` as zstd.

    The checks of a conversion's output (see :func:`convert_legacy`): sha256 of
    every byte handed to the file, fsync and the size on disk; with `roundtrip`
    (``verify="stream"``) also the zstd round trip with every frame checksum and
    the frame structure, whose length must equal what `fill` returns (its stream
    length).  `zstd_threads`: 1 (default) = compress in one background thread of
    ours (:class:`_CompressThread`); 0 = in the calling thread; N >= 2 = zstd's own
    N worker threads.  Returns (sha256, compressed bytes).
    """
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=zstd_threads if zstd_threads >= 2 else 0, write_checksum=True)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with open(path, "wb") as fh:
        sink = _HashingFile(fh, roundtrip=roundtrip)
        try:
            out: Any = (_CompressThread(cctx, sink) if zstd_threads == 1
                        else cctx.stream_writer(_as_file(sink), closefd=False, write_size=1 << 20))
            try:
                length = fill(out)
                if isinstance(out, _CompressThread):
                    out.close()
                else:
                    out.flush(zstandard.FLUSH_FRAME)
            finally:
                if isinstance(out, _CompressThread):
                    with contextlib.suppress(BaseException):
                        out.stop()
        except BaseException:
            sink.abort()  # the first error is the one to report
            raise
        sink.close()
        fh.flush()
        os.fsync(fh.fileno())
        on_disk = os.fstat(fh.fileno()).st_size
    if on_disk != sink.count:
        raise ImageError(f"{path.name}: {on_disk} bytes on disk, {sink.count} written")
    if roundtrip and sink.restored != length:
        raise ImageError(f"zstd round trip of {path.name} gave {sink.restored} bytes, "
                         f"expected {length}", hint="nothing was stored; report this")
    with contextlib.suppress(OSError):
        os.chmod(path, 0o644)
    return sink.sha.hexdigest(), sink.count
