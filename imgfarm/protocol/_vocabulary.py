"""The protocol's vocabulary: enums every layer uses, and the rules on names and sizes.

One copy of each: the farm's registry, the converter, the API and the agent all
check an image name, a device path or a sha256 with the patterns here.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import os
import re
from typing import NamedTuple

# --- Enums: StrEnum, so the database and JSON hold the plain value ('partimage-ng')


class JobKind(enum.StrEnum):
    CAPTURE = "capture"
    RESTORE = "restore"
    CONVERT = "convert"  # worker side only: no node, no agent


class ImageFormat(enum.StrEnum):
    NG = "partimage-ng"  # this farm's format: manifest.json + partclone streams in zstd
    PARTIMAGE = "partimage"  # legacy partimage 0.6.x volumes NAME.000, NAME.001, ...


class BootTarget(enum.StrEnum):
    """What a node boots next, as its boot driver reports it and the node table records it."""

    AGENT = "agent"  # the next boot runs the farm's agent
    LOCAL = "local"  # the next boot is from the local disk
    UNKNOWN = "unknown"


class PowerState(enum.StrEnum):
    """A node's power, as its power driver reports it and the node table records it."""

    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


# --- Rules on names and sizes, one copy each

# An image name is a directory of the store, a legacy volume's base name (NAME.000) and a
# path segment of the API: letters, digits, '.', '_', '+', '-'; never '/' nor '..'.
IMAGE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")
IMAGE_NAME_HINT = "use letters, digits, '.', '_', '+' and '-' (no '/', no '..'), at most 128"
IMAGE_NAME_MEANS = "an image name (letters, digits, '.', '_', '+', '-'; no '/' nor '..'; at most 128)"
# A device the agent images, as it goes on the kernel command line: no quoting needed.
DEVICE_PATH = re.compile(r"^/[^\s'\"\\;]{1,255}\Z")
SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")  # files the farm names itself
PLAIN_FILE = re.compile(r"^(?!\.\.?\Z)[^/\x00-\x1f\x7f]{1,255}\Z")  # any one file name, no path
_PART = r"(?!\.\.?(?:/|\Z))[^/\x00-\x1f\x7f]{1,255}"
STORE_PATH = re.compile(rf"^{_PART}(?:/{_PART})*\Z")  # relative, inside the store
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}\Z")
TOKEN = re.compile(r"^[A-Za-z0-9._~-]{1,512}\Z")
API_URL = re.compile(r"^https?://[^\s'\"\\]+\Z")
NFS_EXPORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):/\S*\Z")
MOUNT_OPTIONS = re.compile(r"^[A-Za-z0-9_=,.:/]*\Z")

MAX_INT = 2**63 - 1  # counts and sizes the farm stores are 64-bit (PostgreSQL BIGINT)
MAX_ID = 2**31 - 1  # row ids (job ids) are INTEGER columns: 32-bit on PostgreSQL
MAX_TEXT = 1024  # characters of a text field without a bound of its own
MAX_MESSAGE = 512  # ProgressReport.message: one line of what the agent does
MAX_ERROR = 8192  # ResultReport.error
MAX_TAIL = 16384  # ResultReport.stderr_tail
MAX_FILES = 10000  # files in one report or image
MAX_PARTITIONS = 256
MAX_SFDISK = 256 << 10
MAX_JSON = 64 << 10  # a free-form JSON object (a legacy image's header record)
MAX_REPORT = 64 << 10  # bytes of one agent request's body (a progress or result report)



def cut_text(text: str, limit: int, keep: str = "head") -> str:
    """`text` in at most `limit` characters, with a mark saying how much was cut.

    `keep` is "head" (an error's first words say what failed) or "tail" (a tool's
    last lines do). Text from outside is shortened on the way in, not refused: a
    failing tool's output is the one thing an operator needs from a failed job.
    """
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    while True:
        mark = f" [... {cut} characters cut ...] "
        room = max(limit - len(mark), 0)
        if len(text) - room == cut:
            break
        cut = len(text) - room
    return text[:room] + mark if keep == "head" else mark + text[len(text) - room:]


MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MANIFEST_VERSIONS = (1,)  # what this code reads
HEAD_FILE = "disk-head.bin"  # the bytes before the first partition (boot code)
COMPRESSIONS = ("zstd",)
# What a conversion checks before the new image gets its name (imageformats/convert.py and
# docs/formats.md "Conversion checks"): "written" = every input check, sha256 of exactly the
# bytes written, fsync and the size on disk; "stream" adds decoding every zstd frame again;
# "full" adds a read-back of the finished image. "written" is the default: the CLI, the
# workers and Clonezilla directories share it.
CONVERT_VERIFY = ("written", "stream", "full")
CONVERT_VERIFY_DEFAULT = "written"


def part_name(index: int) -> str:
    """A partition's name in a manifest: part0 for a whole-disk filesystem, partN for /dev/sdaN."""
    return f"part{index}"


def part_file(index: int) -> str:
    """A partition stream's file name in an image directory."""
    return f"part{index}.ptcl.zst"


def normalize_mac(mac: str) -> str | None:
    """"AA:BB:CC:DD:EE:FF" / "aa-bb-..." / "aabbccddeeff" -> "aa:bb:cc:dd:ee:ff"; else None.

    One form everywhere: the node table stores it and the pxe driver names
    per-MAC boot files after it.
    """
    mac = mac.strip().lower()
    if not _MAC.match(mac):
        return None
    digits = mac.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def timestamp() -> str:
    """Times in manifests: UTC, second resolution, ``Z`` suffix."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FileDigest(NamedTuple):
    sha256: str
    size: int  # bytes read


def sha256_file(path: str | os.PathLike[str]) -> FileDigest:
    """The sha256 recorded for a file in manifests, reports and the registry, and its size.

    One helper for the agent and the farm, so both hash what they compare the same way.
    """
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return FileDigest(digest.hexdigest(), fh.tell())


