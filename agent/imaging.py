"""Running the imaging tools against the disk: capture and restore, both formats.

partimage-ng: per partition `partclone.<fs> -c | zstd` (capture) and
`zstd -dc | partclone.restore` (restore); the agent sits in the middle of
the compressed stream to hash it (sha256 of every file written or read).
A disk with a partition table also keeps the bytes before the first
partition (boot code) and its sfdisk dump. Legacy partimage runs the real
partimage 0.6.9 in batch mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from imgfarm.agent import disks
from imgfarm.agent.progress import Progress, rchar, watch_stderr
from imgfarm.protocol import (
    HEAD_FILE,
    MANIFEST_FILE,
    CaptureOrigin,
    Disk,
    DiskHead,
    JobSpec,
    Manifest,
    Partition,
    PartitionTable,
    ProtocolError,
    part_file,
    part_name,
    sha256_file,
)

CHUNK = 4 << 20


def _partclone_log() -> list[str]:
    """partclone's -L: its default /var/log/partclone.log does not exist in a boot image,
    and partclone that cannot open its log exits 0 having written nothing."""
    return ["-L", os.path.join(tempfile.gettempdir(), f"imgfarm-partclone-{os.getpid()}.log")]


class ToolError(Exception):
    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


def _tail(lines: deque[bytes]) -> str:
    return b"\n".join(lines).decode(errors="replace")[-4000:]


PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Give a pipe 1 MiB of buffer (F_SETPIPE_SZ) instead of Linux's 64 KiB.

    Why: a 200 MiB stream then crosses each pipe of the restore in about 200 reads and
    writes instead of 3,200, and the processes on both sides wake that much less often,
    which is most of the agent's CPU when many restores share a host. Best effort: a
    kernel or a limit (fs.pipe-max-size) that refuses leaves the default.
    """
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _kill_all(*procs: subprocess.Popen[bytes]) -> None:
    """Stop a whole pipeline at once (every kill before any wait, so no stage blocks on
    another one's full pipe), and reap it."""
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def _run_checked(args: list[str], stdin: Any = None) -> str:
    out = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise ToolError(f"{args[0]} exited {out.returncode}", out.stderr[-4000:])
    return out.stdout


# ---------------------------------------------------------------- capture

class FileSink(Protocol):
    """Where a capture's files go (agent/transport.py: a directory, or HTTP uploads)."""

    def open(self, name: str) -> Any: ...
    def put(self, name: str, data: bytes) -> None: ...
    def save_manifest(self, manifest: Manifest) -> None: ...


