"""The job token is never in a boot file: the agent's first call takes it, once.

The farm's own start of a job (tasks/lifecycle.py) writes a real pxelinux file
through the pxe driver; every word of it is then tried as a credential against
the running API (TestClient), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, JobEvent
from imgfarm.tasks.nodes import add_node

MAC = "52:54:00:12:34:56"
LOCAL = ("127.0.0.1", 50000)


@pytest.fixture
def client(settings_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from imgfarm.api.app import create_app
    from imgfarm.config.settings import get_settings

    (tmp_path / "tftp").mkdir()
    monkeypatch.setenv("IMGFARM_PXE__TFTP_ROOT", str(tmp_path / "tftp"))
    monkeypatch.setenv("IMGFARM_API_URL", "http://10.0.0.1:8470")
    get_settings.cache_clear()
    with TestClient(create_app(), client=LOCAL) as c:
        yield c


def _booted_job(tmp_path: Path, mac: str = MAC) -> int:
    """A restore job started by the farm's own code: its pxe file written, the node 'rebooted'."""
    from imgfarm.tasks.lifecycle import _start

    disk = tmp_path / "n1.img"
    disk.write_bytes(b"\0" * 4096)
    with session_scope() as s:
        node = add_node(s, "n1", mac=mac, boot="pxe", power="sim", disk=str(disk))
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
        job = Job(kind="restore", node_id=node.id, image_name="base", state=states.QUEUED)
        s.add(job)
        s.flush()
        job_id = job.id
    _start(job_id)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.BOOTING, job.error
    return job_id


def _events(job_id: int, kind: str) -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id,
                                                             JobEvent.kind == kind)))


def test_a_pxe_boot_file_holds_nothing_the_api_accepts(client: TestClient, tmp_path: Path) -> None:
    job_id = _booted_job(tmp_path)
    files = [p for p in (tmp_path / "tftp").rglob("*") if p.is_file()]
    assert files, "the pxe driver wrote no boot file"
    text = "\n".join(p.read_text() for p in files)
    assert f"imgfarm.job={job_id}" in text and "imgfarm.api=http://10.0.0.1:8470" in text
    assert "imgfarm.token" not in text
    words = set(re.split(r"[\s=]+", text)) - {""}
    for word in words:
        auth = {"Authorization": f"Bearer {word}"}
        assert client.get(f"/agent/v1/jobs/{job_id}", headers=auth).status_code == 401, word
        r = client.post(f"/agent/v1/jobs/{job_id}/result", json={"ok": True}, headers=auth)
        assert r.status_code == 401, word
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.BOOTING and not job.result


def test_the_first_call_gets_the_token_once_and_a_second_is_recorded(client: TestClient,
                                                                    tmp_path: Path) -> None:
    job_id = _booted_job(tmp_path)
    url = f"/agent/v1/jobs/{job_id}/token"
    assert client.post(url, json={"macs": ["52:54:00:99:99:99"]}).status_code == 401  # not its MAC
    assert client.post("/agent/v1/jobs/99999/token", json={"macs": [MAC]}).status_code == 401
    assert _events(job_id, "security") == []
    r = client.post(url, json={"macs": ["02:00:00:00:00:01", MAC.upper().replace(":", "-")]})
    assert r.status_code == 200, r.text
    auth = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.get(f"/agent/v1/jobs/{job_id}", headers=auth).status_code == 200

    again = client.post(url, json={"macs": [MAC]}, headers={"X-Forwarded-For": "10.9.9.9"})
    assert again.status_code == 409 and "handed out already" in again.json()["error"]
    [raced] = _events(job_id, "security")
    assert "second first call" in raced and "raced the agent" in raced
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == states.FINALIZING and job.outcome == states.FAILED
    # the job is no longer trusted: its token reports nothing more
    assert client.post(f"/agent/v1/jobs/{job_id}/result", json={"ok": True}, headers=auth).status_code == 409


def test_agent_takes_its_token_then_reports(client: TestClient, tmp_path: Path) -> None:
    """The agent's own client against the app: claim (with BOOTIF's MAC), then spec."""
    from imgfarm.agent.main import machine_macs

    macs = machine_macs("quiet BOOTIF=01-52-54-00-12-34-56", sys_net=tmp_path / "no-such-dir")
    assert macs == [MAC]
    job_id = _booted_job(tmp_path)
    token = client.post(f"/agent/v1/jobs/{job_id}/token", json={"macs": macs}).json()["token"]
    spec = client.get(f"/agent/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    assert spec.status_code == 200 and spec.json()["job_id"] == job_id


def test_a_sim_node_with_a_mac_boots_with_bootif_as_pxelinux_gives_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A sim agent runs on the farm's host, whose interfaces are not the node's: the sim boot
    file carries BOOTIF= as pxelinux's IPAPPEND 2 does, so the first call names the node's MAC."""
    from imgfarm.agent.main import machine_macs
    from imgfarm.config.settings import get_settings
    from imgfarm.drivers.base import AgentOrders, NodeInfo
    from imgfarm.drivers.sim import SimBoot, node_dir

    monkeypatch.setenv("IMGFARM_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    node = NodeInfo(name="m1", mac=MAC, boot_driver="sim", power_driver="sim", disk="/tmp/m1.img")
    SimBoot().boot_agent(node, AgentOrders(api_url="http://127.0.0.1:1", job_id=5))
    cmdline = (node_dir("m1") / "cmdline").read_text()
    assert machine_macs(cmdline, sys_net=tmp_path / "none")[0] == MAC
    get_settings.cache_clear()
