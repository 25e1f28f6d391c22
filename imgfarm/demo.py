"""`make demo`: the farm's main job on embedded defaults, start to finish.

Sets up a private farm under ./.imgfarm-demo (SQLite job database, local
image store, sim drivers, its own Redis on a free port — or, without Redis
installed, Celery's file-system broker), starts the API and a worker as
processes, creates 8 simulated nodes whose disks hold a real ext4
filesystem, captures node01, restores the image to the other 7 at once,
checks every restored disk byte for byte against the source, restores the
committed legacy partimage sample to one node and checks it, converts the
same sample to partimage-ng and restores that to another node (it must give
the bytes partimage gives), and prints the job table. Exit 0 only if all of
that held.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgfarm.protocol import BootTarget, ImageFormat

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "legacy"
BIN = Path(sys.executable).parent


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.failures: list[str] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def wait_until(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise SystemExit(f"demo: timed out waiting for {what}; see {self.base}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(BIN / "imgfarm"), *args], env=self.env, text=True, capture_output=True)
        if check and out.returncode != 0:
            sys.stdout.write(out.stdout)
            sys.stderr.write(out.stderr)
            raise SystemExit(f"demo: `imgfarm {' '.join(args)}` exited {out.returncode}")
        return out

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def make_source_disk(path: Path, size_mib: int) -> None:
    content = path.parent / "node01-content"
    shutil.rmtree(content, ignore_errors=True)
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("node01\n")
    (content / "etc" / "motd").write_text("Restored by imgfarm.\n")
    shutil.copytree(ROOT / "agent", content / "opt" / "imgfarm-agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (content / "var").mkdir()
    (content / "var" / "random.bin").write_bytes(os.urandom(4 << 20))
    (content / "var" / "zeros.bin").write_bytes(bytes(2 << 20))
    with open(path, "wb") as fh:
        fh.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "demo-root", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", "-d", str(content), str(path)],
                   check=True, capture_output=True)


def restore_sample(demo: Demo, node: str, disk: Path, image: str, sample: dict[str, Any],
                   reference: str, failure: str) -> None:
    """Restore `image` onto `node`'s zero-filled disk; its partition must hash like the
    committed legacy sample restored by partimage itself."""
    with open(disk, "r+b") as fh:  # a zero-filled target, as the reference restore had
        fh.truncate(0)
        fh.truncate(64 << 20)
    out = demo.cli("restore", node, "--image", image, "--wait", check=False)
    print(out.stdout.rstrip())
    with open(disk, "rb") as fh:
        digest = hashlib.sha256(fh.read(sample["partition_size_bytes"])).hexdigest()
    ok = out.returncode == 0 and digest == sample["restored_sha256"]
    print(f"    {node} partition sha256 {digest[:16]}... {'matches' if ok else 'DOES NOT MATCH'} "
          f"{reference}")
    if not ok:
        demo.failures.append(failure)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (sim nodes use loop devices for partimage)", file=sys.stderr)
        return 2
    base = Path(os.environ.get("IMGFARM_DEMO_DIR", ROOT / ".imgfarm-demo")).resolve()
    shutil.rmtree(base, ignore_errors=True)
    (base / "disks").mkdir(parents=True)
    demo = Demo(base)
    api_port = free_port()
    demo.env.update({
        "IMGFARM_DATA_DIR": str(base / "data"),
        "IMGFARM_API_PORT": str(api_port),
        "IMGFARM_API_URL": f"http://127.0.0.1:{api_port}",
        "IMGFARM_PROGRESS_INTERVAL": "1",
        "COLUMNS": "120",
    })
    for key in ("IMGFARM_DATABASE_URL", "IMGFARM_IMAGE_STORE", "IMGFARM_SIM_DIR", "IMGFARM_REDIS_URL",
                "IMGFARM_RESULT_BACKEND", "IMGFARM_CONFIG"):
        demo.env.pop(key, None)
    started = time.monotonic()
    try:
        redis_server = shutil.which("redis-server")
        if os.environ.get("IMGFARM_DEMO_BROKER") == "filesystem":  # try the no-Redis path
            redis_server = None
        if redis_server:
            port = free_port()
            say(f"starting a private Redis on 127.0.0.1:{port}")
            demo.start("redis", [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                 "--appendonly", "no", "--dir", str(base)])
            demo.env["IMGFARM_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
            import redis

            demo.wait_until(lambda: redis.Redis(port=port).ping(), 20, "redis")
        else:
            say("redis-server not installed: using Celery's file-system broker")
            demo.env["IMGFARM_BROKER_URL"] = "filesystem://"
        say("creating the job database (SQLite)")
        demo.cli("db", "upgrade")
        say("starting the API and a job worker")
        demo.start("api", [str(BIN / "imgfarm"), "api"])
        demo.start("worker", [str(BIN / "imgfarm"), "worker", "--concurrency", "32"])
        import httpx

        demo.wait_until(lambda: httpx.get(f"http://127.0.0.1:{api_port}/healthz").status_code == 200, 60, "the API")
        demo.wait_until(lambda: b"ready." in (base / "worker.log").read_bytes(), 90, "the worker")

        say("creating 8 simulated nodes (64 MiB disks; node01 holds an ext4 filesystem with files)")
        disks = {}
        for i in range(1, 9):
            name = f"node{i:02d}"
            disk = base / "disks" / f"{name}.img"
            if i == 1:
                make_source_disk(disk, 64)
            else:
                with open(disk, "wb") as fh:
                    fh.truncate(64 << 20)
            disks[name] = disk
            demo.cli("node", "add", name, "--disk", str(disk), "--group", "demo",
                     "--mac", f"52:54:00:00:00:{i:02x}")

        say(f"capturing node01 to image demo-base ({ImageFormat.NG}: partclone + zstd)")
        out = demo.cli("capture", "node01", "--image", "demo-base", "--wait", check=False)
        print(out.stdout.rstrip())
        if out.returncode != 0:
            demo.failures.append("capture of node01 failed")

        say("restoring demo-base to node[02-08] at once")
        out = demo.cli("restore", "node[02-08]", "--image", "demo-base", "--wait", check=False)
        print(out.stdout.rstrip())
        if out.returncode != 0:
            demo.failures.append("a restore failed")

        say("verifying every restored disk against node01's, byte for byte")
        for name in [f"node{i:02d}" for i in range(2, 9)]:
            same = filecmp.cmp(disks["node01"], disks[name], shallow=False)
            fsck = subprocess.run(["e2fsck", "-fn", str(disks[name])], capture_output=True).returncode == 0
            print(f"    {name}: {'identical' if same else 'DIFFERENT'}, fsck {'clean' if fsck else 'FAILED'}")
            if not (same and fsck):
                demo.failures.append(f"{name} does not match node01")

        say("importing the legacy partimage sample and restoring it to node08")
        sample = json.loads((SAMPLE / "sample-ext2.json").read_text())
        demo.cli("image", "import", str(SAMPLE / "sample-ext2.000"), "--name", "legacy-sample")
        print(demo.cli("image", "inspect", "legacy-sample").stdout.rstrip())
        restore_sample(demo, "node08", disks["node08"], "legacy-sample", sample,
                       "what partimage restore gives", "legacy restore to node08 did not match")

        say(f"converting the legacy sample to {ImageFormat.NG} (no broker, no node) and restoring it "
            "to node07")
        print("    " + demo.cli("image", "convert", "legacy-sample", "--name", "legacy-sample-ng")
              .stdout.strip())
        restore_sample(demo, "node07", disks["node07"], "legacy-sample-ng", sample,
                       "what partimage restore of the original gives",
                       "the converted legacy image restored to node07 did not match")

        say("boot state of every node after its jobs")
        for name in disks:
            target = json.loads((base / "data" / "sim" / name / "boot.json").read_text())["target"]
            print(f"    {name}: next boot {target}")
            if target != BootTarget.LOCAL:
                demo.failures.append(f"{name} was left netbooting")

        say("jobs")
        print(demo.cli("jobs").stdout.rstrip())
    finally:
        demo.stop()
    took = time.monotonic() - started
    if demo.failures:
        print(f"\ndemo FAILED after {took:.0f}s: " + "; ".join(demo.failures))
        print(f"logs: {base}")
        return 1
    print(f"\ndemo OK in {took:.0f}s: 1 capture, 7 restores verified byte for byte, 1 legacy restore "
          f"and 1 converted legacy image verified against partimage; every node back to local "
          f"boot. Files under {base}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
