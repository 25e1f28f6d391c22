"""Shared test helpers: waiting on conditions, loop devices, sparse disks.

Nothing here sleeps and hopes: `wait_for` polls a condition against a
deadline and fails with what it last saw; `loop_device` always detaches,
even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    cond: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Return cond()'s first truthy value, or fail at the deadline naming `what`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = cond()
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def redis_prefix() -> str:
    """A key and channel prefix (IMGFARM_BROKER_PREFIX) no other test or test run uses."""
    return f"t{uuid.uuid4().hex[:10]}:"


# The prefix of the in-process tests of this pytest process (one per xdist worker). Per
# process, not per test: the process's wake-up listener subscribes once, under the
# prefix it first sees (tasks/wakeup.py).
PROCESS_PREFIX = redis_prefix()


def forget_redis_keys(db: int, prefix: str) -> None:
    """Delete the keys under `prefix` in Redis DB `db`: a test cleans up only its own,
    never the whole DB (flushdb would wipe the queues of farms running beside it)."""
    import redis

    assert prefix, "an empty prefix would delete every key"
    client = redis.Redis(db=db)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


def run(*cmd: str | Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], check=check, text=True, capture_output=True, **kw  # type: ignore[call-overload]
    )


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:  # type: ignore[type-arg]
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def use_redis_db(monkeypatch: pytest.MonkeyPatch, db: int, prefix: str) -> None:
    """Point this process's broker, results and wake-ups at Redis DB `db` under key `prefix`
    (other tests share the DB at the same time), and make the settings and the Celery app
    read it again."""
    from imgfarm.config.settings import get_settings
    from imgfarm.tasks.broker import reload_config

    url = f"redis://127.0.0.1:6379/{db}"
    for name in ("IMGFARM_REDIS_URL", "IMGFARM_BROKER_URL", "IMGFARM_RESULT_BACKEND"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("IMGFARM_BROKER_PREFIX", prefix)
    get_settings.cache_clear()
    reload_config()


def kill_session(proc: subprocess.Popen, timeout: float = 10) -> None:  # type: ignore[type-arg]
    """SIGKILL a server started with start_new_session=True and everything in its session
    (ipmi_sim's chassis program, ganesha's threads' children), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


@contextlib.contextmanager
def loop_device(path: Path, partitions: bool = False) -> Iterator[str]:
    """Attach `path` to a free loop device; detach it whatever happens."""
    args = ["losetup", "-f", "--show"] + (["-P"] if partitions else []) + [str(path)]
    dev = run(*args).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["umount", "-l", dev], capture_output=True)
        detach_loop(dev, path)


@contextlib.contextmanager
def loop_device_at(path: Path, offset: int, size: int | None) -> Iterator[str]:
    """A loop device over part of a file (a partition), detached whatever happens."""
    args = ["losetup", "-f", "--show", "--offset", str(offset)]
    if size is not None:
        args += ["--sizelimit", str(size)]
    dev = run(*args, path).stdout.strip()
    try:
        yield dev
    finally:
        detach_loop(dev, path)


def detach_loop(dev: str, backing: Path) -> None:
    """Detach `dev`, which the caller attached to `backing`.

    The kernel defers the detach of a device that is still open (it goes on the last close),
    so one `losetup -d` is normally enough. A failed one is retried only while `dev` is still
    bound to `backing`: once the device is free another test may attach it, and a blind retry
    would detach that test's device under it.
    """
    want = str(Path(backing).resolve())
    for _ in range(50):
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            return
        bound = loop_backing(dev)
        if bound is None or bound.removesuffix(" (deleted)") != want:
            return  # not bound any more, or bound to another test's file
        time.sleep(0.1)


def loop_backing(dev: str) -> str | None:
    """The file a loop device is bound to, as the kernel names it; None when it is free."""
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def mounted(dev: str, mountpoint: Path, *opts: str) -> Iterator[Path]:
    """Mount `dev` on `mountpoint`; unmount whatever happens."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", *opts, dev, mountpoint)
    try:
        yield mountpoint
    finally:
        # A freeze writes the superblock as it stands (`sync` does not, on ext2). The unmount
        # may not: a process that entered a network namespace with `ip netns exec` meanwhile
        # (the multicast tests) holds a copy of this mount in its own mount namespace, which
        # keeps the file system alive after our unmount, its superblock's counts those of
        # mkfs -- and partimage refuses such a device ("Can't read bitmap block 0").
        for step in ("-f", "-u"):
            subprocess.run(["fsfreeze", step, str(mountpoint)], capture_output=True)
        unmount(mountpoint)


def unmount(mountpoint: Path, timeout: float = 20) -> None:
    """Unmount, and make sure it happened: a busy mount point is retried until `timeout`,
    then the test fails naming who holds it (a failed unmount went unnoticed before)."""
    deadline = time.monotonic() + timeout
    while True:
        p = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if p.returncode == 0 or not os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            who = subprocess.run(["fuser", "-vm", str(mountpoint)], capture_output=True, text=True)
            raise AssertionError(f"cannot unmount {mountpoint}: {p.stderr.strip()}; "
                                 f"held by: {(who.stdout + who.stderr).strip()}")
        time.sleep(0.2)


IS_ROOT = os.geteuid() == 0
