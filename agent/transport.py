"""Reading image files from the store: a directory (local or NFS), or HTTP with Range.

Over HTTP a file streams in pieces into the hash and the tool's pipe. When the
connection breaks, the next request asks for ``Range: bytes=N-`` where N is the
number of bytes already hashed and handed to the tool: the transfer goes on from
the last verified byte, never from zero (the tool has those bytes already, so
starting again would feed it twice). The whole file's sha256 is compared with the
manifest by the caller; the tool itself (zstd's frame checksums) notices damage
earlier, and the error then names the file and the byte offset reached.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPException
from pathlib import Path

from imgfarm.protocol import MANIFEST_FILE, Manifest

CHUNK = 4 << 20
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class TransferError(Exception):
    pass


class _Broken(TransferError):
    """The connection ended early: worth another request from the byte reached."""


class DirSource:
    """Files of an image directory the node sees as a path (local store, NFS mount)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        with open(self.root / name, "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise TransferError(f"{name} is larger than {limit} bytes")
        return data

    def chunks(self, name: str, on_resume: Callable[[int, str], None] | None = None) -> Iterator[bytes]:
        with open(self.root / name, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())


class HttpSource:
    """Files under `url` (the job's view of the store), fetched with the job's token."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0, attempts: int = 8) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.attempts = attempts

    def describe(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _open(self, name: str, start: int = 0) -> tuple[object, int]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if start:
            headers["Range"] = f"bytes={start}-"
        req = urllib.request.Request(f"{self.url}/{name}", headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - http(s) only, checked by the protocol
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code < 500:
                raise TransferError(f"GET {name}: HTTP {exc.code}: {detail}") from None
            raise
        if start:
            m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if resp.status != 206 or not m or int(m.group(1)) != start:
                resp.close()
                raise TransferError(f"GET {name} from byte {start}: the server did not answer the range "
                                    f"(HTTP {resp.status}); it cannot resume a transfer")
            return resp, int(m.group(3))
        return resp, int(resp.headers.get("Content-Length") or -1)

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        data = b"".join(self.chunks(name))
        if len(data) > limit:
            raise TransferError(f"{name} is larger than {limit} bytes")
        return data

    def chunks(self, name: str, on_resume: Callable[[int, str], None] | None = None) -> Iterator[bytes]:
        """The file's bytes in order; a broken transfer resumes at the byte it reached."""
        done, total, failures, delay = 0, -1, 0, 0.5
        while total < 0 or done < total:
            try:
                resp, size = self._open(name, done)
                total = size if size >= 0 else total
                with resp:  # type: ignore[attr-defined]
                    while True:
                        chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)  # type: ignore[attr-defined]
                        if not chunk:
                            break
                        done += len(chunk)
                        yield chunk
                        failures, delay = 0, 0.5
                if total < 0:  # no length given: the end of the body is the end of the file
                    return
                if done < total:
                    raise _Broken(f"the connection closed at byte {done} of {total}")
            except (urllib.error.URLError, OSError, HTTPException, _Broken, TimeoutError) as exc:
                failures += 1
                if failures >= self.attempts:
                    raise TransferError(f"GET {name}: gave up at byte {done} after {failures} tries: "
                                        f"{exc}") from None
                if on_resume is not None:
                    on_resume(done, str(exc))
                time.sleep(delay * random.uniform(0.7, 1.3))
                delay = min(delay * 2, 10.0)


# ---------------------------------------------------------------- writing (capture)

PIECE = 4 << 20  # bytes per PUT: what is lost, at most, when an upload breaks


class _FileWriter:
    def __init__(self, path: Path) -> None:
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


class DirSink:
    """A capture's files in a directory the node sees (local store, NFS mount)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def open(self, name: str) -> _FileWriter:
        return _FileWriter(self.root / name)

    def put(self, name: str, data: bytes) -> None:
        w = self.open(name)
        w.write(data)
        w.close()

    def save_manifest(self, manifest: Manifest) -> None:
        manifest.save(self.root)


class _Upload:
    """One file sent in pieces; a piece whose PUT broke is sent again from the server's offset."""

    def __init__(self, sink: HttpSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.offset = 0  # bytes the server has confirmed
        self.buf = bytearray()

    def write(self, chunk: bytes) -> None:
        self.buf += chunk
        while len(self.buf) >= PIECE:
            self._send(bytes(self.buf[:PIECE]))
            del self.buf[:PIECE]

    def close(self) -> None:
        if self.buf:
            self._send(bytes(self.buf))
            self.buf.clear()

    def _send(self, piece: bytes) -> None:
        start, failures, delay = self.offset, 0, 0.5
        while True:
            req = urllib.request.Request(
                f"{self.sink.url}/{self.name}", data=piece, method="PUT",
                headers={"Authorization": f"Bearer {self.sink.token}",
                         "Content-Type": "application/octet-stream",
                         "Content-Range": f"bytes {start}-{start + len(piece) - 1}/*"})
            try:
                with urllib.request.urlopen(req, timeout=self.sink.timeout) as resp:  # noqa: S310
                    self.offset = int(json.loads(resp.read())["offset"])
                    return
            except urllib.error.HTTPError as exc:
                body = exc.read()[:2000]
                if exc.code == 409:  # the server has a different size: an answer was lost, or a piece
                    have = int(json.loads(body).get("offset", -1))
                    if have == start + len(piece):
                        self.offset = have
                        return
                    raise TransferError(f"PUT {self.name}: the server has {have} bytes, this agent "
                                        f"expected {start}; the upload cannot go on") from None
                if exc.code < 500:
                    raise TransferError(f"PUT {self.name}: HTTP {exc.code}: "
                                        f"{body.decode(errors='replace')[:300]}") from None
                err: Exception = exc
            except (urllib.error.URLError, OSError, HTTPException, TimeoutError, ValueError, KeyError) as exc:
                err = exc
            failures += 1
            if failures >= self.sink.attempts:
                raise TransferError(f"PUT {self.name}: gave up at byte {start} after {failures} tries: {err}")
            if self.sink.note is not None:
                self.sink.note(f"{self.name}: upload broke at byte {start} ({err}); resuming from there")
            time.sleep(delay * random.uniform(0.7, 1.3))
            delay = min(delay * 2, 10.0)


class HttpSink:
    """A capture's files uploaded under `url` (the job's incoming directory) with the job's token."""

    def __init__(self, url: str, token: str, note: Callable[[str], None] | None = None, *,
                 timeout: float = 60.0, attempts: int = 8) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.note = note
        self.timeout = timeout
        self.attempts = attempts

    def open(self, name: str) -> _Upload:
        return _Upload(self, name)

    def put(self, name: str, data: bytes) -> None:
        w = self.open(name)
        w.write(data)
        w.close()

    def save_manifest(self, manifest: Manifest) -> None:
        self.put(MANIFEST_FILE, manifest.to_text().encode("utf-8"))
