"""A capture writes only into its own staging directory; a restore is told the image export.

With the site's two exports set (the store, and its .incoming directory), the job
spec of a capture names only the incoming export and the job's own directory in
it; a restore names the image export, which the agent mounts read-only
(tests/agent/test_store_mount.py).
"""

from __future__ import annotations

import pytest

from imgfarm.models.db import session_scope
from imgfarm.models.images import incoming_dir, register_image
from imgfarm.models.tables import Job
from imgfarm.protocol import NfsStore
from imgfarm.tasks.job_spec import job_spec
from imgfarm.tasks.nodes import add_node


def _jobs() -> tuple[int, int]:
    with session_scope() as s:
        node = add_node(s, "n1", disk="/tmp/n1.img")
        node2 = add_node(s, "n2", disk="/tmp/n2.img")
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
        cap = Job(kind="capture", node_id=node.id, image_name="new", state="booting")
        res = Job(kind="restore", node_id=node2.id, image_name="base", state="booting")
        s.add_all([cap, res])
        s.flush()
        return cap.id, res.id


def _spec(job_id: int):  # type: ignore[no-untyped-def]
    from imgfarm.models.images import get_image

    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job_spec(job, get_image(s, job.image_name) if job.kind == "restore" else None)


def test_capture_mounts_only_the_incoming_export(settings_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS", "imgsrv:/srv/images")
    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS_INCOMING", "imgsrv:/srv/images/.incoming")
    get_settings.cache_clear()
    cap, res = _jobs()
    spec = _spec(cap)
    assert spec.store == NfsStore(export="imgsrv:/srv/images/.incoming")
    assert spec.output_dir == f"job-{cap}"
    # the farm verifies and moves the image from the same directory, seen from its side
    assert incoming_dir(cap).name == spec.output_dir and incoming_dir(cap).parent.name == ".incoming"
    spec = _spec(res)
    assert spec.store == NfsStore(export="imgsrv:/srv/images") and spec.image.location == "base"


def test_without_an_incoming_export_a_capture_still_writes_under_incoming(
        settings_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfarm.config.settings import get_settings

    monkeypatch.setenv("IMGFARM_IMAGE_STORE_NFS", "imgsrv:/srv/images")
    get_settings.cache_clear()
    cap, _ = _jobs()
    spec = _spec(cap)
    assert spec.store == NfsStore(export="imgsrv:/srv/images") and spec.output_dir == f".incoming/job-{cap}"
