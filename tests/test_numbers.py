"""Numbers that are not numbers, names that end in a newline, addresses that are not addresses.

Each is a clear 4xx from the API (or exit 2 from the CLI) naming the field,
and nothing is recorded: no job, no node, no boot file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from imgfarm.cli.main import app as cli_app
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.nodes import get_node
from imgfarm.models.tables import Group, Job, JobEvent, Node
from imgfarm.models.windows import Window
from imgfarm.tasks.nodes import add_node
from tests.apitest import local_client, running_job

TOKEN = "n" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
BIG = 2**70


@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    with local_client() as c:
        yield c


def _count(model: type) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _running_job() -> int:
    return running_job(TOKEN)


@pytest.mark.parametrize("timeout", [b"NaN", b"Infinity", b"-Infinity", b"1e300", b"-1"])
@pytest.mark.parametrize("path,body", [
    ("/api/v1/jobs/capture", b'{"node": "n1", "image": "new", "timeout": %s}'),
    ("/api/v1/jobs/restore", b'{"nodes": "n1", "image": "base", "timeout": %s}'),
])
def test_a_timeout_that_is_not_a_number_of_seconds_is_400(client: TestClient, path: str, body: bytes,
                                                          timeout: bytes) -> None:
    r = client.post(path, content=body % timeout, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "bad timeout" in r.json()["error"] and "30 days" in r.json()["error"]
    assert _count(Job) == 0


@pytest.mark.parametrize("path,body,field", [
    ("/progress", b'{"percent": NaN}', "percent"),
    ("/progress", b'{"rate": Infinity}', "rate"),
    ("/progress", b'{"bytes_done": 18446744073709551616}', "bytes_done"),
    ("/progress", b'{"bytes_total": -Infinity}', "bytes_total"),
    ("/result", b'{"ok": true, "bytes": 18446744073709551616}', "bytes"),
    ("/result", b'{"ok": true, "duration": NaN}', "duration"),
])
def test_reports_with_numbers_that_are_not_numbers_are_422_naming_the_field(
        client: TestClient, path: str, body: bytes, field: str) -> None:
    job_id = _running_job()
    events = _count(JobEvent)
    r = client.post(f"/agent/v1/jobs/{job_id}{path}", content=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"].startswith(f"{field}: "), r.text
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.RUNNING and job.result in (None, {})
    assert _count(JobEvent) == events


@pytest.mark.parametrize("method,path", [
    ("GET", f"/api/v1/jobs/{BIG}"), ("POST", f"/api/v1/jobs/{BIG}/cancel"),
    ("GET", f"/agent/v1/jobs/{BIG}"), ("POST", f"/agent/v1/jobs/{BIG}/progress"),
    ("POST", f"/agent/v1/jobs/{BIG}/result"), ("GET", "/api/v1/jobs/0"),
    ("GET", f"/api/v1/jobs/{2**31}"), ("GET", f"/agent/v1/jobs/{2**31}"),  # ids are 32-bit on PostgreSQL
])
def test_a_job_id_past_64_bits_is_422_naming_job_id(client: TestClient, method: str, path: str) -> None:
    headers = AUTH if path.startswith("/agent/") else {}
    r = client.request(method, path, json={"ok": True} if method == "POST" else None, headers=headers)
    assert r.status_code == 422 and "job_id" in r.json()["error"], r.text


@pytest.mark.parametrize("body,words", [
    ({"name": "n9\n"}, "bad node name 'n9\\n'"),
    ({"name": "n9", "groups": ["lab\n"]}, "bad node name 'lab\\n'"),
    ({"name": "n9", "ip": "not an ip"}, "bad ip 'not an ip'"),
    ({"name": "n9", "ip": "10.0.0.9\n"}, "bad ip '10.0.0.9\\n'"),
    ({"name": "n9", "ip": "10.0.0.999"}, "bad ip"),
    ({"name": "n9", "disk": "/tmp/n9.img\n"}, "bad disk"),
    ({"name": "n9", "disk": "relative.img"}, "bad disk"),
    ({"name": "n9", "mac": "52:54:00:00:00:09", "boot_driver": "pxe",
      "driver_info": {"kernel": "imgfarm/vmlinuz\nAPPEND init=/bin/sh"}}, "kernel"),
    ({"name": "n9", "mac": "52:54:00:00:00:09", "boot_driver": "pxe",
      "driver_info": {"initrd": "imgfarm/initrd.img\n"}}, "initrd"),
])
def test_bad_node_fields_are_400_naming_them_and_nothing_is_added(client: TestClient, body: dict[str, object],
                                                                 words: str) -> None:
    r = client.post("/api/v1/nodes", json={"disk": "/tmp/n9.img", **body})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert _count(Node) == 1 and _count(Group) == 0


def test_a_good_ip_is_kept_in_its_canonical_form(client: TestClient) -> None:
    r = client.post("/api/v1/nodes", json={"name": "n9", "disk": "/tmp/n9.img", "ip": "2001:DB8::0:1"})
    assert r.status_code == 201 and r.json()["ip"] == "2001:db8::1"


def test_a_window_name_with_a_newline_is_refused(client: TestClient) -> None:
    r = client.post("/api/v1/windows", json={"name": "w\n", "cron": "0 2 * * 6", "duration_minutes": 60,
                                             "image": "base", "nodes": "n1"})
    assert r.status_code == 400 and "bad node name 'w\\n'" in r.json()["error"]
    assert _count(Window) == 0


def test_pxe_settings_with_a_newline_write_no_boot_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings
    from imgfarm.drivers.base import AgentOrders, NodeInfo
    from imgfarm.drivers.pxe import PxeBoot
    from imgfarm.errors import DriverError

    root = tmp_path / "tftp"
    root.mkdir()
    monkeypatch.setenv("IMGFARM_PXE__TFTP_ROOT", str(root))
    # `$` matched before a final newline, which then split the APPEND line
    monkeypatch.setenv("IMGFARM_PXE__EXTRA_CMDLINE", "console=ttyS0\n")
    get_settings.cache_clear()
    try:
        info = NodeInfo(name="n7", mac="aa:bb:cc:00:11:22", boot_driver="pxe", driver_info={})
        orders = AgentOrders(api_url="http://10.0.0.1:8470", job_id=7, token="T" * 40)
        with pytest.raises(DriverError, match="cmdline"):
            PxeBoot().boot_agent(info, orders)
        assert [p for p in root.rglob("*") if p.is_file()] == []
    finally:
        get_settings.cache_clear()


# --- the CLI ---------------------------------------------------------------------------

runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli_app, list(args), env={"COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("args", [("job", str(BIG)), ("cancel", str(BIG)), ("job", "0")])
def test_cli_job_id_past_64_bits_is_exit_2(settings_env: str, args: tuple[str, ...]) -> None:
    code, out = _cli(*args)
    assert code == 2 and "Invalid value for 'job_id'" in out and "Traceback" not in out, out


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-5"])
def test_cli_timeout_that_is_not_seconds_is_exit_2(settings_env: str, value: str) -> None:
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
    code, out = _cli("capture", "n1", "-i", "img", "--timeout", value)
    assert code == 2 and "bad timeout" in out, out
    assert _count(Job) == 0


def test_cli_node_set_checks_ip_and_disk(settings_env: str) -> None:
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
    assert _cli("node", "set", "n1", "--ip", "300.1.1.1")[0] == 2
    assert _cli("node", "set", "n1", "--disk", "/tmp/x\n")[0] == 2
    with session_scope() as s:
        node = get_node(s, "n1")
        assert node.ip == "" and node.disk == "/tmp/n1.img"


def test_jobs_json_is_valid_json_when_a_row_holds_infinity(settings_env: str) -> None:
    with session_scope() as s:
        node = add_node(s, "n1", disk="/tmp/n1.img")
        s.add(Job(kind="restore", node_id=node.id, image_name="base", state=states.RUNNING,
                  rate=float("inf"), progress=50.0))
    code, out = _cli("jobs", "--json")
    assert code == 0, out
    row = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))[0]
    assert row["rate"] is None and row["progress"] == 50.0
