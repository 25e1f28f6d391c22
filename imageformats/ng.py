"""The partimage-ng image directory: manifest.json and whole-image verification.

A partimage-ng image is a directory holding ``manifest.json`` and, per
partition, one partclone 0002 stream compressed with zstd (``partN.ptcl.zst``).
The node agent writes the same layout for captures and the converter writes it
for conversions; both build the one :class:`imgfarm.protocol.Manifest`, so the
manifest's keys and rules have one definition, checked by the same code.

:func:`verify_image` checks *any* image the farm may hold -- a partimage-ng
directory (sha256 of every stream and every partclone CRC through zstd) or a
legacy partimage image (every CRC, see :mod:`.partimage`) -- and raises
ImageError on the first failure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from imgfarm.errors import ImageError
from imgfarm.imageformats import partclone, partimage
from imgfarm.protocol import MANIFEST_FILE, ImageFormat, Manifest, Partition, ProtocolError, sha256_file

_NOT_NG = f"the manifest is not a {ImageFormat.NG} manifest"


def validate_manifest(m: Any, where: str = MANIFEST_FILE) -> Manifest:
    """The manifest in the JSON object `m` (from the agent or the converter), checked.

    The rules are the protocol's (imgfarm.protocol.Manifest): the agent reads
    and writes the same type, so both sides are checked by the same code.
    """
    if isinstance(m, Manifest):
        return m
    try:
        return Manifest.from_json(m)
    except ProtocolError as exc:
        raise ImageError(f"{where}: {exc}", hint=_NOT_NG) from None


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Load and validate ``manifest.json`` (path of the image directory or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ImageError(f"{p}: no manifest", hint=f"not a {ImageFormat.NG} image directory") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot read the manifest ({exc.strerror})") from exc
    try:
        return Manifest.from_text(text)
    except ProtocolError as exc:
        raise ImageError(f"{p}: {exc}", hint=_NOT_NG) from None


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically and durably (tmp, fsync, rename, fsync dir)."""
    return manifest.save(directory)


def fsync_dir(d: str | os.PathLike[str]) -> None:
    """Make a rename/creation in `d` durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ======================================================================================
# Verification
# ======================================================================================
@dataclass
class PartitionReport:
    index: int
    file: str
    sha256: str
    stream_bytes: int
    data_bytes: int
    checksums: int


@dataclass
class VerifyReport:
    """What :func:`verify_image` checked."""

    path: str
    format: ImageFormat
    partitions: list[PartitionReport] = field(default_factory=list)
    legacy: partimage.ReadResult | None = None
    legacy_info: dict[str, Any] | None = None
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return True  # a report only exists when every check passed


class _PrefetchReader:
    """``read(n)`` over a stream that a background thread reads ahead (bounded).

    Lets zstd decompression (in the thread) overlap the CRC checks (in the caller).
    """

    def __init__(self, src: Any, chunk: int = 1 << 20, depth: int = 4) -> None:
        def gen() -> Any:
            while b := src.read(chunk):
                yield b

        self._pf = partimage._Prefetch(gen(), depth)
        self._it = iter(self._pf)
        self._buf = memoryview(b"")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        out = []
        left = n if n >= 0 else 1 << 62
        while left > 0:
            if self._pos >= len(self._buf):
                nxt = next(self._it, None)
                if nxt is None:
                    break
                self._buf, self._pos = memoryview(nxt), 0
            piece = self._buf[self._pos : self._pos + left]
            self._pos += len(piece)
            left -= len(piece)
            out.append(piece)
        return b"".join(out)

    def close(self) -> None:
        self._pf.close()


def verify_partition(directory: Path, p: Partition,
                     progress: Callable[[int, int], None] | None = None) -> PartitionReport:
    """Check one partition stream against its manifest entry.

    Three things run at once: a thread hashes the .zst file, a thread
    decompresses it, and the caller checks every partclone CRC.
    """
    path = directory / p.file
    where = f"{directory.name}/{p.file}"
    if not path.is_file():
        raise ImageError(f"{where} is missing")
    hashed: dict[str, Any] = {}

    def hasher() -> None:
        try:
            hashed["sha"] = sha256_file(path)
        except OSError as exc:
            hashed["err"] = exc

    t = threading.Thread(target=hasher, name="verify-sha256", daemon=True)
    t.start()
    try:
        with open(path, "rb") as fh:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(fh, read_size=1 << 20, read_across_frames=True) as zr:
                pre = _PrefetchReader(zr)
                try:
                    report = partclone.verify_stream(pre, where, progress)
                finally:
                    pre.close()
    except zstandard.ZstdError as exc:
        raise ImageError(f"{where}: corrupt zstd stream ({exc})") from exc
    except OSError as exc:
        raise ImageError(f"{where}: cannot read ({exc.strerror})") from exc
    finally:
        t.join()
    if "err" in hashed:
        raise ImageError(f"{where}: cannot read ({hashed['err'].strerror})")
    digest, size = hashed["sha"]
    h = report.header
    if digest != p.sha256:
        raise ImageError(f"{where}: sha256 mismatch (file {digest}, manifest {p.sha256})")
    if size != p.stream_bytes:
        raise ImageError(f"{where}: {size} bytes, the manifest says {p.stream_bytes}")
    for key, val in (("block_size", h.block_size), ("total_blocks", h.total_blocks),
                     ("used_blocks", h.used_blocks), ("partclone_fs", h.fs_type)):
        if getattr(p, key) != val:
            raise ImageError(f"{where}: {key} is {val!r} in the stream, {getattr(p, key)!r} in the manifest")
    return PartitionReport(index=p.index, file=p.file, sha256=digest,
                           stream_bytes=size, data_bytes=report.data_bytes,
                           checksums=report.checksums)


def verify_image(path: str | os.PathLike[str],
                 progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every byte of an image the farm may hold; raise ImageError on the first fault.

    * a directory: a partimage-ng image -- the manifest, then for each partition
      the sha256 of its .zst file and every partclone CRC of the decompressed stream;
    * a file (``NAME.000``, ``NAME``): a legacy partimage image -- volume headers,
      header sums, every CHK CRC and position, the tail.
    """
    p = Path(path)
    if p.is_dir():
        m = read_manifest(p)
        report = VerifyReport(path=str(p), format=ImageFormat.NG, manifest=m)
        for part in m.partitions:
            report.partitions.append(verify_partition(p, part, progress))
        return report
    with partimage.PartimageReader(p) as r:
        result = r.verify(progress)
        return VerifyReport(path=str(p), format=ImageFormat.PARTIMAGE, legacy=result,
                            legacy_info=r.info.to_dict())
