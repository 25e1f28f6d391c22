"""A window end to end: real beat ticking, a real worker, real agents on sim nodes.

Six nodes, cap 2, on a one-minute window opened with `imgfarm window run-now`
(cron due-ness itself is tested in test_window_runner.py, without waiting for
a minute boundary). Beat is SIGKILLed mid-window and restarted *twice* (two
beats at once, as by mistake): the job rows must still show at most two
running at any moment, one job per node, none started after the end.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import create_engine, update

from imgfarm.models.tables import utcnow
from imgfarm.models.windows import RUN_OPEN, WindowRun
from tests.farm import VENV_BIN, Farm
from tests.support import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sim disks need root"),
]


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def max_overlap(jobs: list[dict[str, Any]]) -> int:
    """The most jobs running at one instant, from started_at/finished_at."""
    points: list[tuple[datetime, int]] = []
    for j in jobs:
        start, end = _ts(j["started_at"]), _ts(j["finished_at"])
        if start is None:
            continue
        points.append((start, 1))
        if end is not None:
            points.append((end, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    level = peak = 0
    for _, d in points:
        level += d
        peak = max(peak, level)
    return peak


def test_window_caps_skips_busy_and_survives_beat_restarts(win_farm: Farm) -> None:
    farm = win_farm
    farm.start_api()
    farm.start_worker(concurrency=20)
    farm.add_node("src", fill=True)
    for i in range(1, 7):
        farm.add_node(f"n{i}", "--group", "lab1", "--set", "kernel_args=imgfarm.delay=2")
    farm.add_node("busy", "--group", "lab1", "--set", "agent=silent")
    farm.cli("capture", "src", "--image", "base", "--wait")
    out = farm.cli("restore", "busy", "--image", "base")
    busy_job = next(j["id"] for j in farm.cli_json("jobs", "--node", "busy"))
    assert busy_job, out.stdout

    farm.cli("window", "add", "lab1-now", "--cron", "0 3 1 1 *", "--duration", "1",
             "--group", "lab1", "--image", "base", "--max-concurrent", "2")
    farm._start("beat", "beat")
    opened = farm.cli_json("window", "run-now", "lab1-now")
    assert opened["skipped"] == {"busy": f"busy with job {busy_job}"}
    assert len(opened["submitted"]) == 2

    def window_jobs() -> list[dict[str, Any]]:
        return [j for j in farm.cli_json("jobs", "--limit", "100")
                if j["submitted_by"] == "window:lab1-now"]

    # mid-window: kill beat hard once the third job exists, then start two beats at once
    wait_for(lambda: len(farm.job_states("window:lab1-now")) >= 3, 60, what="a third window job")
    farm.kill("beat")
    farm._start("beat", "beat")
    with open(farm.root / "beat2.log", "ab") as log:  # a second beat, by mistake
        farm.procs["beat2"] = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "imgfarm.worker.app", "beat", "--loglevel=INFO",
             "-s", str(farm.root / "beat2-schedule")],
            env=farm.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    wait_for(lambda: list(farm.job_states("window:lab1-now").values()).count("succeeded") >= 6, 90,
             interval=0.5, what="all six window nodes to succeed")
    jobs = window_jobs()
    assert sorted(j["node"] for j in jobs) == [f"n{i}" for i in range(1, 7)], \
        "one job per node, none twice, busy node never queued"
    assert max_overlap(jobs) <= 2, jobs
    assert "Sending due task imgfarm-window-tick" in farm.log("beat2"), "both beats ticked"

    # a run's node outcomes follow their jobs at beat's next tick (1 s here)
    wanted = {**{f"n{i}": "succeeded" for i in range(1, 7)}, "busy": "skipped"}

    def outcomes() -> dict[str, Any]:
        r = farm.cli_json("window", "show", "lab1-now", "--runs")["runs"][0]
        status = {n["node"]: n["status"] for n in r["nodes"]}
        if status != wanted:
            raise AssertionError(f"not yet: {status}")
        return r

    run = wait_for(outcomes, 20, interval=1, what="the run's outcomes to follow its jobs")
    closes_at = _ts(run["closes_at"])
    assert all(_ts(j["started_at"]) < closes_at for j in jobs)  # type: ignore[operator]
    assert "busy with job" in next(n["reason"] for n in run["nodes"] if n["node"] == "busy")

    # beat closes the run at its end; the busy node keeps its "skipped" outcome. The end is
    # brought forward to now (the rest of the minute would only be waited out): what is tested
    # is that beat closes a run whose end has passed, and starts nothing after it.
    engine = create_engine(farm.env["IMGFARM_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            conn.execute(update(WindowRun).where(WindowRun.state == RUN_OPEN).values(closes_at=utcnow()))
    finally:
        engine.dispose()

    def closed() -> dict[str, Any] | None:
        r = farm.cli_json("window", "show", "lab1-now", "--runs")["runs"][0]
        return r if r["state"] == "closed" else None

    run = wait_for(closed, 30, interval=1, what="the run to close at its end")
    assert run["counts"]["succeeded"] == 6 and run["counts"]["skipped"] == 1
    assert len(window_jobs()) == 6  # nothing started after the end
    farm.cli("cancel", str(busy_job))
