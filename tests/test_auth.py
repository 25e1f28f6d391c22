"""Operator auth: tokens with scopes, the loopback rule, who submitted, the CLI's token sources.

The API runs in-process (TestClient) on SQLite and PostgreSQL; `imgfarm api`
and the CLI run as real processes where their own checks are what is tested.
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
from sqlalchemy import select

from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import ApiToken, Job
from imgfarm.models.tokens import create_token
from imgfarm.tasks.nodes import add_node
from tests.apitest import local_client
from tests.farm import free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    with local_client() as c:
        yield c


def _token(name: str, scope: str) -> dict[str, str]:
    with session_scope() as s:
        return {"Authorization": f"Bearer {create_token(s, name, scope)}"}


def _nodes_and_image() -> None:
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})


def test_scopes_nest_read_operate_admin(client: TestClient) -> None:
    _nodes_and_image()
    read, operate, admin = _token("r", "read"), _token("o", "operate"), _token("a", "admin")
    node = {"name": "n2", "disk": "/tmp/n2.img"}
    cases = [  # (method, path, body, lowest scope that may)
        ("GET", "/api/v1/jobs", None, "read"),
        ("GET", "/api/v1/nodes", None, "read"),
        ("GET", "/api/v1/images", None, "read"),
        ("GET", "/api/v1/windows", None, "read"),
        ("POST", "/api/v1/jobs/999/cancel", None, "operate"),
        ("POST", "/api/v1/jobs/restore", {"nodes": "nope", "image": "base"}, "operate"),
        ("POST", "/api/v1/nodes", node, "admin"),
        ("GET", "/api/v1/tokens", None, "admin"),
    ]
    order = ["read", "operate", "admin"]
    for method, path, body, lowest in cases:
        for scope, headers in zip(order, (read, operate, admin), strict=True):
            r = client.request(method, path, json=body, headers=headers)
            if order.index(scope) < order.index(lowest):
                assert r.status_code == 403, (method, path, scope, r.text)
                assert f"this needs {lowest}" in r.json()["error"]
            else:
                assert r.status_code not in (401, 403), (method, path, scope, r.text)
    with session_scope() as s:  # the refused node add recorded nothing; the admin's did
        assert s.scalar(select(Job.id)) is None


def test_once_a_token_exists_every_request_needs_one(client: TestClient) -> None:
    assert client.get("/api/v1/jobs").status_code == 200  # no credential yet: this machine only
    _token("alice", "read")
    r = client.get("/api/v1/jobs")
    assert r.status_code == 401 and "imgfarm token create" in r.json()["hint"]
    for bad in ("Bearer nope", "Bearer imgf_000000000000_" + "A" * 43, "Basic x"):
        assert client.get("/api/v1/jobs", headers={"Authorization": bad}).status_code == 401


def test_without_any_token_only_loopback_peers_are_served(settings_env: str) -> None:
    from imgfarm.api.app import create_app

    with TestClient(create_app(), client=("10.1.2.3", 40000)) as remote:
        r = remote.get("/api/v1/jobs")
        assert r.status_code == 401 and "only this machine" in r.json()["error"]


def test_revoked_token_is_refused_and_only_a_hash_is_stored(client: TestClient) -> None:
    r = client.post("/api/v1/tokens", json={"name": "bob", "scope": "read"})  # local, no token yet
    assert r.status_code == 201
    token = r.json()["token"]
    with session_scope() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "bob"))
        assert row is not None and token.split("_")[-1] not in repr(vars(row))
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/jobs", headers=auth).status_code == 200
    with session_scope() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "bob"))
        assert row is not None and row.last_used_at is not None
    admin = _token("root", "admin")
    assert client.delete("/api/v1/tokens/bob", headers=admin).status_code == 200
    assert client.get("/api/v1/jobs", headers=auth).status_code == 401
    assert [t["name"] for t in client.get("/api/v1/tokens", headers=admin).json()] == ["root"]


def test_the_job_records_the_tokens_name_not_the_bodys_claim(client: TestClient) -> None:
    _nodes_and_image()
    op = _token("ci-bot", "operate")
    # this process has no broker (memory://), so the job is recorded and then ends failed
    client.post("/api/v1/jobs/restore", json={"nodes": "n1", "image": "base", "submitted_by": "admin"},
                headers=op)
    with session_scope() as s:
        assert list(s.scalars(select(Job.submitted_by))) == ["token:ci-bot"]


def test_metrics_and_docs_follow_the_setting(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    read = _token("prom", "read")
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=read).status_code == 200, path
    assert client.get("/healthz").status_code == 200
    monkeypatch.setenv("IMGFARM_API_META_ACCESS", "public")
    get_settings.cache_clear()
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/v1/jobs").status_code == 401  # the setting opens only those


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFARM_")}
    return {**env, "IMGFARM_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "IMGFARM_BROKER_URL": "memory://", "COLUMNS": "400",
            **extra}


def _imgfarm(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "imgfarm"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_api_refuses_a_non_loopback_address_until_a_token_exists(tmp_path: Path) -> None:
    import httpx

    from tests.support import wait_for

    env = _env(tmp_path)
    assert _imgfarm(env, "db", "upgrade").returncode == 0
    port = str(free_port())
    out = _imgfarm(env, "api", "--host", "0.0.0.0", "--port", port)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refusing to listen on 0.0.0.0" in out.stderr and "imgfarm token create" in out.stderr
    made = _imgfarm(env, "token", "create", "ops", "--scope", "admin", "--file", str(tmp_path / "t"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "t").stat().st_mode & 0o777 == 0o600
    proc = subprocess.Popen([str(BIN / "imgfarm"), "api", "--host", "0.0.0.0", "--port", port], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
                 30, what="the API on 0.0.0.0")
        token = (tmp_path / "t").read_text().strip()
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/jobs").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/jobs",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_token_file_in_a_new_directory_and_one_that_cannot_be_written(tmp_path: Path) -> None:
    """The README's first step writes ~/.config/imgfarm/token, whose directory a new machine
    does not have; a file that cannot be made is a named error and leaves no token."""
    env = _env(tmp_path)
    assert _imgfarm(env, "db", "upgrade").returncode == 0
    file = tmp_path / "home" / ".config" / "imgfarm" / "token"
    made = _imgfarm(env, "token", "create", "admin", "--scope", "admin", "--file", str(file))
    assert made.returncode == 0, made.stderr
    assert file.stat().st_mode & 0o777 == 0o600 and file.parent.stat().st_mode & 0o777 == 0o700
    bad = _imgfarm(env, "token", "create", "bob", "--scope", "read", "--file", "/proc/none/token")
    assert bad.returncode == 2 and "--file /proc/none/token" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    listed = _imgfarm(env, "token", "list", "--json")
    assert [t["name"] for t in json.loads(listed.stdout)] == ["admin"]


@pytest.fixture
def broker_prefix() -> Iterator[str]:
    """A Redis broker prefix nobody consumes; its keys are removed afterwards."""
    import uuid

    import redis

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    yield prefix
    r = redis.Redis(db=2)
    for key in r.scan_iter(f"*{prefix}*"):
        r.delete(key)


def test_cli_token_comes_from_env_or_a_0600_file_never_a_flag(tmp_path: Path, broker_prefix: str) -> None:
    env = _env(tmp_path, IMGFARM_BROKER_URL="redis://127.0.0.1:6379/2", IMGFARM_BROKER_PREFIX=broker_prefix)
    assert _imgfarm(env, "db", "upgrade").returncode == 0
    assert _imgfarm(env, "node", "add", "n1", "--disk", str(tmp_path / "n1.img")).returncode == 0
    token = _imgfarm(env, "token", "create", "alice", "--scope", "operate").stdout.strip()
    assert token.startswith("imgf_")
    listed = _imgfarm(env, "token", "list", "--json")
    assert '"alice"' in listed.stdout and token not in listed.stdout

    out = _imgfarm(env, "capture", "n1", "--image", "x", "--token", token)
    assert out.returncode == 2 and "No such option" in out.stderr  # no flag takes a token

    loose = tmp_path / "loose"
    loose.write_text(token + "\n")
    loose.chmod(0o644)
    out = _imgfarm({**env, "IMGFARM_TOKEN_FILE": str(loose)}, "capture", "n1", "--image", "x")
    assert out.returncode == 2 and f"chmod 600 {loose}" in out.stderr, out.stderr

    loose.chmod(0o600)
    out = _imgfarm({**env, "IMGFARM_TOKEN_FILE": str(loose)}, "capture", "n1", "--image", "x")
    assert out.returncode == 0, out.stderr
    jobs = _imgfarm(env, "jobs", "--json").stdout
    assert '"submitted_by": "token:alice (cli:' in jobs

    assert _imgfarm(env, "token", "revoke", "alice").returncode == 0
    out = _imgfarm({**env, "IMGFARM_TOKEN": token}, "capture", "n1", "--image", "y")
    assert out.returncode == 5 and "not valid" in out.stderr


def test_flower_refuses_to_run_without_its_own_auth(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "FLOWER_UNAUTHENTICATED_API": "true"}  # the old way does not open it
    out = _imgfarm(env, "flower", "--port", str(free_port()))
    assert out.returncode == 2 and "Flower needs its own auth" in out.stderr, out.stderr
    out = _imgfarm(env, "flower", "--behind-proxy", "--address", "0.0.0.0")
    assert out.returncode == 2 and "loopback only" in out.stderr
    loose = tmp_path / "flower.auth"
    loose.write_text("ops:pw\n")
    loose.chmod(0o640)
    out = _imgfarm({**env, "IMGFARM_FLOWER_AUTH_FILE": str(loose)}, "flower")
    assert out.returncode == 2 and f"chmod 600 {loose}" in out.stderr


def test_api_serves_https_with_certfile_and_keyfile(tmp_path: Path) -> None:
    import httpx

    from tests.support import wait_for

    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    env = _env(tmp_path)
    assert _imgfarm(env, "db", "upgrade").returncode == 0
    out = _imgfarm(env, "api", "--certfile", str(cert))
    assert out.returncode == 2 and "both --certfile and --keyfile" in out.stderr
    port = free_port()
    proc = subprocess.Popen([str(BIN / "imgfarm"), "api", "--port", str(port), "--certfile", str(cert),
                             "--keyfile", str(key)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(cert),
                                   timeout=1).status_code == 200, 30, what="the API over https")
        # the agent's own client reaches it, trusting the farm's CA as its boot image would
        probe = ("import sys\n"
                 "from imgfarm.agent.client import ApiError, FarmClient\n"
                 "from imgfarm.protocol import Orders\n"
                 "try:\n"
                 "    FarmClient(Orders(api_url=sys.argv[1], job_id=1), attempts=1).claim([])\n"
                 "except ApiError as exc:\n"
                 "    print(exc.status, exc)\n")
        url = f"https://127.0.0.1:{port}"
        out = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True,
                             env={**env, "SSL_CERT_FILE": str(cert)}, timeout=60)
        assert out.stdout.startswith("401 "), out.stdout + out.stderr  # over TLS: no such job
        out = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True,
                             env={**env, "SSL_CERT_FILE": str(tmp_path / "none.pem")}, timeout=60)
        assert "CERTIFICATE_VERIFY_FAILED" in out.stdout, out.stdout + out.stderr
        with pytest.raises(httpx.HTTPError):  # plain http on the TLS port gets nowhere
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).raise_for_status()
    finally:
        proc.terminate()
        proc.wait(20)
