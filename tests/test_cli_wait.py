"""`--wait` on many jobs: totals by state and the jobs that failed, not a line per job."""

from __future__ import annotations

import threading
import time

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


def _five_thousand_running() -> list[int]:
    """5,000 running restores on 5,000 nodes, inserted as two multi-row INSERTs."""
    from sqlalchemy import insert

    from imgfarm.models.tables import Node

    n = 5000
    with session_scope() as s:
        node_ids = list(s.scalars(insert(Node).returning(Node.id, sort_by_parameter_order=True),
                                  [{"name": f"b{i:04d}", "disk": "/dev/null"} for i in range(1, n + 1)]))
        return list(s.scalars(insert(Job).returning(Job.id, sort_by_parameter_order=True),
                              [{"kind": "restore", "node_id": nid, "image_name": "base", "state": states.RUNNING,
                                "progress": 50.0} for nid in node_ids]))


def _end_them_soon(ids: list[int]) -> threading.Thread:
    """In a moment, 4,998 succeed and 2 fail (what a 5,000-node restore's --wait sees end)."""
    from sqlalchemy import update

    def end() -> None:
        time.sleep(0.5)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id.in_(ids[2:])).values(state=states.SUCCEEDED, progress=100.0))
            s.execute(update(Job).where(Job.id.in_(ids[:2])).values(state=states.FAILED, error="disk too small"))

    t = threading.Thread(target=end)
    t.start()
    return t


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the output is under test, not the database
def test_waiting_on_5000_jobs_prints_counts_not_5000_lines(
        settings_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    from imgfarm.cli.jobs import wait_for_jobs

    ids = _five_thousand_running()
    ender = _end_them_soon(ids)
    started = time.monotonic()
    views = wait_for_jobs(ids, poll=0.1)  # not a terminal here: the plain-text path
    ender.join()
    assert len(views) == 5000 and time.monotonic() - started < 10
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "5000 jobs: 5000 running"
    assert lines[-1] == "5000 jobs: 4998 succeeded, 2 failed"
    assert len(lines) == 4, lines  # the two counts lines and the two failures, each once
    assert sum(line.startswith("job ") and ": failed" in line for line in lines) == 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the output is under test, not the database
def test_waiting_on_5000_jobs_on_a_terminal_draws_one_bar(
        settings_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from imgfarm.cli import jobs

    screen = io.StringIO()
    monkeypatch.setattr(jobs, "console", Console(file=screen, force_terminal=True, width=120))
    ids = _five_thousand_running()
    ender = _end_them_soon(ids)
    views = jobs.wait_for_jobs(ids, poll=0.1)
    ender.join()
    assert len(views) == 5000
    out = screen.getvalue()
    assert "5000 jobs" in out and "4998 succeeded, 2 failed" in out
    assert "b0001" in out and "b0002" in out  # the two failures, named
    assert "b0042" not in out and "b4999" not in out  # no bar or line per job
