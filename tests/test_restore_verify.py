"""A restore succeeds only when its report matches the image as the job database registered it.

`{"ok": true, "files": {}}` once marked a restore succeeded while the disk was
still zeros. Now every stream's sha256 as the agent read it, the bytes read and
the manifest it followed are checked at finalize against the registry's
checksums and manifest; a manifest changed in the store after registration is
caught (by the agent before it writes, or by the farm after).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.jobs import get_job, hash_token
from imgfarm.models.nodes import get_node
from imgfarm.models.tables import Job
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.nodes import add_node
from tests.farm import Farm

TOKEN = "r" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHA = {"part1.ptcl.zst": "1" * 64, "part2.ptcl.zst": "2" * 64, "disk-head.bin": "3" * 64}


def _part(index: int, sha: str, stream: int) -> dict[str, Any]:
    return {"index": index, "name": f"part{index}", "file": f"part{index}.ptcl.zst", "filesystem": "ext4",
            "partclone_fs": "EXTFS", "block_size": 4096, "total_blocks": 10, "used_blocks": 5,
            "total_bytes": 40960, "used_bytes": 20480, "start_bytes": index << 20, "size_bytes": 40960,
            "sha256": sha, "stream_bytes": stream}


MANIFEST: dict[str, Any] = {
    "format": "partimage-ng", "version": 1, "created": "2026-01-01T00:00:00Z", "name": "base",
    "origin": {"kind": "capture", "node": "n0", "job": 1},
    "disk": {"size_bytes": 1 << 30, "partition_table": {"type": "dos", "sfdisk": "label: dos\n"},
             "head": {"file": "disk-head.bin", "bytes": 1048576, "sha256": SHA["disk-head.bin"]}},
    "partitions": [_part(1, SHA["part1.ptcl.zst"], 1000), _part(2, SHA["part2.ptcl.zst"], 2000)],
}


@pytest.fixture
def client(settings_env: str) -> Iterator[TestClient]:
    from imgfarm.api.app import create_app
    from imgfarm.protocol import Manifest

    manifest = Manifest.from_json(MANIFEST).to_json()
    with session_scope() as s:
        add_node(s, "n1", disk="/tmp/n1.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=3000, checksums=dict(SHA),
                       manifest=manifest)
    with TestClient(create_app(), client=("127.0.0.1", 50000)) as c:
        yield c


def _restore_job() -> int:
    with session_scope() as s:
        job = Job(kind="restore", node_id=get_node(s, "n1").id, image_name="base", state=states.RUNNING,
                  token_hash=hash_token(TOKEN))  # boot_calls 0: finalize leaves the sim node alone
        s.add(job)
        s.flush()
        return job.id


def _finish(client: TestClient, report: dict[str, Any]) -> tuple[str, str]:
    job_id = _restore_job()
    r = client.post(f"/agent/v1/jobs/{job_id}/result", json=report, headers=AUTH)
    assert r.status_code == 200, r.text
    finalize_job(job_id)
    with session_scope() as s:
        job = get_job(s, job_id)
        return job.state, job.error


def _good() -> dict[str, Any]:
    return {"ok": True, "files": dict(SHA), "bytes": 3000, "manifest": json.loads(json.dumps(MANIFEST))}


def test_a_report_that_matches_the_registry_succeeds(client: TestClient) -> None:
    assert _finish(client, _good()) == (states.SUCCEEDED, "")


def test_ok_with_no_files_fails(client: TestClient) -> None:
    state, error = _finish(client, {"ok": True, "files": {}})
    assert state == states.FAILED and error.startswith("restore did not verify")


@pytest.mark.parametrize("change,words", [
    (lambda r: r["files"].pop("part2.ptcl.zst"), "part2.ptcl.zst is missing from the agent's report"),
    (lambda r: r["files"].update({"part1.ptcl.zst": "f" * 64}), "part1.ptcl.zst: the agent read sha256 ffff"),
    (lambda r: r["files"].pop("disk-head.bin"), "disk-head.bin is missing"),
    (lambda r: r.update(bytes=10), "the agent read 10 bytes; the image's streams hold 3000"),
    (lambda r: r.pop("manifest"), "did not report the manifest"),
    (lambda r: r["manifest"]["disk"]["partition_table"].update(sfdisk="label: gpt\n"),
     "differs from the registered one in disk"),
    (lambda r: r["manifest"]["partitions"].pop(), "differs from the registered one in partitions"),
])
def test_a_report_that_differs_from_the_registry_fails_naming_what(client: TestClient, change: Any,
                                                                  words: str) -> None:
    report = _good()
    change(report)
    state, error = _finish(client, report)
    assert state == states.FAILED and "restore did not verify" in error and words in error, error


# --- with a real agent on sim nodes -----------------------------------------------------

@pytest.mark.slow
def test_a_manifest_changed_in_the_store_after_registration_fails_the_restore(farm: Farm) -> None:
    farm.start_api()
    farm.start_worker()
    farm.add_node("n1", fill=True)
    farm.cli("capture", "n1", "--image", "base", "--wait")
    target = farm.add_node("n2")
    path = farm.root / "data" / "images" / "base" / "manifest.json"
    original = path.read_text()

    def restore() -> dict[str, Any]:
        job_id = farm.cli_json("restore", "n2", "--image", "base")["job_ids"][0]
        return farm.wait_job(job_id, states.FINAL, 120)

    # A stream's sha256 edited to match a substituted stream: the agent refuses before writing.
    edited = json.loads(original)
    edited["partitions"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(edited))
    view = restore()
    assert view["state"] == states.FAILED and "changed after the image was registered" in view["error"]
    assert target.read_bytes().count(0) == target.stat().st_size  # nothing was written

    # Anything else edited (here the disk's size the agent checks the target against): the farm.
    edited = json.loads(original)
    edited["disk"]["size_bytes"] = edited["disk"]["size_bytes"] - 512
    path.write_text(json.dumps(edited))
    view = restore()
    assert view["state"] == states.FAILED, view
    assert "differs from the registered one in disk" in view["error"]

    path.write_text(original)
    assert restore()["state"] == states.SUCCEEDED
