"""The HTTP API's refusals: tokens, finished jobs, bad names — nothing recorded.

Runs the real FastAPI app in-process (TestClient) against SQLite and
PostgreSQL; no worker is needed to check what the API accepts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, JobEvent
from imgfarm.tasks.nodes import add_node
from tests.apitest import local_client, running_job

TOKEN = "t" * 43

@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    with local_client() as c:
        yield c


def _running_job(state: str = states.RUNNING) -> int:
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    return running_job(TOKEN, state)


def _counts(job_id: int) -> tuple[int, float, str]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        events = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id))
        return int(events or 0), job.progress, job.state


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer ", f"Basic {TOKEN}"])
def test_bad_token_is_401_and_records_nothing(client: TestClient, header: str | None) -> None:
    job_id = _running_job()
    before = _counts(job_id)
    headers = {"Authorization": header} if header else {}
    for method, path, body in [
        ("GET", "", None),
        ("POST", "/progress", {"percent": 50, "bytes_done": 10}),
        ("POST", "/result", {"ok": True, "files": {}}),
    ]:
        r = client.request(method, f"/agent/v1/jobs/{job_id}{path}", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert "token" in r.json()["error"]
    assert _counts(job_id) == before


def test_unknown_job_answers_401_not_404(client: TestClient) -> None:
    r = client.get("/agent/v1/jobs/999", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401


def test_good_token_records_progress_and_result(client: TestClient) -> None:
    job_id = _running_job(states.BOOTING)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    spec = client.get(f"/agent/v1/jobs/{job_id}", headers=auth).json()
    assert spec["kind"] == "restore" and spec["image"]["location"] == "base"
    assert client.post(f"/agent/v1/jobs/{job_id}/progress", json={"percent": 60}, headers=auth).status_code == 200
    assert _counts(job_id)[1:] == (60.0, states.RUNNING)
    r = client.post(f"/agent/v1/jobs/{job_id}/result", json={"ok": False, "error": "disk on fire",
                                                              "stderr_tail": "E: boom"}, headers=auth)
    assert r.status_code == 200
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == states.FINALIZING and job.outcome == states.FAILED
        assert "disk on fire" in job.error and "E: boom" in job.error


@pytest.mark.parametrize("state", [states.SUCCEEDED, states.FAILED, states.FINALIZING, states.CANCELLED])
def test_report_for_a_finished_job_is_refused_and_changes_nothing(client: TestClient, state: str) -> None:
    job_id = _running_job(state)
    before = _counts(job_id)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post(f"/agent/v1/jobs/{job_id}/progress", json={"percent": 99}, headers=auth)
    assert r.status_code == 409 and state in r.json()["error"]
    r = client.post(f"/agent/v1/jobs/{job_id}/result", json={"ok": True}, headers=auth)
    assert r.status_code == 409
    assert _counts(job_id) == before


@pytest.mark.parametrize("path,body,words", [
    ("/progress", b'{"percent": NaN}', "percent: must be a finite number"),
    ("/progress", b'{"percent": 150}', "percent: must be at most 100"),
    ("/progress", b'{"percnt": 5}', "percnt: unknown field"),
    ("/result", b'{"ok": true, "files": {"../x": "00"}}', "files['../x']: '../x' is not a plain file name"),
    ("/result", b'{"error": "boom"}', "ok: missing"),
    ("/result", b'[1, 2]', "must be a JSON object"),
])
def test_bad_report_is_422_naming_the_field_and_records_nothing(client: TestClient, path: str,
                                                                 body: bytes, words: str) -> None:
    job_id = _running_job()
    before = _counts(job_id)
    r = client.post(f"/agent/v1/jobs/{job_id}{path}", content=body,
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 422 and words in r.json()["error"], r.text
    assert _counts(job_id) == before


def test_spec_is_the_protocols_job_spec(client: TestClient) -> None:
    from imgfarm.protocol import JobSpec, LocalStore

    job_id = _running_job(states.BOOTING)
    spec = client.get(f"/agent/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    parsed = JobSpec.from_json(spec)
    assert parsed.image.location == "base" and isinstance(parsed.store, LocalStore)
    assert spec["store"]["type"] == "local" and spec["image"]["format"] == "partimage-ng"


def test_spec_names_the_nfs_export_and_its_mount_options(client: TestClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings
    from imgfarm.protocol import JobSpec, NfsStore

    job_id = _running_job(states.BOOTING)
    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS", "10.0.2.2:/images")
    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS_OPTIONS", "port=20490")
    get_settings.cache_clear()
    spec = client.get(f"/agent/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    store = JobSpec.from_json(spec).store
    assert store == NfsStore(export="10.0.2.2:/images", options="port=20490")


def test_a_spec_the_settings_make_invalid_fails_the_job_with_the_reason(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    job_id = _running_job(states.BOOTING)
    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS", "/srv/images")  # no server: not an NFS export
    get_settings.cache_clear()
    r = client.get(f"/agent/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and "store.export: '/srv/images' is not server:/export" in r.json()["error"]
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.FINALIZING and job.outcome == states.FAILED
        assert "store.export" in job.error


def test_operator_errors_name_the_bad_input(client: TestClient) -> None:
    with session_scope() as s:
        for i in range(1, 4):
            add_node(s, f"n{i}", disk=f"/tmp/n{i}.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n[1-9]", "image": "base"})
    assert r.status_code == 404 and "n[4-9]" in r.json()["error"]
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n[1-3]", "image": "nope"})
    assert r.status_code == 404 and "'nope' not found" in r.json()["error"]
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n1", "image": "../etc"})
    assert r.status_code == 400 and "bad image name '../etc'" in r.json()["error"]
    r = client.post("/api/v1/jobs/capture", json={"node": "n1", "image": "a/../../b"})
    assert r.status_code == 400
    r = client.post("/api/v1/jobs/restore", json={"nodes": "n[1-", "image": "base"})
    assert r.status_code == 400 and "n[1-" in r.json()["error"]
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_node_driver_settings_are_checked_against_the_drivers_tables(client: TestClient) -> None:
    body = {"name": "b1", "disk": "/tmp/b1.img", "power_driver": "ipmi",
            "driver_info": {"bmc_address": "10.0.0.9", "bmc_password_file": "/p", "bmc_prot": "623"}}
    r = client.post("/api/v1/nodes", json=body)
    assert r.status_code == 400
    assert "'bmc_prot' is not a setting of the sim boot driver and the ipmi power driver" in r.json()["error"]
    assert "did you mean bmc_port?" in r.json()["hint"]
    r = client.post("/api/v1/nodes", json={**body, "driver_info": {"bmc_address": "h", "bmc_port": 0}})
    assert r.status_code == 400 and "bmc_port is 0, not a port number" in r.json()["error"]
    assert client.get("/api/v1/nodes").json() == []
    shown = client.get("/api/v1/drivers/ipmi").json()
    assert [p["name"] for p in shown["power"]["properties"]][:2] == ["bmc_address", "bmc_port"]
    assert client.get("/api/v1/drivers/nope").status_code == 404
    assert {(d["kind"], d["name"]) for d in client.get("/api/v1/drivers").json()} >= {("power", "ipmi")}


def test_openapi_schema_is_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/jobs/restore" in paths and "/agent/v1/jobs/{job_id}/result" in paths
