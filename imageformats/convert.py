"""Convert a legacy partimage image into a partimage-ng image directory.

Why streaming and threaded: legacy images are tens of gigabytes and the
convert queue's workers have few cores.  One pass reads the volumes, checks
every CRC and writes the partclone stream through zstd, with the work spread
over threads that release the GIL (zlib/bz2 decompression in the reader's
decode thread; CRC, byte sum and stream assembly in the calling thread; zstd
compression in zstd's own worker thread).  Queues are bounded and the data
moves as slices of the decompressed chunks, so memory stays flat whatever
the image size.

Atomicity: everything is written into ``dest_dir/.NAME.tmp-XXXX/``, fsynced,
verified by reading it back, and only then renamed to ``dest_dir/NAME``.  On
any failure the temporary directory is removed and nothing that looks like an
image is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from imgfarm.errors import ImageError
from imgfarm.imageformats import ng, partclone, partimage

PART_FILE = "part0.ptcl.zst"
# zstd level 1: on the bench image (1/3 text, 1/3 random, 1/6 zeros) it compresses *better*
# than 3 (ratio 2.31 vs 2.26) at half the CPU (0.55 s vs 1.03 s for 373 MiB); figures for
# levels -5..3 in bench/README.md ("convert").  Pass level= for another trade-off.
ZSTD_LEVEL = 1
VERIFY_MODES = ("stream", "full", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _HashingFile:
    """Write-only sink: file + sha256 + byte count (+ zstd round trip), in a background thread.

    zstd hands its output to ``write`` from the converting thread; hashing and
    writing it there would put ~0.3 s/GiB more on that already busy thread, so a
    bounded queue passes the (immutable) bytes to a thread of their own.

    `roundtrip=True` also decompresses every byte written (output discarded):
    zstd checks each frame's content checksum (XXH64 of what the compressor was
    given), so a compressed stream that would not restore to the partclone
    stream we produced is caught before anything is renamed into place.
    """

    def __init__(self, fh: Any, depth: int = 8, roundtrip: bool = False) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.count = 0
        self.restored = 0  # decompressed bytes (roundtrip)
        self._dctx = zstandard.ZstdDecompressor() if roundtrip else None
        self._dobj: Any = self._dctx.decompressobj() if self._dctx is not None else None
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="convert-write", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (b := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure
            try:
                self.fh.write(b)
                self.sha.update(b)
                while self._dobj is not None and b:
                    if self._dobj.eof:  # the next frame
                        self._dobj = self._dctx.decompressobj()  # type: ignore[union-attr]
                    self.restored += len(self._dobj.decompress(b))
                    b = self._dobj.unused_data if self._dobj.eof else b""
            except BaseException as exc:  # noqa: BLE001 - re-raised by close()/write()
                self._error = exc

    def write(self, b: bytes | memoryview) -> int:
        if self._error is not None:
            raise self._error
        data = b if isinstance(b, bytes) else bytes(b)
        self.count += len(data)
        self._q.put(data)
        return len(data)

    def flush(self) -> None:
        pass  # close() waits for everything

    def close(self) -> None:
        """Wait until every byte is hashed and written; re-raise a write error."""
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()
        if self._error is not None:
            if isinstance(self._error, zstandard.ZstdError):
                raise ImageError(f"zstd round trip of the new image failed ({self._error})",
                                 hint="nothing was stored; report this")
            raise self._error
        if self._dobj is not None and not self._dobj.eof:
            raise ImageError("zstd round trip of the new image failed (stream ends inside "
                             "a frame)", hint="nothing was stored; report this")
        self.fh.flush()


def default_name(source: Path) -> str:
    """Image name from the legacy file name: ``win7.000`` -> ``win7``."""
    _first, base, _display = partimage.volume_paths(source)
    return base.name


def _fs_names(filesystem: str) -> tuple[str, str]:
    try:
        return partclone.LEGACY_FS[filesystem]
    except KeyError:
        raise ImageError(f"filesystem {filesystem!r} of the legacy image has no partclone "
                         "equivalent", hint="only ext2/3, FAT16/32, NTFS, ReiserFS, JFS, XFS, "
                         "HFS, UFS and HPFS images can be converted") from None


def build_manifest(info: partimage.LegacyInfo, *, name: str, source: Path, sha256: str,
                   stream_bytes: int, fs: str, pc_fs: str) -> dict[str, Any]:
    """The manifest of a converted image (always one partition covering the whole disk)."""
    now = ng.utc_now()
    bs = info.block_size
    return {
        "format": ng.FORMAT,
        "version": ng.VERSION,
        "created": now,
        "name": name,
        "origin": {
            "kind": "convert",
            "source_path": str(source),
            "identifier": f"0x{info.identifier:016x}",
            "source_format": "partimage",
            "legacy": info.to_dict(),
            "converted_at": now,
        },
        "disk": {
            "size_bytes": info.partition_size,
            "partition_table": None,
            "legacy_mbr": [
                {"device": m.device, "sector0_b64": base64.b64encode(m.sector0).decode(),
                 "size_kib": m.size_kib}
                for m in info.mbrs
            ],
        },
        "partitions": [
            {
                "index": 0, "name": "part0", "file": PART_FILE, "filesystem": fs,
                "partclone_fs": pc_fs, "block_size": bs, "total_blocks": info.block_count,
                "used_blocks": info.used_blocks, "total_bytes": info.block_count * bs,
                "used_bytes": info.used_blocks * bs, "start_bytes": 0,
                "size_bytes": info.partition_size, "sha256": sha256,
                "stream_bytes": stream_bytes, "compression": "zstd",
            }
        ],
    }


def convert_legacy(source: Path, dest_dir: Path, *, name: str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   zstd_threads: int = 1, verify: bool | str = "stream",
                   level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """Convert the legacy image `source` (``NAME.000`` or an unsplit file) to ``dest_dir/NAME``.

    Checks every volume header, header sum, CHK CRC and the tail while it
    writes; `progress(done_bytes, total_bytes)` is called about every 16 MiB of
    block data.  Returns the manifest.  Raises ImageError (and leaves nothing
    in `dest_dir`) if the source is damaged or anything else fails.
    `zstd_threads`: zstd worker threads (1 = compress in one background thread,
    overlapping the reader; 0 = compress in the calling thread).
    `level`: zstd compression level (default ZSTD_LEVEL = 1; negative = faster).

    `verify` -- what must hold before the image is renamed into place:

    * ``"stream"`` (default): checked while writing, no second pass.  Input:
      every volume header, header sum, CHK CRC + position and the tail; the
      partclone CRCs are folded from those checked CRCs.  Output: every byte
      handed to the file is sha256-hashed (the manifest's digest) and
      decompressed again in the writer thread, where zstd checks each frame's
      content checksum; the round trip must give exactly the partclone
      stream's length; then fsync and the file size on disk == bytes written.
    * ``"full"`` (or True): "stream", then a read-back of the finished
      directory with :func:`ng.verify_image` (sha256 of the file, every
      partclone CRC through zstd) -- about 40 % more time.
    * ``"none"`` (or False): "stream" without the zstd round trip.
    """
    if verify is True or verify is False:
        verify = "full" if verify else "none"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES} or a bool, not {verify!r}")
    source = Path(source)
    dest_dir = Path(dest_dir)
    name = name or default_name(source)
    if not _NAME.match(name):
        raise ImageError(f"invalid image name {name!r}",
                         hint="use letters, digits, '.', '_' and '-', not starting with '.'")
    final = dest_dir / name
    if final.exists():
        raise ImageError(f"{final} already exists", hint="choose another name")
    if not dest_dir.is_dir():
        raise ImageError(f"{dest_dir} is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest_dir))
    try:
        manifest = _convert_into(source, tmp, name, progress, zstd_threads, level,
                                 roundtrip=verify != "none")
        ng.write_manifest(tmp, manifest)
        if verify == "full":
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
            raise ImageError(f"converting {source.name}: {exc.strerror or exc} "
                             f"({exc.filename or dest_dir})") from exc
        raise


def _convert_into(source: Path, tmp: Path, name: str,
                  progress: Callable[[int, int], None] | None,
                  zstd_threads: int, level: int, *, roundtrip: bool) -> dict[str, Any]:
    with partimage.PartimageReader(source, exact_sum=False) as reader:
        info = reader.info
        fs, pc_fs = _fs_names(info.filesystem)
        bs = info.block_size
        if info.block_count * bs > info.partition_size:
            raise ImageError(f"{source.name}: {info.block_count} blocks of {bs} bytes do not fit "
                             f"the partition size {info.partition_size}")
        total = info.used_bytes
        out_path = tmp / PART_FILE
        with open(out_path, "wb") as fh:
            sink = _HashingFile(fh, roundtrip=roundtrip)
            try:
                pc_bytes = _write_stream(reader, sink, pc_fs, progress, zstd_threads, level)
            finally:
                sink.close()
            fh.flush()
            os.fsync(fh.fileno())
            on_disk = os.fstat(fh.fileno()).st_size
        if on_disk != sink.count:
            raise ImageError(f"{out_path.name}: {on_disk} bytes on disk, {sink.count} written")
        if roundtrip and sink.restored != pc_bytes:
            raise ImageError(f"zstd round trip of the new image gave {sink.restored} bytes, "
                             f"expected {pc_bytes}", hint="nothing was stored; report this")
        if progress is not None:
            progress(total, total)
        with contextlib.suppress(OSError):
            os.chmod(out_path, 0o644)
        return build_manifest(info, name=name, source=source.resolve(),
                              sha256=sink.sha.hexdigest(), stream_bytes=sink.count,
                              fs=fs, pc_fs=pc_fs)


def _write_stream(reader: partimage.PartimageReader, sink: _HashingFile, pc_fs: str,
                  progress: Callable[[int, int], None] | None, zstd_threads: int,
                  level: int = ZSTD_LEVEL) -> int:
    """The partclone stream of the reader's blocks, through zstd, into `sink`.

    Returns the length of the (uncompressed) partclone stream."""
    info = reader.info
    total = info.used_bytes
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=zstd_threads, write_checksum=True)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with cctx.stream_writer(sink, closefd=False, write_size=1 << 20) as zw:
        writer = partclone.PartcloneWriter(
            zw, fs_type=pc_fs, device_size=info.partition_size, total_blocks=info.block_count,
            block_size=info.block_size, bitmap=reader.bitmap, used_blocks=info.used_blocks)
        done = 0
        step = 16 << 20
        next_report = step
        for piece in reader.data():
            writer.write(piece, reader.chunk_crc)
            done += len(piece)
            if progress is not None and done >= next_report:
                progress(done, total)
                next_report = done + step
        writer.close()
        zw.flush(zstandard.FLUSH_FRAME)
    return writer.stream_bytes
