"""The outer layer of a legacy archive: `split` pieces and one compression around a stream.

Why: sites rarely kept partimage's own ``NAME.000`` volumes.  Clonezilla, the
most common front end, wrote ``partimage -z0 ... stdout | gzip -c | split -a 2
-b 4096MB - DIR/sda1.`` (and the same with bzip2, lzop, pigz, pbzip2, xz or
zstd; partclone partitions the same way), so the bytes on disk are one stream,
compressed from outside the tool, cut into ``sda1.aa``, ``sda1.ab``, ...  This
module finds and checks those pieces, reads them as one stream, and removes
the one compression layer, which it recognises by content, never by name.

Everything streams: compressed bytes are read 1 MiB at a time and output
comes in pieces of at most 4 MiB, so memory does not depend on the archive's
size.  Every fault is an :class:`ImageError` that names the piece: a missing
middle piece, a piece shorter than its siblings, a stream cut short, damaged
compressed data.

gzip (several members too, as pigz writes them), bzip2 (several streams, as
pbzip2 writes them), xz and legacy .lzma are decoded in-process (zlib or
ISA-L, bz2, lzma).  zstd and lzop run as Debian's ``zstd -dc`` and ``lzop
-dc`` behind a pipe: both check their own checksums and refuse a cut stream,
and lzop has no maintained Python binding of its file format.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from imgfarm.errors import ImageError

_isal_zlib: Any
try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - optional dependency
    _isal_zlib = None
# gzip: ISA-L's inflate (python-isal, optional) is ~2x zlib's, with the same API and the
# same checks (trailer CRC32 + ISIZE).  IMGFARM_INFLATE=zlib forces zlib (bench comparisons).
INFLATE = ("isal" if _isal_zlib is not None and os.environ.get("IMGFARM_INFLATE") != "zlib"
           else "zlib")
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    (zlib.error,) if _isal_zlib is None else (zlib.error, _isal_zlib.error))
# what damaged compressed data raises while it is decoded
CORRUPT_DATA: tuple[type[BaseException], ...] = (*_INFLATE_ERRORS, OSError, EOFError,
                                                  ValueError, lzma.LZMAError)

READ_SIZE = 1 << 20  # compressed bytes read per call
OUT_SIZE = 4 << 20  # decompressed bytes per piece at most (bounds memory)

# the kinds `detect` tells apart; PIPED run as a Debian tool behind a pipe
KINDS = ("gzip", "bzip2", "xz", "lzma", "zstd", "lzo", "none")
PIPED = {"zstd": ("zstd", "-dcq"), "lzo": ("lzop", "-dc")}
NATIVE = ("gzip", "bzip2", "xz", "lzma")

# `split -a N` suffixes: aa, ab, ... (N = 2, Clonezilla's default) or aaa, ... (N = 3)
_SPLIT_SUFFIX = re.compile(r"^(?P<base>.+)\.(?P<suffix>[a-z]{2,3})$")
MAX_PIECES = 26 ** 3


def detect(head: bytes) -> str:
    """The compression of a stream from its first bytes (16 are enough); "unknown" if none.

    "none" is returned for anything else that is not empty: the caller checks the
    magic of what it expects underneath.  The order matters only for lzop, whose
    magic (``89 'LZO' 00``) is what partimage itself tests at bytes 1-3.
    """
    if head[1:4] == b"LZO":
        return "lzo"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[:3] == b"\x5d\x00\x00":
        return "lzma"
    return "none" if head else "unknown"


def _suffix_index(suffix: str) -> int:
    n = 0
    for ch in suffix:
        n = n * 26 + ord(ch) - 97
    return n


def _suffix(index: int, width: int) -> str:
    out = ""
    for _ in range(width):
        index, r = divmod(index, 26)
        out = chr(97 + r) + out
    return out


def split_pieces(path: str | os.PathLike[str]) -> list[Path] | None:
    """The pieces of the `split` set `path` belongs to, in order; None if it is not one.

    `path` is any piece (``sda1.ab``) or the set's base name (``sda1`` when only
    ``sda1.aa``, ... exist).  A set must start at ``.aa`` (``.aaa``): that is
    what tells ``disk.img`` (one file) from a piece.  The names must run on
    without a gap -- a missing middle piece is refused by name -- and every
    piece but the last must have the first one's size (``split -b`` cuts equal
    pieces), so a piece cut short is refused by name too.  A missing *last*
    piece cannot be seen here; the stream then ends early, and the decoder's
    error names the last piece present.
    """
    p = Path(path)
    m = _SPLIT_SUFFIX.match(p.name)
    if m is not None:
        base, width = m.group("base"), len(m.group("suffix"))
    elif not p.exists():
        base, width = p.name, 0
        for w in (2, 3):
            if p.with_name(f"{base}.{'a' * w}").is_file():
                width = w
                break
        if not width:
            return None
    else:
        return None
    directory = p.parent
    if not directory.joinpath(f"{base}.{'a' * width}").is_file():
        return None  # a name that only looks like a piece (disk.img)
    pattern = re.compile(rf"^{re.escape(base)}\.([a-z]{{{width}}})$")
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise ImageError(f"{directory}: cannot list ({exc.strerror})") from exc
    for entry in entries:
        mm = pattern.match(entry.name)
        if mm is not None and entry.is_file():
            found[_suffix_index(mm.group(1))] = directory / entry.name
            if len(found) > MAX_PIECES:
                raise ImageError(f"{directory}: more than {MAX_PIECES} pieces named {base}.*")
    pieces: list[Path] = []
    for i in range(max(found) + 1):
        if i not in found:
            missing = f"{base}.{_suffix(i, width)}"
            raise ImageError(
                f"{missing} is missing: the split set {base}.{'a' * width} ... "
                f"{found[max(found)].name} has a gap there",
                hint="copy every piece of the set into the same directory")
        pieces.append(found[i])
    check_piece_sizes(pieces)
    return pieces


def check_piece_sizes(pieces: list[Path]) -> None:
    """Every piece but the last has the first one's size; the last is not larger, not empty."""
    sizes = []
    for piece in pieces:
        try:
            sizes.append(piece.stat().st_size)
        except OSError as exc:
            raise ImageError(f"{piece.name}: cannot read ({exc.strerror})") from exc
    if len(pieces) < 2:
        return
    first = sizes[0]
    for piece, size in zip(pieces[1:-1], sizes[1:-1], strict=True):
        if size != first:
            raise ImageError(
                f"{piece.name} is {size} bytes, but {pieces[0].name} is {first}: "
                f"every piece of a split set but the last has the same size, so "
                f"{piece.name} was {'cut short' if size < first else 'not made by the same split'}",
                hint="copy that piece again from the original")
    if sizes[-1] > first or sizes[-1] == 0:
        raise ImageError(f"{pieces[-1].name} is {sizes[-1]} bytes, the other pieces {first}: "
                         "it does not belong to this split set",
                         hint="copy that piece again from the original")


