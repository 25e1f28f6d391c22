"""Inputs that grow work or storage are bounded before they cost anything.

A node range is counted from its text before ClusterShell expands it; request
bodies are capped before a route reads them; text from agents is cut with a
mark; a job keeps a bounded number of progress events; windows have bounded
sizes. Each refusal names the input and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from ClusterShell.NodeSet import NodeSet
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.nodes import range_size
from imgfarm.models.tables import Job, JobEvent
from imgfarm.models.windows import Window
from imgfarm.tasks.nodes import add_node
from tests.apitest import local_client, running_job

TOKEN = "b" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    with session_scope() as s:
        for i in range(1, 4):
            add_node(s, f"n{i}", disk=f"/tmp/n{i}.img", groups=["lab"])
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    with local_client() as c:
        yield c


def _running_job() -> int:
    return running_job(TOKEN)


def _count(model: type, *where: object) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


# --- node ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["n[1-5]", "n[01-10/3],m[2-4]", "a[1-3]-b[1-2]", "n[1-3,7,9-12]",
                                  "x", "n[1-3] m[1-2]", "n[ 1-3 ]"])
def test_range_size_is_clustershells_count_without_expanding(expr: str) -> None:
    assert range_size(expr, {}) == len(NodeSet(expr))


def test_range_size_bounds_operators_and_groups() -> None:
    assert range_size("n[1-10]!n[2-3]", {}) == 12  # each operand is expanded before `!`
    assert range_size("@lab,n[1-2]", {"lab": 40}) == 42
    assert range_size("n[1-99999999]", {}) == 99_999_999
    assert range_size("n[1-99999999]-[1-99999999]", {}) == 99_999_999 ** 2


def test_a_huge_range_is_refused_before_it_is_expanded(client: TestClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.models import nodes

    made: list[str] = []

    def watched(expr: str, *args: object, **kw: object) -> NodeSet:
        made.append(expr)  # ClusterShell builds every value of a range here: 10^8 strings
        if len(made) == 1 and "99999999" in expr:
            raise MemoryError("the range was handed to ClusterShell")
        return NodeSet(expr, *args, **kw)

    monkeypatch.setattr(nodes, "NodeSet", watched)
    t0 = time.monotonic()
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n[1-99999999]", "image": "base"})
    took = time.monotonic() - t0
    assert made == [] and r.status_code == 400, r.text
    err = r.json()["error"]
    assert "'n[1-99999999]'" in err and "99,999,999 nodes" in err and "cap of 10,000" in err
    assert "IMGFARM_MAX_RANGE_NODES" in r.json()["hint"]
    assert took < 5, f"refusing took {took:.1f} s"
    assert _count(Job) == 0


def test_the_cap_is_a_setting_and_counts_every_part(client: TestClient,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    monkeypatch.setenv("IMGFARM_MAX_RANGE_NODES", "5")
    get_settings.cache_clear()
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n[1-3],@lab", "image": "base"})
    assert r.status_code == 400 and "names 6 nodes, more than the cap of 5" in r.json()["error"]
    r = client.post("/api/v1/windows", json={"name": "w", "cron": "0 2 * * 6", "duration_minutes": 60,
                                             "image": "base", "nodes": "n[1-3]", "groups": ["lab"],
                                             "max_concurrent": 2})
    assert r.status_code == 400 and "cap of 5" in r.json()["error"]
    assert _count(Job) == 0 and _count(Window) == 0


# --- request bodies --------------------------------------------------------------------

def test_an_agent_report_over_64_kib_is_413_and_records_nothing(client: TestClient) -> None:
    job_id = _running_job()
    before = _count(JobEvent)
    big = b'{"percent": 5, "message": "' + b"x" * (65 << 10) + b'"}'
    r = client.post(f"/agent/v1/jobs/{job_id}/progress", content=big,
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds all the same
        yield b'{"ok": false, "error": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    r = client.post(f"/agent/v1/jobs/{job_id}/result", content=chunks(),
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.RUNNING and job.progress == 0
    assert _count(JobEvent) == before


def test_an_operator_request_over_the_setting_is_413(client: TestClient,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    monkeypatch.setenv("IMGFARM_MAX_REQUEST_BYTES", "4096")
    get_settings.cache_clear()
    r = client.post("/api/v1/nodes", json={"name": "big", "disk": "/tmp/big.img",
                                           "groups": [f"g{i}" for i in range(2000)]})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]
    assert "IMGFARM_MAX_REQUEST_BYTES" in r.json()["hint"]
    assert client.get("/api/v1/nodes/big").status_code == 404
    assert client.post("/api/v1/nodes", json={"name": "small", "disk": "/tmp/s.img"}).status_code == 201


# --- text from agents ------------------------------------------------------------------

def test_long_error_and_tail_are_cut_with_a_mark(client: TestClient) -> None:
    job_id = _running_job()
    body = {"ok": False, "error": "disk gone " + "e" * 20000, "stderr_tail": "t" * 30000 + " last line"}
    r = client.post(f"/agent/v1/jobs/{job_id}/result", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.error.startswith("disk gone") and job.error.endswith("last line")
        assert "characters cut ...]" in job.error
        assert len(job.error) <= 8192 + 16384 + 1


def test_long_progress_message_is_cut(client: TestClient) -> None:
    job_id = _running_job()
    r = client.post(f"/agent/v1/jobs/{job_id}/progress", json={"percent": 1, "message": "m" * 5000},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    with session_scope() as s:
        msg = s.scalar(select(JobEvent.message).where(JobEvent.job_id == job_id,
                                                      JobEvent.kind == "progress"))
        assert msg is not None and len(msg) <= 512 and "characters cut" in msg


# --- progress events -------------------------------------------------------------------

def _progress_events(job_id: int) -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(JobEvent.message).where(
            JobEvent.job_id == job_id, JobEvent.kind == "progress").order_by(JobEvent.id)))


def test_progress_events_are_coalesced_first_last_and_one_every_interval(client: TestClient) -> None:
    job_id = _running_job()
    for i in range(60):
        r = client.post(f"/agent/v1/jobs/{job_id}/progress",
                        json={"percent": i, "message": f"step {i}"}, headers=AUTH)
        assert r.status_code == 200
    assert _progress_events(job_id) == ["step 0", "step 59"]
    with session_scope() as s:  # the kept sample is now older than the interval (60 s)
        first = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "progress")
                          .order_by(JobEvent.id)).first()
        assert first is not None
        s.execute(update(JobEvent).where(JobEvent.id == first.id).values(at=first.at - timedelta(seconds=120)))
    for i in range(60, 70):
        client.post(f"/agent/v1/jobs/{job_id}/progress", json={"percent": i, "message": f"step {i}"},
                    headers=AUTH)
    assert _progress_events(job_id) == ["step 0", "step 59", "step 69"]
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.progress == 69  # the job itself has every report


# --- windows ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("duration_minutes", 2**70, "bad duration"),
    ("duration_minutes", 10**6, "bad duration"),
    ("max_concurrent", 10**9, "bad max_concurrent"),
    ("store_cap", 2**64, "bad store_cap"),
    ("max_retries", 10**12, "bad max_retries"),
    ("cron", "0 2 * * 6 " + "x" * 100_000, "bad cron"),
])
def test_window_sizes_are_bounded(client: TestClient, field: str, value: object, words: str) -> None:
    body = {"name": "w", "cron": "0 2 * * 6", "duration_minutes": 60, "image": "base", "nodes": "n[1-3]"}
    r = client.post("/api/v1/windows", json={**body, field: value})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert _count(Window) == 0
    r = client.get("/api/v1/windows/w", params={"runs": True, "limit": 10**9})
    assert r.status_code == 422


def test_cut_text_keeps_the_end_it_is_asked_for_within_the_limit() -> None:
    from imgfarm.protocol import MAX_TAIL, ResultReport, cut_text

    head = cut_text("first " + "x" * 9000, 1000)
    tail = cut_text("y" * 9000 + " last", 1000, keep="tail")
    assert len(head) == len(tail) == 1000
    assert head.startswith("first ") and head.endswith("[... 8037 characters cut ...] ")
    assert tail.endswith(" last") and tail.startswith(" [... 8036 characters cut ...]")
    assert cut_text("short", 1000) == "short"
    report = ResultReport(ok=False, stderr_tail="z" * (MAX_TAIL * 3))
    assert len(report.stderr_tail) == MAX_TAIL and "characters cut" in report.stderr_tail
