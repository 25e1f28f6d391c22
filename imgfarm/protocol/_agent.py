"""The messages of one job: orders at boot, the job spec, progress and result reports."""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Annotated, Any, ClassVar, Self

from imgfarm.protocol._manifest import Manifest
from imgfarm.protocol._message import (
    _OMIT,
    Count,
    FileSums,
    ImageName,
    JobId,
    Message,
    Path4k,
    ProtocolError,
    Rule,
    Seconds,
)
from imgfarm.protocol._vocabulary import (
    API_URL,
    DEVICE_PATH,
    MAX_ERROR,
    MAX_MESSAGE,
    MAX_TAIL,
    MOUNT_OPTIONS,
    NFS_EXPORT,
    STORE_PATH,
    TOKEN,
    ImageFormat,
    JobKind,
)

CMDLINE_PREFIX = "imgfarm."


@dataclasses.dataclass(frozen=True, kw_only=True)
class Orders(Message):
    """What the agent is told at boot: where the API is, which job, maybe a disk.

    On the wire: ``imgfarm.api=URL imgfarm.job=N [imgfarm.disk=DEV] [imgfarm.delay=S]``.
    Boot files and kernel command lines are readable by anyone on the install network,
    so the farm puts no credential in them: the agent's first call (the job id and the
    node's MAC) receives the job's token, once (docs/protocol.md). `imgfarm.token` is
    still read, for an agent run by hand against a token obtained some other way.
    """

    PARAMS: ClassVar[dict[str, str]] = {
        "api": "api_url", "job": "job_id", "token": "token", "disk": "disk", "delay": "delay"}
    # Read by the boot image's /init, not by the agent (docs/bootimage.md): known, so not an error.
    BOOT_PARAMS: ClassVar[tuple[str, ...]] = ("nic", "debug", "selfcheck", "after", "linkwait", "diskwait",
                                             "failwait")

    api_url: Annotated[str, Rule(pattern=API_URL, max_len=2048, means="an http(s):// URL")]
    job_id: JobId
    token: Annotated[str, Rule(pattern=TOKEN, means="a token of URL-safe characters", omit=True)] = ""
    disk: Annotated[str, Rule(pattern=DEVICE_PATH, means="an absolute device path", omit=True)] = ""
    delay: Annotated[float, Rule(lo=0, hi=86400, omit=True)] = 0.0  # test aid: wait before the tool

    def kernel_params(self) -> str:
        data = self.to_json()
        return " ".join(f"{CMDLINE_PREFIX}{param}={data[name]}"
                        for param, name in self.PARAMS.items() if name in data)

    @classmethod
    def from_cmdline(cls, text: str) -> Orders:
        """Read the orders from a kernel command line; the last of a repeated parameter wins."""
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise ProtocolError("", f"kernel command line cannot be read ({exc})") from None
        params: dict[str, str] = {}
        for word in words:
            if word.startswith(CMDLINE_PREFIX) and "=" in word:
                key, _, value = word.partition("=")
                if key[len(CMDLINE_PREFIX):] not in cls.BOOT_PARAMS:
                    params[key[len(CMDLINE_PREFIX):]] = value
        for key in params:
            if key not in cls.PARAMS:
                raise ProtocolError(f"{CMDLINE_PREFIX}{key}", "unknown parameter (known: " + ", ".join(
                    CMDLINE_PREFIX + k for k in cls.PARAMS) + ")")
        missing = [k for k in ("api", "job") if not params.get(k)]
        if missing:
            raise ProtocolError(f"{CMDLINE_PREFIX}{missing[0]}", "kernel command line lacks " + ", ".join(
                f"{CMDLINE_PREFIX}{k}=" for k in missing))
        values: dict[str, Any] = {cls.PARAMS[k]: v for k, v in params.items()}
        values["api_url"] = values["api_url"].rstrip("/")
        for key, name in (("job", "job_id"), ("delay", "delay")):
            if name in values:
                try:
                    values[name] = (int if name == "job_id" else float)(values[name] or 0)
                except ValueError:
                    raise ProtocolError(f"{CMDLINE_PREFIX}{key}", f"{values[name]!r} is not a number") from None
        try:
            return cls(**values)
        except ProtocolError as exc:
            param = next(k for k, n in cls.PARAMS.items() if exc.field.startswith(n))
            raise ProtocolError(f"{CMDLINE_PREFIX}{param}", exc.problem) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalStore(Message):
    """The store is a directory the node sees as it is (sim nodes on the farm's machine)."""

    TAG: ClassVar[str] = "type"
    type: str = "local"
    path: Annotated[str, Rule(pattern=re.compile(r"^/"), max_len=4096, means="an absolute path")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NfsStore(Message):
    """The store is an NFS export the agent mounts for the job."""

    TAG: ClassVar[str] = "type"
    type: str = "nfs"
    export: Annotated[str, Rule(pattern=NFS_EXPORT, max_len=4096, means="server:/export")]
    options: Annotated[str, Rule(pattern=MOUNT_OPTIONS, means="mount options", omit=True)] = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpStore(Message):
    """The store is served over HTTP: the agent streams files with Range and uploads resumably.

    `url` is the job's view of the store (the API's ``/agent/v1/jobs/N/store``, which checks
    the job's token like every agent endpoint); paths inside the store are appended to it.
    """

    TAG: ClassVar[str] = "type"
    type: str = "http"
    url: Annotated[str, Rule(pattern=API_URL, max_len=2048, means="an http(s):// URL")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Multicast(Message):
    """A restore whose partition streams also come by udpcast; the store stays the fallback.

    The agent runs ``udp-receiver --portbase PORTBASE+2*i`` for partition i (in manifest
    order), hashing the compressed stream; a receiver that never starts (the session began
    without it), drops out, or delivers a stream whose sha256 differs from the manifest makes
    the agent restore that partition, and the rest, from the store by unicast.
    """

    session: Annotated[str, Rule(pattern=re.compile(r"^[A-Za-z0-9_-]{1,64}\Z"), means="a session id")]
    portbase: Annotated[int, Rule(lo=1024, hi=65000)]
    start_timeout: Annotated[float, Rule(lo=1, hi=86400)] = 120.0
    receive_timeout: Annotated[float, Rule(lo=1, hi=3600)] = 20.0


Store = LocalStore | NfsStore | HttpStore


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageRef(Message):
    """The image a job writes (capture: only its name) or reads (restore: where, and its sums)."""

    name: ImageName
    location: Annotated[str, Rule(pattern=STORE_PATH, means="a path inside the store", omit=True)] = ""
    format: Annotated[ImageFormat | None, _OMIT] = None
    checksums: Annotated[FileSums, _OMIT] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec(Message):
    """Everything the agent needs for one job, from GET /agent/v1/jobs/N."""

    job_id: JobId
    kind: JobKind
    format: ImageFormat
    node: str = ""
    disk_hint: Path4k = ""  # the node's disk, or this job's --disk; the agent may find one itself
    store: Store
    progress_interval: Annotated[float, Rule(lo=0.01, hi=3600)] = 5.0
    image: ImageRef
    output_dir: Annotated[str, Rule(pattern=STORE_PATH, means="a path inside the store", omit=True)] = ""
    # seconds from now to the job's overall deadline: until then the agent retries its result
    deadline_in: Annotated[float, Rule(lo=0, hi=366 * 86400, omit=True)] = 0.0
    multicast: Annotated[Multicast | None, _OMIT] = None

    def check(self) -> None:
        if self.kind not in (JobKind.CAPTURE, JobKind.RESTORE):
            raise ProtocolError("kind", f"an agent runs capture or restore jobs, not {self.kind}")
        if self.kind == JobKind.CAPTURE and not self.output_dir:
            raise ProtocolError("output_dir", "a capture needs the directory to write into")
        if self.kind == JobKind.RESTORE and not self.image.location:
            raise ProtocolError("image.location", "a restore needs the image's directory")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressReport(Message):
    """A heartbeat with honest numbers, every JobSpec.progress_interval seconds."""

    state: Annotated[str, Rule(pattern=re.compile(r"^running\Z"), means="'running'")] = "running"
    percent: Annotated[float, Rule(lo=0, hi=100)] = 0.0
    bytes_done: Count = 0
    bytes_total: Count = 0
    rate: Annotated[float, Rule(lo=0)] = 0.0  # bytes per second
    message: Annotated[str, Rule(max_len=MAX_MESSAGE, cut="head")] = ""  # "capturing partition 2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultReport(Message):
    """The agent's last word: ok with the sha256 of every file, or the error and the tool's tail."""

    ok: bool
    error: Annotated[str, Rule(max_len=MAX_ERROR, raw=True, cut="head")] = ""
    stderr_tail: Annotated[str, Rule(max_len=MAX_TAIL, raw=True, cut="tail")] = ""
    files: FileSums = dataclasses.field(default_factory=dict)  # written (capture) or read (restore)
    manifest: Annotated[Manifest | None, _OMIT] = None  # a partimage-ng capture's, or the one restored
    bytes: Count = 0
    duration: Seconds = 0.0

    @classmethod
    def from_json(cls, data: object) -> Self:
        if isinstance(data, dict) and data.get("manifest") == {}:  # older agents' "no manifest"
            data = {k: v for k, v in data.items() if k != "manifest"}
        return super().from_json(data)
