"""The agent's job, once the farm has given its token and spec: find the disk, mount
the image store, run the tool with progress reports, post the result.

Imported by main.run() after the first calls to the farm (the boot's critical
path under emulation is Python loading modules).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from imgfarm.agent import disks, imaging, transport
from imgfarm.agent.client import ApiError, FarmClient
from imgfarm.agent.main import log, wait_for_file
from imgfarm.agent.progress import Progress, Reporter
from imgfarm.protocol import (
    MANIFEST_FILE,
    MAX_ERROR,
    MAX_TAIL,
    HttpStore,
    ImageFormat,
    JobKind,
    JobSpec,
    LocalStore,
    Manifest,
    NfsStore,
    Orders,
    ResultReport,
    Store,
    sha256_file,
)

RUN_DIR = Path("/run/imgfarm")
# /init's wait for a disk (imgfarm.diskwait, 10 s by default) after its late driver pass.
DISK_GATE_TIMEOUT = 120.0


class StoreMount:
    """The image store: a local path, or an NFS export mounted for the job.

    NFS defaults to v4.1 over TCP, `soft` with a bounded retry: a server that
    stops answering turns into an I/O error within about a minute, which the
    agent reports naming the store, instead of a tool hung for ever in a hard
    mount while the progress heartbeat goes on. The job spec's options are
    applied over these (a later key wins; `hard` replaces `soft`), so a site
    says `port=20490` or `vers=3,nolock` without repeating the rest.
    """

    NFS_OPTIONS = "vers=4.1,proto=tcp,soft,timeo=100,retrans=3"
    _OPPOSITE = {"soft": "hard", "hard": "soft", "lock": "nolock", "nolock": "lock", "ro": "rw",
                 "rw": "ro"}

    def __init__(self, store: Store, job_id: int, read_only: bool = False) -> None:
        self.store = store
        self.read_only = read_only  # a restore: mounted ro, whatever the site's options say
        self.mountpoint: Path | None = None
        self.job_id = job_id

    @classmethod
    def options(cls, extra: str) -> str:
        """The agent's NFS options with `extra` applied over them."""
        merged: dict[str, str | None] = {}
        for word in [*cls.NFS_OPTIONS.split(","), *extra.split(",")]:
            if not word:
                continue
            key, eq, value = word.partition("=")
            merged.pop(cls._OPPOSITE.get(key, ""), None)
            merged.pop(key, None)  # keep the order in which the last one was given
            merged[key] = value if eq else None
        return ",".join(k if v is None else f"{k}={v}" for k, v in merged.items())

    def _nfs_server(self) -> tuple[str, int]:
        assert isinstance(self.store, NfsStore)
        host = self.store.export.rsplit(":", 1)[0].strip("[]")
        port = 2049
        for word in self.options(self.store.options).split(","):
            if word.startswith("port=") and word[5:].isdigit() and int(word[5:]):
                port = int(word[5:])
        return host, port

    def unreachable(self) -> str:
        """Why the NFS server does not answer now ('' when it does, or the store is local)."""
        if not isinstance(self.store, NfsStore):
            return ""
        host, port = self._nfs_server()
        try:
            with socket.create_connection((host, port), timeout=5):
                return ""
        except OSError as exc:
            return f"NFS server {host} port {port}: {exc.strerror or exc}"

    def __enter__(self) -> Path | None:
        if isinstance(self.store, HttpStore):
            return None  # nothing to mount: files stream from the URL
        if isinstance(self.store, NfsStore):
            mnt = RUN_DIR / f"store-{self.job_id}"
            mnt.mkdir(parents=True, exist_ok=True)
            opts = self.options(self.store.options + (",ro" if self.read_only else ""))
            vers = next((w[5:] for w in reversed(opts.split(",")) if w.startswith("vers=")), "")
            fstype = "nfs4" if vers.startswith("4") else "nfs"
            out = subprocess.run(["mount", "-t", fstype, "-o", opts, self.store.export, str(mnt)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                why = self.unreachable()
                raise imaging.ToolError(
                    f"cannot mount image store {self.store.export}" + (f" ({why})" if why else ""),
                    out.stderr)
            self.mountpoint = mnt
            return mnt
        if not isinstance(self.store, LocalStore):
            raise imaging.ToolError(f"this agent cannot use a {self.store.type!r} image store")
        path = Path(self.store.path)
        if not path.is_dir():
            raise imaging.ToolError(f"image store {path} is not a directory")
        return path

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.mountpoint is None:
            return
        # A dead server can hang a plain umount (for as long as a soft mount's retries): when the
        # job failed and the server does not answer, detach lazily at once, so the failure is
        # reported without that wait; otherwise bound the umount, then detach lazily.
        if exc_type is not None and self.unreachable():
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=20)
            return
        try:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=20)


def failure(error: str, tail: str, started: float) -> ResultReport:
    return ResultReport(ok=False, error=error[:MAX_ERROR], stderr_tail=tail[-MAX_TAIL:],
                        duration=round(time.monotonic() - started, 2))