class Pieces:
    """The concatenated bytes of one or more files, read in order, remembering where it is."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("no files")
        self.paths = paths
        self._i = -1
        self._fh: IO[bytes] | None = None
        self.current = paths[0]
        self.bytes_read = 0

    @property
    def name(self) -> str:
        """How errors name the stream: the file, or the set (``sda1.aa ... sda1.ac``)."""
        if len(self.paths) == 1:
            return self.paths[0].name
        return f"{self.paths[0].name} ... {self.paths[-1].name}"

    @property
    def last(self) -> Path:
        return self.paths[-1]

    def _open_next(self) -> bool:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._i += 1
        if self._i >= len(self.paths):
            return False
        self.current = self.paths[self._i]
        try:
            self._fh = open(self.current, "rb")  # noqa: SIM115 - closed by close()/_open_next()
        except FileNotFoundError:
            raise ImageError(f"{self.current.name}: no such file") from None
        except OSError as exc:
            raise ImageError(f"{self.current.name}: cannot open ({exc.strerror})") from exc
        return True

    def head(self, n: int = 16) -> bytes:
        """The first n bytes of the stream (at most), without consuming them."""
        with open(self.paths[0], "rb") as fh:
            return fh.read(n)

    def read(self, n: int = READ_SIZE) -> bytes:
        """Up to n bytes, from the current file; b"" after the last one."""
        while True:
            if self._fh is None and not self._open_next():
                return b""
            assert self._fh is not None
            try:
                data = self._fh.read(n)
            except OSError as exc:
                raise ImageError(f"{self.current.name}: read error ({exc.strerror})") from exc
            if data:
                self.bytes_read += len(data)
                return data
            if not self._open_next():
                return b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Pieces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Decompressor:
    """One in-process decompressor with bounded output pieces (gzip, bzip2, xz, lzma, none).

    Concatenated gzip members and bzip2/xz streams are read as one stream, the
    way gzip -d and bzip2 -d read what pigz and pbzip2 write.
    """

    def __init__(self, kind: str) -> None:
        if kind not in (*NATIVE, "none"):
            raise ValueError(f"no in-process decoder for {kind}")
        self.kind = kind
        self._new()

    def _new(self) -> None:
        if self.kind == "gzip":
            mod = _isal_zlib if INFLATE == "isal" else zlib
            self.obj: Any = mod.decompressobj(31)
        elif self.kind == "bzip2":
            self.obj = bz2.BZ2Decompressor()
        elif self.kind == "xz":
            self.obj = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        elif self.kind == "lzma":
            self.obj = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
        else:
            self.obj = None
        self.started = False

    @property
    def at_stream_end(self) -> bool:
        return self.obj is None or (self.obj.eof if self.started else True)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompress `data`, yielding pieces of at most OUT_SIZE bytes."""
        if self.obj is None:
            if data:
                yield data
            return
        while data:
            self.started = True
            if self.kind == "gzip":
                out = self.obj.decompress(data, OUT_SIZE)
                if out:
                    yield out
                if self.obj.eof:
                    rest = self.obj.unused_data
                    self._new()  # concatenated gzip members
                    data = rest
                    continue
                data = self.obj.unconsumed_tail
                if not data:
                    if len(out) < OUT_SIZE:
                        return
                    data = b""
                    while True:  # drain output held back by the max_length limit
                        out = self.obj.decompress(b"", OUT_SIZE)
                        if out:
                            yield out
                        if self.obj.eof or len(out) < OUT_SIZE:
                            break
                    if self.obj.eof:
                        rest = self.obj.unused_data
                        self._new()
                        data = rest
                    else:
                        data = self.obj.unconsumed_tail
            else:
                out = self.obj.decompress(data, OUT_SIZE)
                if out:
                    yield out
                if self.obj.eof:
                    rest = self.obj.unused_data
                    self._new()
                    data = rest
                    continue
                data = b""
                while not self.obj.needs_input and not self.obj.eof:
                    out = self.obj.decompress(b"", OUT_SIZE)
                    if out:
                        yield out
                    elif not self.obj.needs_input:
                        break
                if self.obj.eof:
                    rest = self.obj.unused_data
                    self._new()
                    data = rest


