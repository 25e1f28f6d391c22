"""Outages under running jobs: the parts of the farm die and come back.

Real processes throughout (uvicorn API, Celery worker and beat, the real
agent on sim nodes). A test that kills Redis or PostgreSQL starts its own
private server on a free port and data dir; the shared ones are never
touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.farm import Farm, free_port
from tests.support import run, stop_process, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sim disks need root (partclone on loop devices)"),
]

# How long the API stays down. The property is "the agent keeps its result
# and retries it until the job's deadline"; before, it gave up after 6
# attempts, about 15 s against a closed port. Any outage well past that
# proves the result outlived the old give-up; 40 s is well past it and keeps
# the suite short. IMGFARM_TEST_API_OUTAGE=180 runs the full three minutes.
API_OUTAGE = float(os.environ.get("IMGFARM_TEST_API_OUTAGE", "40"))
PG_OUTAGE = 12.0


def job(farm: Farm, job_id: int) -> dict:
    return farm.cli_json("job", str(job_id))


def boot_target(farm: Farm, node: str) -> str:
    return json.loads((farm.root / "data" / "sim" / node / "boot.json").read_text())["target"]


FINAL = ("succeeded", "failed", "timed_out", "cancelled")


class PrivateRedis:
    """A redis-server of this test's own, persisted as compose runs it (AOF, noeviction)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: redis.Redis(port=self.port, socket_timeout=1).ping(), 20, what="redis to answer")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@contextlib.contextmanager
def private_redis(root: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(root)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            stop_process(server.proc)


@contextlib.contextmanager
def farm_on(root: Path, database_url: str, broker_url: str, **env: str) -> Iterator[Farm]:
    """A migrated farm on the given database and broker, all its processes stopped afterwards."""
    farm = Farm(root, database_url, 0, IMGFARM_BROKER_URL=broker_url, **env)
    try:
        farm.cli("db", "upgrade")
        yield farm
    finally:
        farm.stop()


def add_sim_nodes(farm: Farm, names: list[str], size_mib: int, group: str = "", **settings: str) -> None:
    """Many blank sim nodes with one CLI call (`node import`), not one per node."""
    rows = ["name,disk,groups," + ",".join(settings)]
    for name in names:
        disk = farm.make_disk(name, size_mib, fill=False)
        rows.append(f"{name},{disk},{group}," + ",".join(settings.values()))
    csv = farm.root / "nodes.csv"
    csv.write_text("\n".join(rows) + "\n")
    farm.cli("node", "import", str(csv))


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (initdb as user postgres, a free port)."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="imgfarm-pg-"))
        os.chown(self.dir, *_postgres_ids())
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str) -> None:
        run("runuser", "-u", "postgres", "--", *args, cwd=self.dir)

    def init(self) -> None:
        self._pg("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.data))

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-w", "-t", "60",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")


def _postgres_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    import shutil

    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(pg.data), "-m", "immediate",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(pg.dir, ignore_errors=True)


def all_in(farm: Farm, ids: list[int], wanted: tuple[str, ...], timeout: float, what: str) -> dict[int, str]:
    """Wait until every job of `ids` is in one of `wanted`; the failure shows the others."""
    def cond() -> dict[int, str]:
        st = farm.job_states()
        others = {i: st.get(i) for i in ids if st.get(i) not in wanted}
        if others:
            raise AssertionError(f"not yet: {others}")
        return st
    return wait_for(cond, timeout, interval=0.5, what=what)


@pytest.mark.timeout(600)
def test_redis_restarted_while_20_jobs_run(tmp_path: Path) -> None:
    """SIGKILL the broker (which also carries the wake-ups) under 20 running
    restores and start it again: every job ends succeeded, each node booted
    once; the workers' pub/sub listener subscribes again; a submit during the
    outage exits 8 and records nothing."""
    with private_redis(tmp_path) as rds, \
            farm_on(tmp_path, f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}", rds.url) as farm:
        farm.start_api()
        farm.start_worker(concurrency=25)
        farm.add_node("n0", size_mib=16, fill=True)
        farm.cli("capture", "n0", "--image", "base", "--wait")
        add_sim_nodes(farm, [f"n{i}" for i in range(1, 21)], size_mib=16, kernel_args="imgfarm.delay=25")
        ids = farm.cli_json("restore", "n[1-20]", "--image", "base")["job_ids"]
        assert len(ids) == 20
        all_in(farm, ids, ("running",), 120, "all 20 restores to run")
        assert rds.client().pubsub_numpat() >= 1  # the worker's wake-up listener

        rds.kill()
        before = len(farm.cli_json("jobs"))
        out = farm.cli("restore", "n0", "--image", "base", check=False)
        assert out.returncode == 8, out.stdout + out.stderr
        assert "cannot reach the broker" in out.stderr and "Traceback" not in out.stderr
        assert len(farm.cli_json("jobs")) == before
        rds.start()
        wait_for(lambda: rds.client().pubsub_numpat() >= 1, 30,
                 what="the worker's wake-up listener to subscribe again")

        final = all_in(farm, ids, FINAL, 180, "all 20 restores to end after the broker restart")
        assert {final[i] for i in ids} == {"succeeded"}, final
        for i in ids:
            detail = job(farm, i)
            boots = [e for e in detail["events"] if e["kind"] == "state" and e["state"] == "booting"]
            assert len(boots) == 1, detail["events"]
        assert not [s for s in farm.job_states().values() if s not in FINAL]
        assert all(boot_target(farm, f"n{i}") == "local" for i in range(1, 21))
        # and the farm takes new work on the restarted broker
        farm.cli("restore", "n1", "--image", "base", "--wait")


