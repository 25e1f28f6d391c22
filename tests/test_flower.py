"""Flower, the live view: real Flower, real worker, real agents on sim nodes.

What an operator watching Flower must see (DESIGN.md, "Who uses it"): each
job as a task with a readable name, its job id, node and image in the args,
its live state (PROGRESS while it runs, from the tasks' `task-progress`
events), its runtime, and on failure the reason. Read through Flower's own
HTTP API, as a person's browser or a script would. See docs/flower.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.farm import Farm, free_port
from tests.support import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sim disks need root"),
]

REDIS_DB = 10
AGENT_DELAY = 30  # seconds the good node's agent waits before imaging (four CLI calls on a loaded machine)
AUTH = ("ops", "flower-test-pw")  # Flower never runs open: basic auth from its environment


@pytest.fixture
def flower_farm(tmp_path: Path) -> Iterator[tuple[Farm, str]]:
    farm = Farm(tmp_path, f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}", REDIS_DB,
                IMGFARM_BOOT_TIMEOUT="3", FLOWER_BASIC_AUTH=":".join(AUTH))
    try:
        farm.cli("db", "upgrade")
        farm.start_api()
        farm.start_worker()
        port = free_port()
        farm._start("flower", "flower", "--port", str(port), "--address", "127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthcheck", timeout=1, auth=AUTH).status_code == 200, 30,
                 what="Flower to answer")
        # Flower must have a worker before tasks are sent, or it misses their first events.
        wait_for(lambda: httpx.get(f"{base}/api/workers?refresh=1", timeout=10, auth=AUTH).json(), 30,
                 what="Flower to see the worker")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401  # no auth: refused
        yield farm, base
    finally:
        farm.stop()
        farm.forget_redis()


def _task(base: str, task_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/api/task/info/{task_id}", timeout=5, auth=AUTH)
    return resp.json() if resp.status_code == 200 else {}


def test_flower_shows_jobs_with_args_state_progress_and_failure_reason(
        flower_farm: tuple[Farm, str]) -> None:
    farm, base = flower_farm
    farm.add_node("src", fill=True)
    # The agent waits before imaging so the job is still running while this test reads
    # Flower, however slowly the CLI calls below run on a loaded machine.
    farm.add_node("t1", "--set", f"kernel_args=imgfarm.delay={AGENT_DELAY}")
    farm.add_node("dead", "--set", "agent=silent")
    farm.cli("capture", "src", "--image", "base", "--wait")

    ok_job = farm.cli_json("restore", "t1", "--image", "base")["job_ids"][0]
    bad_job = farm.cli_json("restore", "dead", "--image", "base")["job_ids"][0]
    ok_task = farm.cli_json("job", str(ok_job))["celery_task_id"]
    bad_task = farm.cli_json("job", str(bad_job))["celery_task_id"]
    assert ok_task and bad_task

    # Watch the good one live: Flower must show PROGRESS before SUCCESS.
    seen: list[str] = []
    shown_progress: set[str] = set()  # what Flower's Result column says while it runs
    deadline = time.monotonic() + 60 + AGENT_DELAY
    while time.monotonic() < deadline:
        info = _task(base, ok_task)
        state = info.get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state == "PROGRESS" and info.get("result"):
            shown_progress.add(info["result"])
        if state == "SUCCESS":
            break
        time.sleep(0.1)
    assert "PROGRESS" in seen and seen[-1] == "SUCCESS", seen
    assert any(r.startswith(("booting ", "running ")) and "%" in r for r in shown_progress), \
        shown_progress

    ok = _task(base, ok_task)
    assert ok["name"] == "imgfarm.restore"
    assert ok["args"] == f"({ok_job}, 't1', 'base')"
    assert ok["runtime"] and ok["runtime"] > AGENT_DELAY  # the agent waited before imaging
    assert ok["worker"] and ok["exception"] is None
    assert f"'job_id': {ok_job}" in ok["result"] and "'state': 'succeeded'" in ok["result"]

    bad = wait_for(lambda: (t := _task(base, bad_task)).get("state") == "FAILURE" and t, 60,
                   what="the silent node's task to fail in Flower")
    assert bad["args"] == f"({bad_job}, 'dead', 'base')"
    assert bad["exception"].startswith("JobEnded(")
    assert f"job {bad_job} timed_out" in bad["exception"]
    assert "did not report within 3s" in bad["exception"]
    # the same reason the job database records
    assert farm.cli_json("job", str(bad_job))["error"] in bad["exception"]

    # the list endpoint and its filters (what the Flower UI's task table reads)
    failed = httpx.get(f"{base}/api/tasks", params={"taskname": "imgfarm.restore",
                                                    "state": "FAILURE"}, timeout=5, auth=AUTH).json()
    assert list(failed) == [bad_task]
    listed = httpx.get(f"{base}/api/tasks", params={"search": "dead"}, timeout=5, auth=AUTH).json()
    assert bad_task in listed and ok_task not in listed  # searching by node name
