"""BMC passwords never come back, whatever the key's spelling; the SQLite file is 0600.

Through the real API app (TestClient) on SQLite and PostgreSQL, and the real
CLI as a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from imgfarm.models.db import session_scope
from imgfarm.models.names import is_secret_key
from imgfarm.models.tables import Node, NodeSecret
from imgfarm.tasks.nodes import node_info
from tests.apitest import local_client

BIN = Path(sys.executable).parent


@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    with local_client() as c:
        yield c


def test_the_drivers_secret_marks_agree_with_the_rule() -> None:
    from imgfarm.drivers.registry import all_drivers

    props = [p for d in all_drivers() for p in d.properties]
    assert any(p.secret for p in props)
    for p in props:
        assert p.secret == is_secret_key(p.name), p.name
    for key in ("bmc_password", "BMC_PASSWORD", "bmc_pass", "Bmc_Passwd", "api_token", "secret"):
        assert is_secret_key(key), key
    for key in ("bmc_password_file", "bmc_address", "bmc_port", "keyboard", "passive"):
        assert not is_secret_key(key), key


def _everything_shown(client: TestClient) -> str:
    out = [client.get("/api/v1/nodes").text]
    out += [client.get(f"/api/v1/nodes/{n['name']}").text for n in client.get("/api/v1/nodes").json()]
    return "\n".join(out)


def test_bmc_password_is_kept_out_of_the_node_row_and_never_returned(client: TestClient) -> None:
    body = {"name": "b1", "disk": "/tmp/b1.img", "power_driver": "ipmi",
            "driver_info": {"bmc_address": "10.0.0.9", "bmc_password": "S3cr3t-pw"}}
    r = client.post("/api/v1/nodes", json=body)
    assert r.status_code == 201, r.text
    assert "S3cr3t" not in r.text and r.json()["driver_info"]["bmc_password"] == "***"
    assert "S3cr3t" not in _everything_shown(client)
    with session_scope() as s:
        row = s.execute(select(Node.driver_info).where(Node.name == "b1")).scalar_one()
        assert row == {"bmc_address": "10.0.0.9"}
        assert s.scalars(select(NodeSecret.value)).all() == ["S3cr3t-pw"]
        node = s.scalar(select(Node).where(Node.name == "b1"))
        assert node is not None and node_info(node).driver_info["bmc_password"] == "S3cr3t-pw"


@pytest.mark.parametrize("key", ["BMC_PASSWORD", "bmc_pass", "Bmc_Password"])
def test_no_spelling_of_a_password_comes_back(client: TestClient, key: str) -> None:
    body = {"name": "b2", "disk": "/tmp/b2.img", "power_driver": "ipmi",
            "driver_info": {"bmc_address": "10.0.0.9", "bmc_password_file": "/p", key: "Variant-pw"}}
    r = client.post("/api/v1/nodes", json=body)
    assert "Variant-pw" not in r.text
    # a row written by other code, past the ORM, with the secret still in driver_info
    with session_scope() as s:
        s.execute(insert(Node).values(name="legacy", disk="/tmp/l.img", power_driver="ipmi",
                                      driver_info={"bmc_address": "h", key: "Variant-pw"}))
    assert "Variant-pw" not in _everything_shown(client)
    assert client.get("/api/v1/nodes/legacy").json()["driver_info"][key] == "***"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFARM_")}
    return {**env, "IMGFARM_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "300"}


def test_sqlite_file_is_0600_and_the_cli_never_shows_the_password(tmp_path: Path) -> None:
    env = _env(tmp_path)
    run = lambda *a: subprocess.run([str(BIN / "imgfarm"), *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert run("db", "upgrade").returncode == 0
    db = tmp_path / "data" / "imgfarm.db"
    assert db.stat().st_mode & 0o777 == 0o600
    db.chmod(0o644)  # an existing file from before: made private on the next use
    out = run("node", "add", "b1", "--disk", "/tmp/b1.img", "--power", "ipmi",
              "--set", "bmc_address=10.0.0.1", "--set", "bmc_password=Cli-S3cret")
    assert out.returncode == 0, out.stderr
    assert db.stat().st_mode & 0o777 == 0o600
    for wal in tmp_path.glob("data/imgfarm.db-*"):
        assert wal.stat().st_mode & 0o077 == 0, wal
    shown = run("node", "show", "b1").stdout + run("node", "show", "b1", "--json").stdout
    shown += run("node", "list", "--json").stdout
    assert "Cli-S3cret" not in shown and "***" in shown
    assert run("node", "set", "b1", "--set", "bmc_password_file=/etc/bmc.pw",
               "--unset", "bmc_password").returncode == 0
    info = json.loads(run("node", "show", "b1", "--json").stdout)["driver_info"]
    assert "bmc_password" not in info and info["bmc_password_file"] == "/etc/bmc.pw"
