"""A farm for one test: its own data dir, database, Redis DB and API port.

`Farm` starts the real services as processes (uvicorn API, Celery workers,
beat) with the test's environment, runs the real `imgfarm` CLI, and stops
everything it started, even when the test fails. Sim nodes get real ext4
filesystems in disk files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import forget_redis_keys, redis_prefix, wait_for

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Farm:
    def __init__(self, root: Path, database_url: str, redis_db: int, **extra_env: str) -> None:
        self.root = root
        self.port = free_port()
        self.key_prefix = redis_prefix()
        self.env = {
            **os.environ,
            "IMGFARM_DATA_DIR": str(root / "data"),
            "IMGFARM_DATABASE_URL": database_url,
            "IMGFARM_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
            # a prefix of its own: farms sharing this Redis (parallel tests, other runs)
            # never take each other's tasks, events or wake-ups, nor delete them
            "IMGFARM_BROKER_PREFIX": self.key_prefix,
            "IMGFARM_API_PORT": str(self.port),
            "IMGFARM_API_URL": f"http://127.0.0.1:{self.port}",
            "IMGFARM_PROGRESS_INTERVAL": "0.5",
            "IMGFARM_WORKER_HEARTBEAT": "1",
            "IMGFARM_WORKER_DEAD_AFTER": "5",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.prefix: list[str] = []  # e.g. `ip netns exec NS`: the farm runs in a namespace
        self.redis_db = redis_db
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "disks").mkdir(exist_ok=True)

    # ------------------------------------------------------------ processes
    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed by the child
        proc = subprocess.Popen(
            [*self.prefix, str(VENV_BIN / "imgfarm"), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self._start("api", "api")
        url = f"{self.env['IMGFARM_API_URL']}/healthz"
        if self.prefix:  # ask from inside the farm's namespace
            probe = [*self.prefix, sys.executable, "-c",
                     f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1)"]
            wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 30,
                     what="the API to answer")
            return
        wait_for(lambda: httpx.get(url, timeout=1).status_code == 200, 30, what="the API to answer")

    def start_worker(self, name: str = "worker", concurrency: int = 20, cpu: bool = False) -> None:
        args = ["worker", "--concurrency", str(concurrency), "--hostname", f"{name}-{os.getpid()}@%h"]
        if cpu:
            args.append("--cpu")
        self._start(name, *args)
        wait_for(lambda: b"ready." in (self.root / f"{name}.log").read_bytes(), 60,
                 what=f"worker {name} to be ready")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            self.procs.pop(name, None)
        # sim agents run in their own sessions, like real nodes: stop them too
        for power in (self.root / "data" / "sim").glob("*/power.json"):
            try:
                import json

                pid = int(json.loads(power.read_text()).get("pid") or 0)
                if pid:
                    os.killpg(pid, signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError, OSError):
                pass

    def forget_redis(self) -> None:
        """Delete this farm's keys (queues, results, event state) from the shared Redis."""
        forget_redis_keys(self.redis_db, self.key_prefix)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ CLI
    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.prefix, str(VENV_BIN / "imgfarm"), *args], env={**self.env, "COLUMNS": "200"},
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"imgfarm {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def cli_json(self, *args: str) -> Any:
        import json

        return json.loads(self.cli(*args, "--json").stdout)

    # ------------------------------------------------------------ waiting on jobs
    def job_states(self, submitted_by: str | None = None) -> dict[int, str]:
        """Every job's state (or those `submitted_by`), read from the job database. Waits poll
        this and not the CLI: each CLI call is a whole Python process, so polling through it
        keeps a core busy."""
        import sqlalchemy as sa

        query = "SELECT id, state FROM jobs" + (" WHERE submitted_by = :by" if submitted_by else "")
        eng = sa.create_engine(self.env["IMGFARM_DATABASE_URL"], poolclass=sa.pool.NullPool)
        try:
            with eng.connect() as conn:
                return {row[0]: row[1] for row in conn.execute(sa.text(query), {"by": submitted_by})}
        finally:
            eng.dispose()

    def wait_job(self, job_id: int, wanted: Collection[str], timeout: float) -> dict[str, Any]:
        """The CLI's view of the job (`imgfarm job N --json`) once its state is one of `wanted`."""
        wait_for(lambda: self.job_states().get(job_id) in wanted, timeout, interval=0.25,
                 what=f"job {job_id} to be {' or '.join(wanted)}")
        return self.cli_json("job", str(job_id))

    # ------------------------------------------------------------ sim nodes
    def make_disk(self, name: str, size_mib: int = 32, fill: bool = True) -> Path:
        """A disk file holding a real ext4 filesystem with files (or all zeros)."""
        path = self.root / "disks" / f"{name}.img"
        with open(path, "wb") as fh:
            fh.truncate(size_mib << 20)
        if fill:
            src = self.root / "disks" / f"{name}-content"
            (src / "etc").mkdir(parents=True, exist_ok=True)
            (src / "etc" / "hostname").write_text(f"{name}\n")
            (src / "README").write_text("imgfarm test disk\n" * 200)
            (src / "random.bin").write_bytes(os.urandom(512 << 10))
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                            "-d", str(src), str(path)], check=True, capture_output=True)
        return path

    def add_node(self, name: str, *extra: str, size_mib: int = 32, fill: bool = False) -> Path:
        disk = self.make_disk(name, size_mib, fill)
        self.cli("node", "add", name, "--disk", str(disk), *extra)
        return disk


@contextlib.contextmanager
def running_farm(root: Path, database_url: str, redis_db: int, **extra_env: str) -> Iterator[Farm]:
    """A migrated farm whose processes are stopped and Redis keys deleted afterwards.

    Only its own keys: the Redis DB is shared with other farms running at the same time.
    """
    farm = Farm(root, database_url, redis_db, **extra_env)
    try:
        farm.cli("db", "upgrade")
        yield farm
    finally:
        farm.stop()
        farm.forget_redis()
