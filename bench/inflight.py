"""Benchmark: thousands of jobs in flight on one worker host (goals for --jobs 5000, issue 12).

Starts a private farm (SQLite by default, `--db postgresql` for PostgreSQL;
its own Redis DB; the API; ONE job worker, threads pool), creates N sim nodes
whose agent is played by this script (driver_info agent=external: power-on
starts no process, so the agents' own start-up is not counted), submits one
restore to all of them, and measures:

- the time from submit to the last node's boot call (the sim power driver's
  power-on, i.e. the end of boot_agent + reboot, read from its file times);
- the worker's peak RSS (VmHWM) and its CPU use while all N jobs wait and
  the fake agents report progress every --report seconds;
- for comparison, in the same run: the RSS of one bare Python process that
  imports the task code — the floor of a one-process-per-job design, times N;
  and the CLI's own start (`imgfarm restore --help`), the floor of any submit
  made with one CLI command.

Goals: 500 jobs, the last boot call < 5 s after the submit and < 300 MB; 5,000 jobs,
< 10 s, < 500 MB and a CLI submit < 3 s; both < 5 % of a core while they wait.

Run: .venv/bin/python bench/inflight.py [--jobs 500] [--hold 30] [--report 20] [--py-spy FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
HZ = os.sysconf("SC_CLK_TCK")
CHECKSUMS = {"bench.000": "0" * 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / HZ
    return total


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--hold", type=float, default=30.0, help="seconds all jobs wait before the agents finish")
    ap.add_argument("--report", type=float, default=20.0, help="seconds between one agent's progress reports")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--redis-db", type=int, default=13)
    ap.add_argument("--via", choices=["cli", "api"], default="cli",
                    help="submit with the imgfarm CLI (a new process) or POST to the running API")
    ap.add_argument("--py-spy", metavar="FILE", default="",
                    help="profile the worker from submit to the last boot call with py-spy (collapsed stacks)")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="imgfarm-bench-"))
    port = free_port()
    env = {**os.environ,
           "IMGFARM_DATA_DIR": str(base / "data"),
           "IMGFARM_BROKER_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
           "IMGFARM_API_PORT": str(port), "IMGFARM_API_URL": f"http://127.0.0.1:{port}",
           "IMGFARM_HEARTBEAT_TIMEOUT": str(max(120.0, args.report * 4)),
           "IMGFARM_BOOT_TIMEOUT": "300"}
    if args.db == "postgresql":
        import sqlalchemy as sa

        name = f"imgfarm_bench_{os.getpid()}"
        admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        env["IMGFARM_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    os.environ.update(env)
    import redis

    redis.Redis(db=args.redis_db).flushdb()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *cmd: str) -> subprocess.Popen[bytes]:
        log = open(base / f"{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([str(BIN / "imgfarm"), *cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        subprocess.run([str(BIN / "imgfarm"), "db", "upgrade"], env=env, check=True, capture_output=True)
        from imgfarm.models.db import session_scope
        from imgfarm.models.images import register_image
        from imgfarm.models.tables import Node
        from imgfarm.protocol import ImageFormat

        with session_scope() as s:
            for i in range(1, args.jobs + 1):
                s.add(Node(name=f"b{i:04d}", disk="/dev/null", driver_info={"agent": "external"}))
            # a legacy image (no manifest): the fake agents report its one checksum, so the
            # farm's check of every restore passes (tasks/finalize.py)
            register_image(s, "bench", ImageFormat.PARTIMAGE, "bench", size_bytes=1, checksums=CHECKSUMS)
        start("api", "api")
        worker = start("worker", "worker", "--concurrency", str(args.jobs + 50), "--loglevel", "WARNING")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        celery_pid = _child_pid(worker.pid)
        time.sleep(5)  # let the worker connect and print ready
        print(f"machine: {os.cpu_count()} cores; {args.jobs} jobs; db {args.db}; submit via {args.via}; "
              f"worker pid {celery_pid}")

        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--nonblocking", "--threads", "--format", "raw",
                                    "-r", "50", "-o", args.py_spy, "-p", str(celery_pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        big = args.jobs > 500
        cli_floor = time.time()  # before the submit: the worker is busy booting nodes after it
        subprocess.run([str(BIN / "imgfarm"), "restore", "--help"], env=env, capture_output=True, check=True)
        cli_floor = time.time() - cli_floor
        t0 = time.time()
        nodes = f"b[0001-{args.jobs:04d}]"
        if args.via == "cli":
            out = subprocess.run([str(BIN / "imgfarm"), "restore", nodes, "--image", "bench", "--json"],
                                 env=env, capture_output=True, text=True, check=True)
            job_ids = json.loads(out.stdout)["job_ids"]
        else:
            r = httpx.post(f"http://127.0.0.1:{port}/api/v1/jobs/restore", json={"nodes": nodes, "image": "bench"},
                           timeout=120)
            r.raise_for_status()
            job_ids = r.json()["job_ids"]
        submitted = time.time()
        sim = base / "data" / "sim"
        deadline = time.monotonic() + 120
        # each node's file is read until it says on, then never again: re-reading all 5,000
        # every 0.2 s cost this script 0.15 s of CPU a pass, taken from the worker on 2 cores
        # (the boot times come from the files' mtimes, so polling less loses no precision)
        waiting = {f"b{i:04d}" for i in range(1, args.jobs + 1)}
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                try:
                    if json.loads((sim / name / "power.json").read_text()).get("state") == "on":
                        waiting.discard(name)
                except (FileNotFoundError, ValueError):
                    pass
            time.sleep(0.5)
        times = sorted(p.stat().st_mtime for p in sim.glob("*/power.json"))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        last_boot = times[-1]
        print(f"submit ({args.via}, {args.jobs} rows + enqueue): {submitted - t0:.2f} s"
              + ("   (goal < 3 s)" if big and args.via == "cli" else "")
              + f"; comparison: the CLI's start alone (restore --help) {cli_floor:.2f} s")
        print(f"first boot call at "
              f"{times[0] - t0:.2f} s, median {times[len(times) // 2] - t0:.2f} s")
        print(f"submit -> last boot call: {last_boot - t0:.2f} s   (goal < {10 if big else 5} s)")

        asyncio.run(_agents(sim, args, celery_pid))
        deadline = time.monotonic() + 120
        from imgfarm.models.tables import Job

        while time.monotonic() < deadline:
            with session_scope() as s:
                done = s.query(Job).filter(Job.id.in_(job_ids), Job.state == "succeeded").count()
            if done == len(job_ids):
                break
            time.sleep(0.5)
        print(f"jobs succeeded: {done}/{len(job_ids)}")
        if done < len(job_ids):
            with session_scope() as s:
                rows = s.query(Job.state, Job.error).filter(Job.id.in_(job_ids)).all()
            print("  states:", dict(Counter(r[0] for r in rows)), "e.g.", next((r[1] for r in rows if r[1]), ""))
        print(f"worker peak RSS (VmHWM): {status_kb(celery_pid, 'VmHWM') / 1024:.1f} MB   "
              f"(goal < {500 if big else 300} MB)")
        floor = subprocess.run([sys.executable, "-c",
                                "import imgfarm.tasks.jobs, imgfarm.tasks.convert, imgfarm.tasks.reconcile\n"
                                "print(open('/proc/self/status').read())"], env=env, capture_output=True, text=True)
        rss = next(int(line.split()[1]) for line in floor.stdout.splitlines() if line.startswith("VmRSS"))
        print(f"comparison: one process per job would need >= {args.jobs} x {rss / 1024:.1f} MB = "
              f"{args.jobs * rss / 1024 / 1024:.1f} GB")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        redis.Redis(db=args.redis_db).flushdb()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _child_pid(pid: int) -> int:
    """`imgfarm worker` execs celery, so the pid is the worker's own."""
    return pid


