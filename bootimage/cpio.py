"""A deterministic initramfs archive: cpio "newc", the format the kernel unpacks.

GNU cpio would do, but it stamps each entry with the file's mtime, owner and
inode, so two builds of the same files differ. Here every entry has uid and
gid 0, one fixed mtime and inode numbers in path order; the entries are
sorted by path, so a directory always comes before what it holds. Device
nodes (the kernel needs /dev/console before /init can open anything) are
entries of their own: no root rights are needed to make them.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archive member. `path` is relative to the archive's root ("usr/bin/sh")."""

    path: str
    mode: int  # full st_mode: type bits and permissions
    source: Path | None = None  # a regular file's content, read at write time
    data: bytes | None = None  # ... or given here
    target: str = ""  # a symlink's target
    rdev: tuple[int, int] = (0, 0)  # a device node's major, minor

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "char"
        return "file"

    def content(self) -> bytes:
        if stat.S_ISLNK(self.mode):
            return self.target.encode()
        if not stat.S_ISREG(self.mode):
            return b""
        if self.data is not None:
            return self.data
        assert self.source is not None, self.path
        return self.source.read_bytes()


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target=target)


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int],
            name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return head + _pad(len(head))


def write(out: BinaryIO, entries: Iterable[Entry], mtime: int = 0) -> int:
    """Write the archive of `entries` (sorted here) to `out`; the bytes of content written."""
    total = 0
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        body = entry.content()
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out.write(_header(ino, entry.mode, nlink, mtime, len(body), entry.rdev, entry.path.encode()))
        out.write(body)
        out.write(_pad(len(body)))
        total += len(body)
    out.write(_header(0, 0, 1, 0, 0, (0, 0), TRAILER.encode()))
    return total