def work(client: FarmClient, orders: Orders, spec: JobSpec) -> int:
    """The job, to its reported end; the agent's exit status."""
    progress = Progress()
    progress.stage = "agent started"
    try:
        client.progress(progress.snapshot())
    except ApiError as exc:
        log(f"cannot report to the farm: {exc}")
        return 2
    reporter = Reporter(client.progress, progress, spec.progress_interval)
    reporter.start()
    started = time.monotonic()
    mount: StoreMount | None = None
    try:
        if orders.delay:
            time.sleep(orders.delay)
        wait_for_file(os.environ.get("IMGFARM_AGENT_DISK_GATE", ""), DISK_GATE_TIMEOUT)
        disk = disks.find_disk(orders.disk or spec.disk_hint)
        log(f"job {orders.job_id}: {spec.kind} {spec.format} on {disk}")
        mount = StoreMount(spec.store, orders.job_id, read_only=spec.kind == JobKind.RESTORE)
        with mount as root:
            files, manifest = _do(spec, disk, root, progress, orders, _noter(client, progress),
                                  client.token)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, never swallowed
        reporter.stop.set()
        tail = getattr(exc, "stderr_tail", "")
        why = mount.unreachable() if mount is not None and mount.mountpoint is not None else ""
        if why and isinstance(spec.store, NfsStore):  # EIO or a short read is the symptom
            exc = imaging.ToolError(f"image store {spec.store.export} stopped answering during "
                                    f"the {spec.kind} ({why}): {exc}", tail)
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC and spec.kind == JobKind.CAPTURE:
            exc = imaging.ToolError(f"no space left in the image store for the capture ({exc.strerror}); "
                                    "free space in the store or grow it, then capture again", tail)
        if not isinstance(exc, imaging.ToolError | disks.DiskError | OSError):
            import traceback

            tail = tail or traceback.format_exc()[-4000:]
        log(f"job {orders.job_id} failed: {exc}")
        try:
            client.result(failure(str(exc), tail, started))
        except ApiError as api_exc:
            log(f"could not report the failure: {api_exc}")
        return 1
    reporter.stop.set()
    try:
        client.result(ResultReport(ok=True, duration=round(time.monotonic() - started, 2),
                                   bytes=progress.snapshot().bytes_done, files=files, manifest=manifest))
    except ApiError as exc:
        log(f"could not report the result: {exc}")
        return 1
    log(f"job {orders.job_id} done")
    return 0


def _noter(client: FarmClient, progress: Progress) -> Callable[[str], None]:
    """Something the job's events should say now (a resumed transfer, a multicast fallback)."""
    def note(message: str) -> None:
        # a tool's output in it may hold \r or escapes; a progress message is plain text
        message = "".join(c if c.isprintable() else " " for c in message)
        log(message)
        progress.stage = " ".join(message.split())[:500]
        try:
            client.progress(progress.snapshot())
        except ApiError as exc:
            log(f"could not report: {exc}")
    return note


def _do(spec: JobSpec, disk: str, root: Path | None, progress: Progress, orders: Orders,
        note: Callable[[str], None], token: str) -> tuple[dict[str, str], Manifest | None]:
    """Run the job's tool; the sha256 of every file written or read, and a capture's manifest."""
    if root is None:
        assert isinstance(spec.store, HttpStore)
        return _do_http(spec, disk, spec.store, progress, orders, note, token)
    if spec.kind == JobKind.CAPTURE:
        outdir = root / spec.output_dir
        manifest: Manifest | None = None
        if spec.format == ImageFormat.NG:
            manifest = imaging.capture_ng(disk, transport.DirSink(outdir), spec, progress)
        else:
            imaging.capture_partimage(disk, outdir, spec, progress)
        files = {p.name: sha256_file(p).sha256 for p in sorted(outdir.iterdir())
                 if p.is_file() and p.name != MANIFEST_FILE}
        return files, manifest
    imgdir = root / spec.image.location
    used: Manifest | None = None  # a restore reports the manifest it followed, for the farm to check
    if spec.format == ImageFormat.NG:
        files, used = imaging.restore_ng(disk, transport.DirSource(imgdir), spec, progress,
                                         feed=_feed(spec, orders, note), note=note)
    else:
        files = imaging.restore_partimage(disk, imgdir, spec, progress)
    os.sync()
    return files, used


def _feed(spec: JobSpec, orders: Orders, note: Callable[[str], None]) -> imaging.PartitionFeed | None:
    if spec.multicast is None:
        return None
    from imgfarm.agent import multicast  # lazy: only a multicast restore runs udp-receiver

    return multicast.ReceiverFeed(spec.multicast, orders.api_url, note)


def _do_http(spec: JobSpec, disk: str, store: HttpStore, progress: Progress, orders: Orders,
             note: Callable[[str], None], token: str) -> tuple[dict[str, str], Manifest | None]:
    """Restore from, or capture to, the store over HTTP with the job's token (from the claim)."""
    if spec.kind == JobKind.CAPTURE:
        if spec.format != ImageFormat.NG:
            raise imaging.ToolError(f"a {spec.format} capture writes to NFS or a local store only; "
                                    "capture partimage-ng over HTTP")
        sink = transport.HttpSink(f"{store.url}/{spec.output_dir}", token, note)
        manifest = imaging.capture_ng(disk, sink, spec, progress)
        files = {p.file: p.sha256 for p in manifest.partitions}
        if manifest.disk.head is not None:
            files[manifest.disk.head.file] = manifest.disk.head.sha256
        return files, manifest
    if spec.format != ImageFormat.NG:
        raise imaging.ToolError(f"a {spec.format} image restores from NFS or a local store only; "
                                "convert it to partimage-ng for HTTP")
    source = transport.HttpSource(f"{store.url}/{spec.image.location}", token)
    files, used = imaging.restore_ng(disk, source, spec, progress, feed=_feed(spec, orders, note), note=note)
    os.sync()
    return files, used


