"""imgfarm-agent: do one job's imaging on this node and report to the farm.

    imgfarm-agent [--cmdline-file /proc/cmdline]

Steps: read orders (imgfarm.api, imgfarm.job, imgfarm.token, imgfarm.disk
on the kernel command line) -> fetch the job spec -> find the disk -> mount
the image store -> run the tool, posting progress every few seconds -> post
the result (sha256 of every file written or read, or the error and the
tool's stderr tail). Exit 0 when the job succeeded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from imgfarm.agent import disks, imaging
from imgfarm.agent.client import ApiError, FarmClient
from imgfarm.agent.progress import Progress, Reporter
from imgfarm.protocol import (
    MANIFEST_FILE,
    MAX_ERROR,
    MAX_TAIL,
    ImageFormat,
    JobKind,
    JobSpec,
    LocalStore,
    Manifest,
    NfsStore,
    Orders,
    ProtocolError,
    ResultReport,
    Store,
    sha256_file,
)

RUN_DIR = Path("/run/imgfarm")


def log(msg: str) -> None:
    print(f"imgfarm-agent: {msg}", file=sys.stderr, flush=True)


class StoreMount:
    """The image store: a local path, or an NFS export mounted for the job."""

    NFS_OPTIONS = "vers=3,hard,nolock"

    def __init__(self, store: Store, job_id: int) -> None:
        self.store = store
        self.mountpoint: Path | None = None
        self.job_id = job_id

    def __enter__(self) -> Path:
        if isinstance(self.store, NfsStore):
            mnt = RUN_DIR / f"store-{self.job_id}"
            mnt.mkdir(parents=True, exist_ok=True)
            opts = self.store.options or self.NFS_OPTIONS
            out = subprocess.run(["mount", "-t", "nfs", "-o", opts, self.store.export, str(mnt)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise imaging.ToolError(f"cannot mount image store {self.store.export}", out.stderr)
            self.mountpoint = mnt
            return mnt
        if not isinstance(self.store, LocalStore):
            raise imaging.ToolError(f"this agent cannot use a {self.store.type!r} image store")
        path = Path(self.store.path)
        if not path.is_dir():
            raise imaging.ToolError(f"image store {path} is not a directory")
        return path

    def __exit__(self, *exc: object) -> None:
        if self.mountpoint is not None:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True)


def _failure(error: str, tail: str, started: float) -> ResultReport:
    return ResultReport(ok=False, error=error[:MAX_ERROR], stderr_tail=tail[-MAX_TAIL:],
                        duration=round(time.monotonic() - started, 2))


def run(orders: Orders) -> int:
    client = FarmClient(orders)
    started = time.monotonic()
    try:
        spec = client.spec()
    except ApiError as exc:
        log(f"cannot fetch job {orders.job_id}: {exc}")
        return 2
    except ProtocolError as exc:  # a farm this agent does not understand: say so, and stop
        log(f"job {orders.job_id}: the job spec is not one this agent reads: {exc}")
        try:
            client.result(_failure(f"the agent cannot read its job spec: {exc}", "", started))
        except ApiError as api_exc:
            log(f"could not report the failure: {api_exc}")
        return 1
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
    try:
        if orders.delay:
            time.sleep(orders.delay)
        disk = disks.find_disk(orders.disk or spec.disk_hint)
        log(f"job {orders.job_id}: {spec.kind} {spec.format} on {disk}")
        with StoreMount(spec.store, orders.job_id) as root:
            files, manifest = _do(spec, disk, root, progress)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, never swallowed
        reporter.stop.set()
        tail = getattr(exc, "stderr_tail", "")
        if not isinstance(exc, imaging.ToolError | disks.DiskError | OSError):
            import traceback

            tail = tail or traceback.format_exc()[-4000:]
        log(f"job {orders.job_id} failed: {exc}")
        try:
            client.result(_failure(str(exc), tail, started))
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


def _do(spec: JobSpec, disk: str, root: Path, progress: Progress) -> tuple[dict[str, str], Manifest | None]:
    """Run the job's tool; the sha256 of every file written or read, and a capture's manifest."""
    if spec.kind == JobKind.CAPTURE:
        outdir = root / spec.output_dir
        manifest: Manifest | None = None
        if spec.format == ImageFormat.NG:
            manifest = imaging.capture_ng(disk, outdir, spec, progress)
        else:
            imaging.capture_partimage(disk, outdir, spec, progress)
        files = {p.name: sha256_file(p).sha256 for p in sorted(outdir.iterdir())
                 if p.is_file() and p.name != MANIFEST_FILE}
        return files, manifest
    imgdir = root / spec.image.location
    if spec.format == ImageFormat.NG:
        files = imaging.restore_ng(disk, imgdir, spec, progress)
    else:
        files = imaging.restore_partimage(disk, imgdir, spec, progress)
    os.sync()
    return files, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgfarm-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cmdline-file", default="/proc/cmdline",
                        help="where the orders are (default: /proc/cmdline)")
    args = parser.parse_args(argv)
    try:
        orders = Orders.from_cmdline(Path(args.cmdline_file).read_text())
    except (OSError, ProtocolError) as exc:
        log(str(exc))
        return 2
    return run(orders)


if __name__ == "__main__":
    raise SystemExit(main())
