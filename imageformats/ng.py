"""The partimage-ng image directory: manifest.json and whole-image verification.

A partimage-ng image is a directory holding ``manifest.json`` and, per
partition, one partclone 0002 stream compressed with zstd (``partN.ptcl.zst``).
The node agent writes the same layout for captures and this module writes it
for conversions, so the manifest keys are fixed here in one place
(:func:`validate_manifest`) and both sides are checked by the same code.

:func:`verify_image` checks *any* image the farm may hold -- a partimage-ng
directory (sha256 of every stream and every partclone CRC through zstd) or a
legacy partimage image (every CRC, see :mod:`.partimage`) -- and raises
ImageError on the first failure.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from imgfarm.errors import ImageError
from imgfarm.imageformats import partclone, partimage

FORMAT = "partimage-ng"
VERSION = 1
MANIFEST = "manifest.json"
PARTITION_KEYS: dict[str, type] = {
    "index": int, "name": str, "file": str, "filesystem": str, "partclone_fs": str,
    "block_size": int, "total_blocks": int, "used_blocks": int, "total_bytes": int,
    "used_bytes": int, "start_bytes": int, "size_bytes": int, "sha256": str,
    "stream_bytes": int, "compression": str,
}
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def utc_now() -> str:
    """Timestamps in manifests: UTC, second resolution, ``Z`` suffix."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ======================================================================================
# Manifest
# ======================================================================================
def validate_manifest(m: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Check a manifest's structure (capture or convert origin); return it.

    Hand-written rather than jsonschema because it runs on workers and nodes
    where only the runtime dependencies are installed.
    """

    def bad(msg: str) -> ImageError:
        return ImageError(f"{where}: {msg}", hint="the manifest is not a partimage-ng manifest")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT:
        raise bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise bad(f"unsupported version {m.get('version')!r} (this farm reads {VERSION})")
    for key, typ in (("created", str), ("name", str), ("origin", dict), ("disk", dict),
                     ("partitions", list)):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key!r} is missing or not a {typ.__name__}")
    origin = m["origin"]
    if origin.get("kind") not in ("convert", "capture"):
        raise bad(f"origin.kind is {origin.get('kind')!r}, expected 'convert' or 'capture'")
    disk = m["disk"]
    if not isinstance(disk.get("size_bytes"), int) or disk["size_bytes"] < 0:
        raise bad("disk.size_bytes is missing or not a non-negative integer")
    pt = disk.get("partition_table")
    if pt is not None and not (isinstance(pt, dict) and pt.get("type") in ("dos", "gpt")
                               and isinstance(pt.get("sfdisk"), str)):
        raise bad("disk.partition_table must be null or {type: dos|gpt, sfdisk: text}")
    if not m["partitions"]:
        raise bad("no partitions")
    seen: set[str] = set()
    for i, p in enumerate(m["partitions"]):
        if not isinstance(p, dict):
            raise bad(f"partitions[{i}] is not an object")
        for key, want in PARTITION_KEYS.items():
            v = p.get(key)
            if not isinstance(v, want) or isinstance(v, bool):
                raise bad(f"partitions[{i}].{key} is missing or not a {want.__name__}")
            if isinstance(v, int) and v < 0:
                raise bad(f"partitions[{i}].{key} is negative")
        if not _SAFE_FILE.match(p["file"]) or p["file"] in seen:
            raise bad(f"partitions[{i}].file {p['file']!r} is not a plain, unique file name")
        seen.add(p["file"])
        if p["compression"] != "zstd":
            raise bad(f"partitions[{i}].compression {p['compression']!r} is not supported")
        if not _SHA256.match(p["sha256"]):
            raise bad(f"partitions[{i}].sha256 is not a hex sha256")
        if p["used_blocks"] > p["total_blocks"] or p["block_size"] <= 0:
            raise bad(f"partitions[{i}]: inconsistent block counts")
    return m


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate ``manifest.json`` (path of the image directory or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ImageError(f"{p}: no manifest", hint="not a partimage-ng image directory") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot read the manifest ({exc.strerror})") from exc
    try:
        m = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImageError(f"{p}: manifest is not valid JSON ({exc})") from exc
    return validate_manifest(m, str(p))


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Validate, then write ``manifest.json`` atomically and durably (tmp, fsync, rename)."""
    validate_manifest(manifest)
    d = Path(directory)
    target = d / MANIFEST
    tmp = d / f".{MANIFEST}.tmp"
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(d)
    return target


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
    format: str  # "partimage-ng" or "partimage"
    partitions: list[PartitionReport] = field(default_factory=list)
    legacy: partimage.ReadResult | None = None
    legacy_info: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return True  # a report only exists when every check passed


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


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


def verify_partition(directory: Path, p: dict[str, Any],
                     progress: Callable[[int, int], None] | None = None) -> PartitionReport:
    """Check one partition stream against its manifest entry.

    Three things run at once: a thread hashes the .zst file, a thread
    decompresses it, and the caller checks every partclone CRC.
    """
    path = directory / p["file"]
    where = f"{directory.name}/{p['file']}"
    if not path.is_file():
        raise ImageError(f"{where} is missing")
    hashed: dict[str, Any] = {}

    def hasher() -> None:
        try:
            hashed["sha"] = _hash_file(path)
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
    if digest != p["sha256"]:
        raise ImageError(f"{where}: sha256 mismatch (file {digest}, manifest {p['sha256']})")
    if size != p["stream_bytes"]:
        raise ImageError(f"{where}: {size} bytes, the manifest says {p['stream_bytes']}")
    for key, val in (("block_size", h.block_size), ("total_blocks", h.total_blocks),
                     ("used_blocks", h.used_blocks), ("partclone_fs", h.fs_type)):
        if p[key] != val:
            raise ImageError(f"{where}: {key} is {val!r} in the stream, {p[key]!r} in the manifest")
    return PartitionReport(index=p["index"], file=p["file"], sha256=digest,
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
        report = VerifyReport(path=str(p), format=FORMAT, manifest=m)
        for part in m["partitions"]:
            report.partitions.append(verify_partition(p, part, progress))
        return report
    with partimage.PartimageReader(p) as r:
        result = r.verify(progress)
        return VerifyReport(path=str(p), format="partimage", legacy=result,
                            legacy_info=r.info.to_dict())
