"""Outages under running jobs: the parts of the farm die and come back.

Real processes throughout (uvicorn API, Celery worker and beat, the real
agent on sim nodes). A test that kills Redis or PostgreSQL starts its own
private server on a free port and data dir; the shared ones are never
touched.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.farm import Farm
from tests.support import run, wait_for

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


def job(farm: Farm, job_id: int) -> dict:
    return farm.cli_json("job", str(job_id))


def boot_target(farm: Farm, node: str) -> str:
    return json.loads((farm.root / "data" / "sim" / node / "boot.json").read_text())["target"]


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
    wait_for(lambda: job(farm, job_id)["state"] == "running", 60, what="the capture to run")

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

    final = wait_for(lambda: (j := job(farm, job_id))["state"] in ("succeeded", "failed", "timed_out") and j,
                     60, what="the job to end once the API is back")
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
