"""The contract between the farm and the node agent: one typed definition of each message.

Two programs meet here, and both import this package: the farm (API, tasks,
image formats, registry) and the agent, which runs in a small boot image with
nothing but Python. So it imports only the standard library, and nothing else
of the farm.

    message         travels as                  direction
    Orders          the kernel command line     farm -> agent  (kernel_params / from_cmdline)
    JobSpec         GET  /agent/v1/jobs/N       farm -> agent  (with its Store and ImageRef)
    ProgressReport  POST .../progress           agent -> farm
    ResultReport    POST .../result             agent -> farm
    Manifest        manifest.json in the store  agent (capture), converter -> store -> both

Every message is a frozen, keyword-only dataclass whose fields are checked when
it is made, so an invalid one cannot exist. ``to_json()`` gives the JSON object;
``from_json()`` reads one and refuses unknown or missing fields, wrong types,
NaN and Infinity, values out of range and over-long strings with a
`ProtocolError` whose ``field`` is the path of the bad field
(``partitions[2].sha256``).

Growing the protocol: a new field with a default is an addition (JSON without
it still reads); a new kind of image store (HTTP, multicast) is one more
message class with its own ``type``, added to ``Store``; a new manifest layout
bumps ``MANIFEST_VERSION`` and keeps reading the versions before it.

The enums (JobKind, ImageFormat, BootTarget, PowerState) and the rules on names
(IMAGE_NAME, DEVICE_PATH, ...) live here too: every layer may import this
package, so each rule has one copy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from imgfarm.protocol._vocabulary import (
    CONVERT_VERIFY,
    CONVERT_VERIFY_DEFAULT,
    DEVICE_PATH,
    HEAD_FILE,
    IMAGE_NAME,
    IMAGE_NAME_HINT,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MANIFEST_VERSIONS,
    MAX_ERROR,
    MAX_ID,
    MAX_INT,
    MAX_MESSAGE,
    MAX_PARTITIONS,
    MAX_REPORT,
    MAX_SFDISK,
    MAX_TAIL,
    SHA256,
    STORE_PATH,
    BootTarget,
    FileDigest,
    ImageFormat,
    JobKind,
    PowerState,
    cut_text,
    normalize_mac,
    part_file,
    part_name,
    sha256_file,
    timestamp,
)

if TYPE_CHECKING:
    from imgfarm.protocol._agent import (
        CMDLINE_PREFIX,
        HttpStore,
        ImageRef,
        JobSpec,
        LocalStore,
        Multicast,
        NfsStore,
        Orders,
        ProgressReport,
        ResultReport,
        Store,
    )
    from imgfarm.protocol._manifest import (
        CaptureOrigin,
        ConvertOrigin,
        Disk,
        DiskHead,
        LegacyMbr,
        Manifest,
        Origin,
        Partition,
        PartitionTable,
    )
    from imgfarm.protocol._message import Message, ProtocolError, Rule

# The messages load on first use. Creating their dataclasses costs ~15 ms (more on a busy
# machine), which every `imgfarm` command would pay at start-up although the CLI needs only
# the enums and the name rules above.
_MESSAGES = {
    **dict.fromkeys(("CMDLINE_PREFIX", "HttpStore", "ImageRef", "JobSpec", "LocalStore",
                     "Multicast", "NfsStore", "Orders", "ProgressReport", "ResultReport", "Store"), "_agent"),
    **dict.fromkeys(("CaptureOrigin", "ConvertOrigin", "Disk", "DiskHead", "LegacyMbr", "Manifest",
                     "Origin", "Partition", "PartitionTable"), "_manifest"),
    **dict.fromkeys(("Message", "ProtocolError", "Rule"), "_message"),
}


def __getattr__(name: str) -> Any:
    module = _MESSAGES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CMDLINE_PREFIX",
    "CONVERT_VERIFY",
    "CONVERT_VERIFY_DEFAULT",
    "DEVICE_PATH",
    "HEAD_FILE",
    "IMAGE_NAME",
    "IMAGE_NAME_HINT",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "MANIFEST_VERSIONS",
    "MAX_ERROR",
    "MAX_ID",
    "MAX_INT",
    "MAX_MESSAGE",
    "MAX_PARTITIONS",
    "MAX_REPORT",
    "MAX_SFDISK",
    "MAX_TAIL",
    "SHA256",
    "STORE_PATH",
    "BootTarget",
    "CaptureOrigin",
    "ConvertOrigin",
    "Disk",
    "DiskHead",
    "FileDigest",
    "HttpStore",
    "ImageFormat",
    "ImageRef",
    "JobKind",
    "JobSpec",
    "LegacyMbr",
    "LocalStore",
    "Manifest",
    "Message",
    "Multicast",
    "NfsStore",
    "Orders",
    "Origin",
    "Partition",
    "PartitionTable",
    "PowerState",
    "ProgressReport",
    "ProtocolError",
    "ResultReport",
    "Rule",
    "Store",
    "cut_text",
    "normalize_mac",
    "part_file",
    "part_name",
    "sha256_file",
    "timestamp",
]