def test_api_down_while_the_agent_finishes_a_capture(farm: Farm) -> None:
    """The API is killed while a capture runs and stays away for API_OUTAGE
    seconds, longer than the allowed silence: the agent finishes its capture
    meanwhile and keeps retrying its result; the worker does not blame the
    agent for a silence the API caused; the capture is registered."""
    farm.env["IMGFARM_HEARTBEAT_TIMEOUT"] = "25"  # shorter than the outage, longer than a retry pause
    farm.start_api()
    farm.start_worker()
    farm.add_node("n1", "--set", "kernel_args=imgfarm.delay=2", fill=True)
    job_id = farm.cli_json("capture", "n1", "--image", "kept")["job_ids"][0]
    farm.wait_job(job_id, ("running",), 60)

    farm.kill("api")
    down_at = time.monotonic()
    agent_log = farm.root / "data" / "sim" / "n1" / "agent.log"
    wait_for(lambda: "until the job's deadline" in agent_log.read_text(), 60,
             what="the agent to retry its result against the dead API")
    # the outage itself: a span of wall time is what this test is about
    time.sleep(max(0.0, API_OUTAGE - (time.monotonic() - down_at)))
    during = job(farm, job_id)
    assert during["state"] == "running", during  # not timed out, not lost
    assert "done" not in agent_log.read_text().split("until the job's deadline", 1)[1]
    farm.start_api()

    final = farm.wait_job(job_id, FINAL, 60)
    assert final["state"] == "succeeded", final["error"]
    assert any("does not answer: waiting for it" in e["message"] for e in final["events"])
    image = {i["name"]: i for i in farm.cli_json("image", "list")}["kept"]
    assert image["checksums"] == final["result"]["files"]
    assert boot_target(farm, "n1") == "local"
    assert f"job {job_id} done" in agent_log.read_text()


