"""Fuzzing, bounded: the partimage reader on mutated real volumes, and the API against its schema.

Both run a fixed number of derandomized examples, so `make test` does the same work every
time. The reader runs in a child process under a 1 GiB address-space cap and a 10 s alarm
per input (tests/fuzz_partimage.py). Schemathesis sends each operation of /openapi.json its
generated requests with an admin token, against a database that holds nodes, groups,
images (both formats), jobs in several states with events, and a window, so requests reach
the paths past the lookups; every answer must be a non-5xx that matches the schema.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imgfarm.api.app import create_app
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.jobs import add_event, hash_token
from imgfarm.models.tables import Job
from imgfarm.models.tokens import create_token
from imgfarm.models.windows import add_window
from imgfarm.tasks.nodes import add_node
from tests.support import forget_redis_keys, use_redis_db

ROOT = Path(__file__).resolve().parent.parent
READER_EXAMPLES = 300
API_EXAMPLES = 25  # per operation
REDIS_DB = 12


def test_partimage_reader_converts_or_refuses_every_mutated_volume() -> None:
    out = subprocess.run([sys.executable, "-m", "tests.fuzz_partimage", str(READER_EXAMPLES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert f"fuzzed {READER_EXAMPLES} inputs" in out.stdout, out.stdout
    print(out.stdout.strip())


# --- schemathesis ----------------------------------------------------------------------

def _spec() -> dict[str, Any]:
    """/openapi.json with each path's operations in a fixed order: a route of methods GET and
    HEAD lists them in set order, which differs between processes (pytest-xdist workers must
    collect the same tests)."""
    spec = create_app().openapi()
    spec["paths"] = {path: dict(sorted(item.items())) for path, item in spec["paths"].items()}
    return spec


SCHEMA = schemathesis.openapi.from_dict(_spec())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MANIFEST: dict[str, Any] = {
    "format": "partimage-ng", "version": 1, "created": "2026-01-01T00:00:00Z", "name": "ng",
    "origin": {"kind": "capture", "node": "n1", "job": 1},
    "disk": {"size_bytes": 1 << 30, "partition_table": None, "head": None},
    "partitions": [{"index": 0, "name": "part0", "file": "part0.ptcl.zst", "filesystem": "ext4",
                    "partclone_fs": "EXTFS", "block_size": 4096, "total_blocks": 10, "used_blocks": 5,
                    "total_bytes": 40960, "used_bytes": 20480, "start_bytes": 0, "size_bytes": 40960,
                    "sha256": "1" * 64, "stream_bytes": 100}],
}


@pytest.fixture
def farm_api(settings_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """The app over a database with something of everything, and an admin token for it."""
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}:"
    use_redis_db(monkeypatch, REDIS_DB, prefix)
    secret = tmp_path / "bmc.pw"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    with session_scope() as s:
        for i in range(1, 5):
            add_node(s, f"n{i}", disk=str(tmp_path / f"n{i}.img"), groups=["lab"], ip=f"10.0.0.{i}")
        add_node(s, "px1", mac="52:54:00:00:00:01", boot="pxe", power="ipmi",
                 driver_info={"bmc_address": "10.1.0.1", "bmc_password_file": str(secret)})
        register_image(s, "base", "partimage-ng", "base", size_bytes=100,
                       checksums={"part0.ptcl.zst": "1" * 64}, manifest={**MANIFEST, "name": "base"})
        register_image(s, "old", "partimage", "old", size_bytes=100, checksums={"old.000": "2" * 64})
        node_ids = [n for n in range(1, 5)]
        for i, state in enumerate([states.RUNNING, states.SUCCEEDED, states.FAILED, states.QUEUED]):
            job = Job(kind="restore", node_id=node_ids[i], image_name="base", state=state,
                      token_hash=hash_token(f"tok{i}" * 8), error="disk gone [/]" if state == states.FAILED else "")
            s.add(job)
            s.flush()
            add_event(s, job.id, "progress", "copying", state=state, data={"percent": 5})
        add_window(s, "nightly", "0 2 * * 6", 60, "base", nodes="n[1-2]", groups=["lab"])
        token = create_token(s, "fuzz-admin", "admin")
    yield create_app(), token
    forget_redis_keys(REDIS_DB, prefix)
    from imgfarm.config.settings import get_settings
    from imgfarm.tasks.broker import reload_config

    get_settings.cache_clear()
    reload_config()


@SCHEMA.parametrize()
@settings(max_examples=API_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_answers_match_the_schema_and_are_never_5xx(case: Any, farm_api: tuple[Any, str]) -> None:
    app, token = farm_api
    if case.path.startswith("/api/v1/tokens") and case.method.upper() in ("DELETE", "POST"):
        pytest.skip("would revoke or add the token the run itself uses")
    response = case.call(app=app, headers={"Authorization": f"Bearer {token}"})
    case.validate_response(response, checks=CHECKS)