def _cut_hint(src: Pieces) -> str:
    if len(src.paths) > 1:
        return (f"{src.last.name} (the last piece present) was cut short, or pieces after it "
                "are missing")
    return "the file was cut short"


def decode(src: Pieces, kind: str) -> Iterator[bytes]:
    """The decompressed stream of `src` (compressed as `kind`), in pieces of at most 4 MiB.

    Raises ImageError naming the piece when the data is damaged and naming the
    last piece when the stream is cut short; a decoder that stops before all
    input is used up counts as damage, not as success.
    """
    if kind in PIPED:
        yield from _decode_piped(src, kind)
        return
    dec = Decompressor(kind)
    got_any = False
    while True:
        raw = src.read(READ_SIZE)
        if not raw:
            break
        got_any = True
        try:
            yield from dec.feed(raw)
        except CORRUPT_DATA as exc:
            raise ImageError(f"{src.current.name}: corrupt {kind} data ({exc})",
                             hint="the file is damaged; copy it again from the original"
                             ) from exc
    if not got_any:
        raise ImageError(f"{src.current.name}: empty file")
    if not dec.at_stream_end:
        raise ImageError(f"{src.last.name}: {kind} stream is truncated", hint=_cut_hint(src))


def _decode_piped(src: Pieces, kind: str) -> Iterator[bytes]:
    """`zstd -dc` / `lzop -dc` with the pieces fed to its stdin by a thread of ours."""
    tool = PIPED[kind]
    if shutil.which(tool[0]) is None:
        raise ImageError(f"{src.name}: {kind} compressed, and {tool[0]} is not installed",
                         hint=f"install Debian's {tool[0]} package")
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(tool, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errf)
        assert proc.stdin is not None and proc.stdout is not None
        feed_error: list[BaseException] = []

        def feed() -> None:
            stdin = proc.stdin
            assert stdin is not None
            try:
                while raw := src.read(READ_SIZE):
                    stdin.write(raw)
            except BrokenPipeError:
                pass  # the tool stopped (its exit status says why)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                feed_error.append(exc)
            finally:
                with contextlib.suppress(OSError):
                    stdin.close()

        t = threading.Thread(target=feed, name=f"{kind}-feed", daemon=True)
        t.start()
        finished = False
        try:
            while out := proc.stdout.read(READ_SIZE):
                yield out
            finished = True
        finally:
            if not finished:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
            t.join()
        if feed_error:
            raise feed_error[0]
        if src.bytes_read == 0:
            raise ImageError(f"{src.current.name}: empty file")
        if rc != 0:
            errf.seek(0)
            msg = errf.read(2000).decode("utf-8", "replace")
            # lzop reports an early end of its input with a stale errno (ENOTTY)
            cut = any(w in msg.lower() for w in ("premature end", "unexpected end",
                                                 "truncated", "inappropriate ioctl"))
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()
                     and "Inappropriate ioctl" not in ln]
            detail = lines[-1] if lines else ("unexpected end of input" if cut
                                              else f"exit status {rc}")
            if cut:
                raise ImageError(f"{src.last.name}: {kind} stream is truncated ({detail})",
                                 hint=_cut_hint(src))
            raise ImageError(f"{src.name}: corrupt {kind} data ({tool[0]}: {detail})",
                             hint="the file is damaged; copy it again from the original")