def test_store_fills_up_during_a_capture(farm: Farm) -> None:
    """The store is a 4 MiB tmpfs; the disk holds 12 MiB of random data, which no
    compressor shrinks: the capture fails saying so, its partial files are gone
    and no image is registered."""
    store = farm.root / "store"
    store.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "imgfarm-test-store", store)
    try:
        farm.env["IMGFARM_IMAGE_STORE"] = str(store)
        farm.start_api()
        farm.start_worker()
        content = farm.root / "disks" / "full-content"
        content.mkdir(parents=True)
        (content / "noise.bin").write_bytes(os.urandom(12 << 20))
        disk = farm.make_disk("full", size_mib=32, fill=True)
        farm.cli("node", "add", "full", "--disk", str(disk))
        out = farm.cli("capture", "full", "--image", "toobig", "--wait", check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        final = farm.cli_json("jobs", "--node", "full")[0]
        assert final["state"] == "failed"
        assert "no space left in the image store" in final["error"], final["error"]
        assert farm.cli_json("image", "list") == []
        leftovers = [p for p in store.rglob("*") if p.is_file()]
        assert leftovers == [], leftovers
        assert boot_target(farm, "full") == "local"
    finally:
        farm.stop()
        run("umount", "-l", store, check=False)


@pytest.mark.timeout(600)
def test_postgres_restarted_mid_job(tmp_path: Path) -> None:
    """PostgreSQL stops (immediate: every connection dropped) and starts again
    while a restore runs and a bulk window (one node at a time) is open: the API
    and the worker reconnect, the restore succeeds, and beat's window ticks
    go on submitting the window's next nodes. The database stays down longer
    than the allowed silence of an agent, so the restore's waiter finds it gone
    and must wait for it rather than die or blame the agent."""
    with private_postgres() as pg, private_redis(tmp_path) as rds, \
            farm_on(tmp_path, pg.url, rds.url, IMGFARM_WINDOW_TICK_INTERVAL="2",
                    IMGFARM_HEARTBEAT_TIMEOUT=str(PG_OUTAGE - 4)) as farm:
        farm.start_api()
        farm.start_worker()
        farm.add_node("src", size_mib=16, fill=True)
        farm.cli("capture", "src", "--image", "base", "--wait")
        add_sim_nodes(farm, ["solo"], size_mib=16, kernel_args="imgfarm.delay=20")
        add_sim_nodes(farm, ["w1", "w2", "w3"], size_mib=16, group="lab1", kernel_args="imgfarm.delay=6")
        farm.cli("window", "add", "lab1-now", "--cron", "0 3 1 1 *", "--duration", "3",
                 "--group", "lab1", "--image", "base", "--max-concurrent", "1")
        farm._start("beat", "beat")
        farm.cli_json("window", "run-now", "lab1-now")
        solo = farm.cli_json("restore", "solo", "--image", "base")["job_ids"][0]
        all_in(farm, [solo], ("running",), 60, "the restore to run")

        pg.stop("immediate")
        # down longer than the allowed silence: the restore's waiter reads its row meanwhile
        time.sleep(PG_OUTAGE)
        pg.start()

        def window_done() -> dict[int, str]:
            jobs = farm.job_states("window:lab1-now")
            if len(jobs) < 3 or any(state not in FINAL for state in jobs.values()):
                raise AssertionError(f"not yet: {jobs}")
            return jobs

        window = wait_for(window_done, 240, interval=1, what="the window to go through its three nodes")
        assert set(window.values()) == {"succeeded"}, window
        final = all_in(farm, [solo], FINAL, 60, "the restore to end")
        detail = job(farm, solo)
        assert final[solo] == "succeeded", detail["error"]
        assert any("the job database did not answer" in e["message"] for e in detail["events"])
        assert not [s for s in farm.job_states().values() if s not in FINAL]
        assert all(boot_target(farm, n) == "local" for n in ("solo", "w1", "w2", "w3"))


def sim_boot_target(farm: Farm, node: str) -> str:
    """What the node boots next, asked of its boot driver (as finalize would)."""
    code = ("import sys; from imgfarm.drivers.base import NodeInfo; from imgfarm.drivers.sim import SimBoot; "
            "print(SimBoot().get_boot_target(NodeInfo(name=sys.argv[1])).value)")
    out = subprocess.run([sys.executable, "-c", code, node], env=farm.env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.timeout(600)
def test_worker_host_reboot_kills_every_farm_process_at_once(farm: Farm) -> None:
    """SIGKILL the API, the worker, beat and the agents that ran on this host,
    all at once, mid-job; start the farm again. The jobs whose nodes kept
    running resume and succeed (each booted once); the jobs whose agents died
    end timed_out with the reason; no node is left netbooting."""
    farm.env.update(IMGFARM_HEARTBEAT_TIMEOUT="10", IMGFARM_RECONCILE_INTERVAL="2")
    farm.start_api()
    farm.start_worker()
    farm._start("beat", "beat")
    farm.add_node("src", size_mib=16, fill=True)
    farm.cli("capture", "src", "--image", "base", "--wait")
    lives, dies = ["a1", "a2"], ["d1", "d2"]
    add_sim_nodes(farm, lives + dies, size_mib=16, kernel_args="imgfarm.delay=20")
    ids = dict(zip(lives + dies, farm.cli_json("restore", "a[1-2],d[1-2]", "--image", "base")["job_ids"],
                   strict=True))
    all_in(farm, list(ids.values()), ("running",), 90, "the four restores to run")

    agents = {n: json.loads((farm.root / "data" / "sim" / n / "power.json").read_text())["pid"]
              for n in dies}
    for name in list(farm.procs):  # the farm's processes, and the agents that ran beside them
        os.killpg(farm.procs[name].pid, signal.SIGKILL)
    for pid in agents.values():
        os.killpg(pid, signal.SIGKILL)
    for name in list(farm.procs):
        farm.procs.pop(name).wait(30)

    farm.start_api()
    farm.start_worker("worker2")
    farm._start("beat", "beat")
    final = all_in(farm, list(ids.values()), FINAL, 180, "every job to end after the reboot")
    for node in lives:
        detail = job(farm, ids[node])
        assert final[ids[node]] == "succeeded", detail["error"]
        assert sum(1 for e in detail["events"] if e["state"] == "booting") == 1
        assert any("is gone" in e["message"] for e in detail["events"])
    for node in dies:
        detail = job(farm, ids[node])
        assert final[ids[node]] == "timed_out", detail
        assert "no report from the agent" in detail["error"]
    for node in lives + dies:
        assert sim_boot_target(farm, node) == "local", node