def _capture_partition(dev: str, sink: FileSink, name: str, progress: Progress, base_done: int, *,
                       index: int, start: int, size: int = 0, ptype: str = "") -> Partition:
    fstype = disks.fs_type(dev)
    tool, label = disks.partclone_for(fstype)
    cmd = [f"partclone.{tool}", "-c", "-s", dev, "-o", "-", *_partclone_log()]
    if tool == "dd":
        cmd = ["partclone.dd", "-s", dev, "-o", "-", *_partclone_log()]
    pc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    zs = subprocess.Popen(["zstd", "-q", "-T0", "-3", "-c"], stdin=pc.stdout, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert pc.stdout and pc.stderr and zs.stdout
    pc.stdout.close()
    tail: deque[bytes] = deque(maxlen=40)
    total = progress.bytes_total or 1
    size = size or total

    def on_percent(pct: float) -> None:  # partclone's percent is of this partition
        progress.update(percent=100.0 * (base_done + pct / 100.0 * size) / total)

    watcher = threading.Thread(target=watch_stderr, args=(pc.stderr, on_percent, tail), daemon=True)
    watcher.start()
    h = hashlib.sha256()
    written = 0
    out = sink.open(name)
    try:
        while chunk := zs.stdout.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            written += len(chunk)
            with progress.lock:
                progress.bytes_done = base_done + rchar(pc.pid)
        out.close()
    except BaseException:
        _kill_all(pc, zs)
        raise
    rc_pc, rc_zs = pc.wait(), zs.wait()
    watcher.join(5)
    if rc_pc != 0 or rc_zs != 0:
        raise ToolError(f"{cmd[0]} exited {rc_pc}, zstd exited {rc_zs} while capturing {dev}", _tail(tail))
    info = _parse_partclone_summary(tail)
    missing = [k for k in ("block_size", "total_blocks", "used_blocks") if k not in info]
    if missing:
        raise ToolError(f"{cmd[0]} did not report the {', '.join(missing)} of {dev}", _tail(tail))
    bs = info["block_size"]
    try:
        return Partition(
            index=index, name=part_name(index), start_bytes=start, size_bytes=size, type=ptype,
            filesystem=fstype or "unknown", partclone_fs=info.get("partclone_fs", label), tool=tool,
            file=name, sha256=h.hexdigest(), stream_bytes=written, compression="zstd",
            block_size=bs, total_blocks=info["total_blocks"], used_blocks=info["used_blocks"],
            total_bytes=info["total_blocks"] * bs, used_bytes=info["used_blocks"] * bs)
    except ProtocolError as exc:
        raise ToolError(f"partition {index} of the manifest: {exc}", _tail(tail)) from None


def _parse_partclone_summary(tail: deque[bytes]) -> dict[str, Any]:
    text = b"\n".join(tail).decode(errors="replace")
    info: dict[str, Any] = {}
    m = re.search(r"File system:\s*(\S+)", text)
    if m:  # what partclone wrote in the stream's header (FAT16/FAT32, not just FAT)
        info["partclone_fs"] = m.group(1)
    m = re.search(r"Block size:\s*(\d+)", text)
    if m:
        info["block_size"] = int(m.group(1))
    m = re.search(r"Device size:.*?=\s*(\d+) Blocks", text)
    if m:
        info["total_blocks"] = int(m.group(1))
    m = re.search(r"Space in use:.*?=\s*(\d+) Blocks", text)
    if m:
        info["used_blocks"] = int(m.group(1))
    return info


def capture_ng(disk: str, sink: FileSink, spec: JobSpec, progress: Progress) -> Manifest:
    """Capture `disk` into `sink` as partimage-ng; return the manifest (also written there)."""
    table = disks.partition_table(disk)
    disk_size = disks.size_of(disk)
    progress.bytes_total = disk_size
    parts: list[Partition] = []
    head = None
    if table is None:
        progress.stage = "capturing whole-disk filesystem"
        parts.append(_capture_partition(disk, sink, part_file(0), progress, 0, index=0, start=0,
                                        size=disk_size))
    else:
        sector = int(table["json"].get("sectorsize", 512))
        entries = [(_partition_number(e["node"], i), int(e["start"]) * sector, int(e["size"]) * sector,
                    e.get("type", "")) for i, e in enumerate(table["json"]["partitions"], start=1)]
        first = min(start for _, start, _, _ in entries)
        with open(disk, "rb") as fh:
            data = fh.read(first)
        sink.put(HEAD_FILE, data)
        head = DiskHead(file=HEAD_FILE, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        done = 0
        with disks.PartitionDevices(disk, [(n, start, size) for n, start, size, _ in entries]) as devs:
            for num, start, size, ptype in entries:
                progress.stage = f"capturing partition {num}"
                parts.append(_capture_partition(devs[num], sink, part_file(num), progress, done,
                                                index=num, start=start, size=size, ptype=ptype))
                done += size
    try:
        manifest = Manifest(
            name=spec.image.name,
            origin=CaptureOrigin(node=spec.node, disk=disk, job=spec.job_id),
            disk=Disk(size_bytes=disk_size, head=head, partition_table=None if table is None else
                      PartitionTable(type=table["type"], sfdisk=table["sfdisk"])),
            partitions=tuple(parts))
    except ProtocolError as exc:
        raise ToolError(f"the manifest of {disk}: {exc}") from None
    sink.save_manifest(manifest)
    return manifest


def _partition_number(node: str, fallback: int) -> int:
    m = re.search(r"(\d+)$", node)
    return int(m.group(1)) if m else fallback


def capture_partimage(disk: str, outdir: Path, spec: JobSpec, progress: Progress) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    name = spec.image.name
    progress.bytes_total = disks.size_of(disk)
    with disks.LoopAttach(disk) as dev:
        cmd = ["partimage", "-b", "-z1", "-o", "-d", "save", dev, str(outdir / name)]
        _run_with_rchar(cmd, progress, f"partimage save of {disk}")


def _run_with_rchar(cmd: list[str], progress: Progress, what: str) -> None:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout
    tail: deque[bytes] = deque(maxlen=40)
    watcher = threading.Thread(target=watch_stderr, args=(proc.stdout, lambda _p: None, tail), daemon=True)
    watcher.start()
    while proc.poll() is None:
        progress.update(bytes_done=min(rchar(proc.pid), progress.bytes_total or 1 << 62))
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
    watcher.join(5)
    if proc.returncode != 0:
        raise ToolError(f"{cmd[0]} exited {proc.returncode} ({what})", _strip_ansi(_tail(tail)))


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\(B", "", text)[-4000:]


# ---------------------------------------------------------------- restore

def _restore_partition(chunks: Iterator[bytes | memoryview], name: str, target: str, part: Partition,
                       progress: Progress, base: int) -> tuple[str, int]:
    """Stream a partition's compressed bytes through zstd into partclone.restore (or dd).

    Returns the sha256 of the bytes that went in, and how many. A chunk may be a view of
    a buffer its source reuses (agent/multicast.py): each is hashed and written before
    the next is asked for, and none is kept.
    """
    if part.raw:
        sink = ["dd", f"of={target}", "bs=4M", "conv=notrunc", "status=none"]
    else:
        # -i: no CRC32 of every block (0.46 s of CPU per 200 MiB): the sha256 of the whole
        # stream, taken here as it passes, covers every byte partclone reads, and a stream that
        # fails it is restored again (multicast) or fails the job. -f 1: partclone's progress
        # thread sleeps 1 s, not 2, between updates, and the restore ends only when it wakes.
        sink = ["partclone.restore", "-i", "-f", "1", "-s", "-", "-O", target, *_partclone_log()]
    zs = subprocess.Popen(["zstd", "-q", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    pc = subprocess.Popen(sink, stdin=zs.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert zs.stdin and zs.stdout and pc.stderr and zs.stderr
    widen_pipe(zs.stdin.fileno())
    widen_pipe(zs.stdout.fileno())
    zs.stdout.close()
    tail: deque[bytes] = deque(maxlen=40)
    watcher = threading.Thread(target=watch_stderr, args=(pc.stderr, lambda _p: None, tail), daemon=True)
    watcher.start()
    h = hashlib.sha256()
    done = 0
    try:
        for chunk in chunks:
            h.update(chunk)
            zs.stdin.write(chunk)
            done += len(chunk)
            progress.update(bytes_done=base + done)
    except BrokenPipeError:
        pass
    except BaseException:
        _kill_all(zs, pc)
        raise
    finally:
        try:
            zs.stdin.close()
        except BrokenPipeError:
            pass
    zs_err = zs.stderr.read()[-2000:].decode(errors="replace")
    rc_zs, rc_pc = zs.wait(), pc.wait()
    watcher.join(5)
    if rc_zs != 0 or rc_pc != 0:
        raise ToolError(f"zstd exited {rc_zs}, {sink[0]} exited {rc_pc} restoring {name} "
                        f"after {done} bytes of its stream", (zs_err + "\n" + _tail(tail)).strip())
    return h.hexdigest(), done


class StreamSource(Protocol):
    """Where the files of an image come from (agent/transport.py)."""

    def describe(self, name: str) -> str: ...
    def read(self, name: str, limit: int = ...) -> bytes: ...
    def chunks(self, name: str, on_resume: Callable[[int, str], None] | None = None) -> Iterator[bytes]: ...


class PartitionFeed(Protocol):
    """Another way to get a partition's stream (multicast); None: use the store."""

    def stream(self, part: Partition) -> Iterator[bytes | memoryview] | None: ...
    def failed(self, part: Partition, why: str) -> None: ...


def _mismatch(part: Partition, got: str, size: int, where: str) -> str:
    return (f"{part.file}: sha256 of the {size} bytes read from {where} is {got[:16]}..., the manifest "
            f"says {part.sha256[:16]}... ({part.stream_bytes} bytes); the image or the transfer is damaged")


def restore_ng(disk: str, source: StreamSource, spec: JobSpec, progress: Progress,
               feed: PartitionFeed | None = None,
               note: Callable[[str], None] | None = None) -> tuple[dict[str, str], Manifest]:
    """Restore a partimage-ng image; the sha256 of every stream as read, and the manifest used.

    The farm checks both against the image as it registered it (tasks/finalize.py); a
    manifest whose streams disagree with the registry's checksums is refused here already,
    before anything is written to the disk.
    """
    try:
        manifest = Manifest.from_text(source.read(MANIFEST_FILE).decode("utf-8", errors="replace"))
    except ProtocolError as exc:
        raise ToolError(f"{source.describe(MANIFEST_FILE)}: {exc}") from None
    registered = spec.image.checksums
    for p in manifest.partitions:
        if registered and registered.get(p.file) != p.sha256:
            raise ToolError(f"{source.describe(MANIFEST_FILE)} names {p.file} with sha256 {p.sha256[:16]}..., "
                            f"the farm registered {(registered.get(p.file) or 'no such stream')[:16]}...: "
                            "the manifest was changed after the image was registered")
    parts = manifest.partitions
    progress.bytes_total = sum(p.stream_bytes for p in parts)
    table = manifest.disk.partition_table
    need = max(p.start_bytes + p.size_bytes for p in parts)
    have = disks.size_of(disk)
    if have < need:
        raise ToolError(f"target disk {disk} has {have} bytes; the image needs {need}")
    files: dict[str, str] = {}
    done = 0

    def resumed(name: str) -> Callable[[int, str], None]:
        def on_resume(offset: int, why: str) -> None:
            if note is not None:
                note(f"{name}: transfer broke at byte {offset} ({why}); resuming from there")
        return on_resume

    def one(p: Partition, target: str) -> str:
        if feed is not None:
            stream = feed.stream(p)
            if stream is not None:
                try:
                    got, size = _restore_partition(stream, p.file, target, p, progress, done)
                except Exception as exc:  # noqa: BLE001 - the store is the fallback
                    feed.failed(p, str(exc))
                else:
                    if got == p.sha256:
                        return got
                    feed.failed(p, _mismatch(p, got, size, "the multicast session"))
        got, size = _restore_partition(source.chunks(p.file, resumed(p.file)), p.file, target, p,
                                       progress, done)
        if got != p.sha256:
            raise ToolError(_mismatch(p, got, size, source.describe(p.file)))
        return got

    if table is None:
        p = parts[0]
        progress.stage = "restoring whole-disk filesystem"
        files[p.file] = one(p, disk)
    else:
        head = manifest.disk.head
        if head:
            data = source.read(head.file)
            files[head.file] = hashlib.sha256(data).hexdigest()
            if files[head.file] != head.sha256:
                raise ToolError(f"{head.file}: sha256 differs from the manifest; the image is damaged")
            with open(disk, "r+b") as fh:
                fh.write(data)
        _run_checked(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk], stdin=table.sfdisk)
        spans = [(p.index, p.start_bytes, p.size_bytes) for p in parts]
        with disks.PartitionDevices(disk, spans) as devs:
            for p in parts:
                progress.stage = f"restoring partition {p.index}"
                files[p.file] = one(p, devs[p.index])
                done += p.stream_bytes
    return files, manifest


def restore_partimage(disk: str, imgdir: Path, spec: JobSpec, progress: Progress) -> dict[str, str]:
    vols = sorted(p for p in imgdir.iterdir() if p.is_file())
    first = next((p for p in vols if p.name.endswith(".000")), vols[0] if vols else None)
    if first is None:
        raise ToolError(f"no partimage volumes in {imgdir}")
    progress.bytes_total = sum(p.stat().st_size for p in vols)
    files = {p.name: sha256_file(p).sha256 for p in vols}
    for name, digest in spec.image.checksums.items():
        if files.get(name) != digest:
            raise ToolError(f"{name}: sha256 differs from the registry; the image is damaged")
    with disks.LoopAttach(disk) as dev:
        if first.name.endswith(".000"):
            _run_with_rchar(["partimage", "-b", "restore", dev, str(first)], progress,
                            f"partimage restore of {first.name}")
        else:
            _restore_partimage_stdin(vols, dev, progress)
    return files


# The outer layer of a legacy archive kept the way Clonezilla writes it (partimage -z0 to
# stdout | compressor | split): partimage reads neither a split set nor lzop/xz/zstd
# files, and from stdin only uncompressed data, so anything but NAME.000 goes through
# stdin with its one layer removed here.  First bytes -> how
# to undo it (docs/formats.md A1).
_MAGICS = ((1, b"LZO", "lzo"), (0, b"BZh", "bzip2"), (0, b"\x1f\x8b", "gzip"),
           (0, b"\xfd7zXZ\x00", "xz"), (0, b"\x28\xb5\x2f\xfd", "zstd"), (0, b"\x5d\x00\x00", "lzma"))
_UNDO = {"lzo": ["lzop", "-dc"], "bzip2": ["bzip2", "-dc"], "gzip": ["gzip", "-dc"],
         "xz": ["xz", "-dc"], "zstd": ["zstd", "-dcq"], "lzma": ["xz", "-dc", "--format=lzma"]}


def _outer_layer(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    for off, magic, kind in _MAGICS:
        if head[off:off + len(magic)] == magic:
            return kind
    return "none"


def _restore_partimage_stdin(vols: list[Path], dev: str, progress: Progress) -> None:
    """`cat PIECES | DECOMPRESS | partimage restore DEV stdin`, as Clonezilla restores them.

    The pieces are fed from here (in suffix order, which sorted() gives for
    split's fixed-width names), so progress counts the bytes read."""
    undo = _UNDO.get(_outer_layer(vols[0]))
    pi = subprocess.Popen(["partimage", "-b", "restore", dev, "stdin"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert pi.stdin and pi.stdout
    dec = None
    sink = pi.stdin
    if undo is not None:
        dec = subprocess.Popen(undo, stdin=subprocess.PIPE, stdout=pi.stdin, stderr=subprocess.PIPE)
        pi.stdin.close()
        assert dec.stdin
        sink = dec.stdin
    tail: deque[bytes] = deque(maxlen=40)
    watcher = threading.Thread(target=watch_stderr, args=(pi.stdout, lambda _p: None, tail), daemon=True)
    watcher.start()
    done = 0
    try:
        for v in vols:
            with open(v, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    sink.write(chunk)
                    done += len(chunk)
                    progress.update(bytes_done=done)
    except BrokenPipeError:
        pass  # the tool stopped early; its exit status says why
    finally:
        with contextlib.suppress(OSError):
            sink.close()
    dec_rc = dec.wait() if dec is not None else 0
    rc = pi.wait()
    watcher.join(5)
    if dec is not None and dec_rc != 0:
        assert dec.stderr
        raise ToolError(f"{undo[0] if undo else ''} exited {dec_rc} (decompressing {vols[0].name})",
                        dec.stderr.read(2000).decode("utf-8", "replace"))
    if rc != 0:
        raise ToolError(f"partimage exited {rc} (partimage restore of {vols[0].name} from stdin)",
                        _strip_ansi(_tail(tail)))