async def _agents(sim: Path, args: argparse.Namespace, worker_pid: int) -> None:
    """Play N agents: progress every --report s for --hold s, then success; sample the worker's CPU."""
    orders = []
    for cmd in sorted(sim.glob("*/cmdline")):
        params = dict(w.split("=", 1) for w in cmd.read_text().split() if w.startswith("imgfarm."))
        orders.append((params["imgfarm.api"], int(params["imgfarm.job"])))
    limits = httpx.Limits(max_connections=50)
    # at most 50 requests outstanding: httpcore's pool scans its whole queue per request,
    # so 5,000 queued at once made this script, not the farm, the slow part
    outstanding = asyncio.Semaphore(50)
    retried: Counter[str] = Counter()
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def send(url: str, body: dict, headers: dict[str, str]) -> httpx.Response:
            for attempt in range(5):
                try:
                    async with outstanding:
                        r = await client.post(url, json=body, headers=headers)
                    if not (attempt and r.status_code == 409):  # a retried result that had arrived
                        r.raise_for_status()
                    return r
                except httpx.TransportError as exc:  # as the real agent does: try again
                    if attempt == 4:
                        raise
                    retried[type(exc).__name__] += 1
                    await asyncio.sleep(0.5)
            raise AssertionError("unreachable")

        async def claim(api: str, job: int) -> tuple[str, int, str]:
            # the agent's first call: the boot files carry no token (api/agent_routes.py)
            r = await send(f"{api}/agent/v1/jobs/{job}/token", {"macs": []}, {})
            return api, job, r.json()["token"]

        claimed = await asyncio.gather(*(claim(a, j) for a, j in orders))

        async def post(api: str, job: int, token: str, path: str, body: dict) -> None:
            await send(f"{api}/agent/v1/jobs/{job}{path}", body, {"Authorization": f"Bearer {token}"})

        await asyncio.gather(*(post(a, j, t, "/progress", {"percent": 1}) for a, j, t in claimed))
        await asyncio.sleep(2)
        cpu0, w0 = cpu_seconds(worker_pid), time.monotonic()
        start = time.monotonic()
        n = 0
        sending: set[asyncio.Task[None]] = set()
        while time.monotonic() - start < args.hold:
            # each agent reports once per --report seconds, spread evenly over the clock (not
            # one after the other: 5,000 agents report 250 times a second)
            due = start + n * args.report / len(claimed)
            if time.monotonic() < due:
                await asyncio.sleep(due - time.monotonic())
            slot = claimed[n % len(claimed)]
            n += 1
            pct = min(99.0, 1 + 98 * (time.monotonic() - start) / args.hold)
            task = asyncio.create_task(post(*slot, "/progress", {"percent": pct}))
            sending.add(task)
            task.add_done_callback(sending.discard)
        await asyncio.gather(*sending)
        cpu1, w1 = cpu_seconds(worker_pid), time.monotonic()
        print(f"while all {len(orders)} wait ({w1 - w0:.0f} s, {n} progress reports): worker CPU "
              f"{100 * (cpu1 - cpu0) / (w1 - w0):.2f}% of one core   (goal < 5%)")
        result = {"ok": True, "files": CHECKSUMS, "bytes": 1}
        await asyncio.gather(*(post(a, j, t, "/result", result) for a, j, t in claimed))
        if retried:
            print(f"requests the fake agents sent again after a transport error: {dict(retried)}")


if __name__ == "__main__":
    raise SystemExit(main())
