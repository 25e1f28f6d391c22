"""What a submit does when the broker is not there, and what ending a never-started job touches.

Real parts: the job database on SQLite and PostgreSQL, a real (absent)
Redis -- 127.0.0.1:1, where nothing listens -- and the sim drivers, whose
node directory records every boot and power call. Nothing is mocked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from imgfarm.config.settings import get_settings
from imgfarm.errors import ServiceUnavailable
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, JobEvent
from imgfarm.tasks.nodes import add_node

DEAD_BROKER = "redis://127.0.0.1:1/0"


def _setup(n: int = 2) -> None:
    with session_scope() as s:
        for i in range(1, n + 1):
            add_node(s, f"n{i}", disk=f"/tmp/n{i}.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})


def _use_broker(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from imgfarm.tasks.broker import reload_config

    monkeypatch.setenv("IMGFARM_BROKER_URL", url)
    get_settings.cache_clear()
    reload_config()


def _sim_calls(node: str) -> list[str]:
    """Files the sim drivers wrote for `node` (empty: no boot or power call was made)."""
    d = get_settings().sim_path / node
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_submit_with_the_broker_down_records_nothing(settings_env: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.tasks.convert import submit_convert
    from imgfarm.tasks.submit import submit_capture, submit_restore

    _setup()
    _use_broker(monkeypatch, DEAD_BROKER)
    try:
        for submit in (lambda: submit_restore("n[1-2]", "base"),
                       lambda: submit_capture("n1", "new"),
                       lambda: submit_convert("base")):
            with pytest.raises(ServiceUnavailable, match="cannot reach the broker at "
                               "redis://127.0.0.1:1/0") as ei:
                submit()
            assert "nothing was submitted" in (ei.value.hint or "")
        with session_scope() as s:
            assert s.scalars(select(Job)).all() == []
    finally:
        _use_broker(monkeypatch, "memory://")


def test_broker_lost_while_queueing_ends_the_jobs_and_touches_no_node(
        settings_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows were written, then the broker went away before their tasks were sent."""
    from imgfarm.tasks.enqueue import enqueue_jobs
    from imgfarm.tasks.submit import submit_restore

    _setup()
    sub = submit_restore("n[1-2]", "base", enqueue=False)
    _use_broker(monkeypatch, DEAD_BROKER)
    try:
        with pytest.raises(ServiceUnavailable, match="ended as failed"):
            enqueue_jobs(sub.job_ids)
    finally:
        _use_broker(monkeypatch, "memory://")
    with session_scope() as s:
        jobs = s.scalars(select(Job).order_by(Job.id)).all()
        assert [j.state for j in jobs] == [states.FAILED, states.FAILED]
        assert all("could not be queued" in j.error for j in jobs)
        assert all(j.boot_calls == 0 for j in jobs)
    assert _sim_calls("n1") == [] and _sim_calls("n2") == []  # no boot, no power-cycle
    # the nodes are free again: a new submit is accepted
    assert len(submit_restore("n[1-2]", "base", enqueue=False).job_ids) == 2


def test_cancelling_a_queued_job_does_not_reboot_its_node(settings_env: str) -> None:
    """The job never booted the node, which may be running someone's work: leave it be."""
    from imgfarm.tasks.submit import request_cancel, submit_restore

    _setup(1)
    (job_id,) = submit_restore("n1", "base", enqueue=False).job_ids
    assert request_cancel(job_id) == states.QUEUED
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.CANCELLED
        notes = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any("never booted by this job" in m for m in notes)
    assert _sim_calls("n1") == []


def test_cli_with_the_broker_down_exits_8_and_names_the_broker(tmp_path: Path) -> None:
    env = {"IMGFARM_DATA_DIR": str(tmp_path), "IMGFARM_BROKER_URL": DEAD_BROKER,
           "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "imgfarm.cli.main"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "node", "add", "n1", "--disk", str(tmp_path / "n1.img")], env=env,
                   check=True, capture_output=True)
    out = subprocess.run([*cli, "capture", "n1", "--image", "x"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 8, out.stderr
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in out.stderr
    assert "Traceback" not in out.stderr
    jobs = subprocess.run([*cli, "jobs", "--json"], env=env, capture_output=True, text=True,
                          check=True)
    assert jobs.stdout.strip() == "[]"


def test_cli_on_a_database_without_tables_says_db_upgrade(tmp_path: Path) -> None:
    env = {"IMGFARM_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "imgfarm.cli.main", "image", "list"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 8, out.stderr
    assert "has no imgfarm tables" in out.stderr and "imgfarm db upgrade" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_node_taken_between_check_and_insert_records_nothing(settings_env: str) -> None:
    """The busy check and the insert are not atomic; the database's unique index is."""
    from imgfarm.errors import Conflict
    from imgfarm.models.nodes import resolve_nodes
    from imgfarm.tasks.submit import _insert_restores

    _setup(3)
    with session_scope() as s:
        n1, n2, n3 = resolve_nodes(s, "n[1-3]")
        s.add(Job(kind="capture", node_id=n2.id, image_name="other"))  # the racing submit
    with pytest.raises(Conflict, match="nothing was submitted"), session_scope() as s:
        _insert_restores(s, [n1, n2, n3], "base", "partimage-ng", "t", {}, None, True)
    with session_scope() as s:
        assert [j.node_id for j in s.scalars(select(Job))] == [n2.id]
        assert s.scalars(select(JobEvent)).all() == []
