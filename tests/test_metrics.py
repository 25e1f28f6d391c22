"""GET /metrics on SQLite and PostgreSQL: values come from the job database at scrape time.

The rows are written with plain sessions (as workers in other processes
would), then scraped through the real FastAPI app and parsed with
prometheus-client's own parser.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, utcnow
from imgfarm.tasks.nodes import add_node

# a loopback peer: with no operator token in the database, only this machine may call
LOCAL = ("127.0.0.1", 50000)


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_jobs_bytes_durations_and_windows(settings_env: str, tmp_path: Path) -> None:
    from imgfarm.api.app import create_app
    from imgfarm.models.windows import add_window
    from imgfarm.tasks.window_runner import open_run

    now = utcnow()
    with session_scope() as s:
        nodes = [add_node(s, f"m{i}", disk=str(tmp_path / f"m{i}.img"), groups=["g"])
                 for i in range(3)]
        nodes[2].admin_state = states.NODE_MAINTENANCE
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
        s.add(Job(kind="restore", node_id=nodes[0].id, image_name="base", state=states.SUCCEEDED,
                  bytes_done=1000, started_at=now - timedelta(seconds=20), finished_at=now))
        s.add(Job(kind="restore", node_id=nodes[0].id, image_name="base", state=states.FAILED,
                  bytes_done=7, started_at=now - timedelta(seconds=500), finished_at=now))
        s.add(Job(kind="capture", node_id=nodes[1].id, image_name="c", state=states.RUNNING,
                  started_at=now))
        window = add_window(s, "w", "0 2 * * 6", 60, "base", groups=["g"], max_concurrent=1)
        open_run(s, window, now, now, "run-now")
    client = TestClient(create_app(), client=LOCAL)
    m = _scrape(client)
    assert m[("imgfarm_jobs", (("kind", "restore"), ("state", "succeeded")))] == 1
    assert m[("imgfarm_jobs", (("kind", "restore"), ("state", "failed")))] == 1
    assert m[("imgfarm_jobs", (("kind", "capture"), ("state", "running")))] == 1
    assert m[("imgfarm_jobs", (("kind", "convert"), ("state", "queued")))] == 0
    assert m[("imgfarm_job_bytes_total", (("kind", "restore"),))] == 1000  # succeeded only
    ok = (("kind", "restore"), ("state", "succeeded"))
    assert m[("imgfarm_job_duration_seconds_count", ok)] == 1
    assert abs(m[("imgfarm_job_duration_seconds_sum", ok)] - 20) < 1
    assert m[("imgfarm_job_duration_seconds_bucket", (*ok[:1], ("le", "30.0"), ok[1]))] == 1
    assert m[("imgfarm_job_duration_seconds_bucket", (*ok[:1], ("le", "10.0"), ok[1]))] == 0
    assert m[("imgfarm_nodes", (("admin_state", "maintenance"),))] == 1
    assert m[("imgfarm_nodes", (("admin_state", "available"),))] == 2
    assert m[("imgfarm_window_run_nodes", (("status", "pending"), ("window", "w")))] == 3
    assert m[("imgfarm_window_open", (("state", "open"), ("window", "w")))] == 1

    # a job written after the first scrape shows in the next one: nothing cached
    with session_scope() as s:
        s.add(Job(kind="convert", image_name="x", state=states.QUEUED))
    assert _scrape(client)[("imgfarm_jobs", (("kind", "convert"), ("state", "queued")))] == 1


def test_windows_http_api(settings_env: str, tmp_path: Path) -> None:
    from imgfarm.api.app import create_app

    with session_scope() as s:
        add_node(s, "h1", disk=str(tmp_path / "h1.img"), groups=["lab"])
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    client = TestClient(create_app(), client=LOCAL)
    body = {"name": "hw", "cron": "0 2 * * 6", "duration_minutes": 30, "image": "base",
            "groups": ["lab"], "timezone": "Europe/Berlin"}
    r = client.post("/api/v1/windows", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["target"] == "@lab" and r.json()["next_open"]
    bad = client.post("/api/v1/windows", json={**body, "name": "hx", "cron": "0 2 * * X"})
    assert bad.status_code == 400 and "0 2 * * X" in bad.json()["error"]
    assert client.post("/api/v1/windows", json={**body, "name": "hy", "image": "nope"}
                       ).status_code == 404
    assert client.post("/api/v1/windows", json=body).status_code == 409
    assert [w["name"] for w in client.get("/api/v1/windows").json()] == ["hw"]
    assert client.post("/api/v1/windows/hw/disable").json()["enabled"] is False
    assert client.get("/api/v1/windows/hw?runs=true").json()["runs"] == []
    assert client.delete("/api/v1/windows/hw").json() == {"removed": "hw"}
    assert client.get("/api/v1/windows/hw").status_code == 404
