"""`--wait` on many jobs: totals by state and the jobs that failed, not a line per job."""

from __future__ import annotations

import pytest
import typer

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.tables import Job
from imgfarm.tasks.nodes import add_node


def test_state_counts_follow_the_lifecycle() -> None:
    from imgfarm.cli.jobs import state_counts

    views = [{"state": s} for s in ["running"] * 3 + ["succeeded"] * 2 + ["queued", "failed"]]
    assert state_counts(views) == "1 queued, 3 running, 2 succeeded, 1 failed"


def test_many_ended_jobs_print_totals_and_only_the_failures(
        settings_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    from imgfarm.cli.jobs import MANY, report_and_exit, wait_for_jobs

    n = MANY + 5
    with session_scope() as s:
        for i in range(n):
            node = add_node(s, f"w{i:03d}", disk=f"/tmp/w{i}.img")
            failed = i == 7
            s.add(Job(kind="restore", node_id=node.id, image_name="base", progress=100.0,
                      state=states.FAILED if failed else states.SUCCEEDED,
                      error="the agent reported: disk too small" if failed else ""))
    with session_scope() as s:
        ids = [j.id for j in s.query(Job).order_by(Job.id)]
    views = wait_for_jobs(ids)  # not a terminal here: the plain-text path
    with pytest.raises(typer.Exit) as ei:
        report_and_exit(views, json_out=False)
    assert ei.value.exit_code == 1
    out = capsys.readouterr().out
    assert f"{n} jobs: {n - 1} succeeded, 1 failed" in out
    assert "w007: failed" in out and "disk too small" in out
    assert "w000" not in out  # succeeded jobs are counted, not listed
