"""One image-name rule: a name the submit accepts is one the convert job can write.

`restore NODE --image win7+sp1 --convert` was accepted at submit (the registry allowed
'+') and then failed in the convert job (the converter did not). The real convert task
function runs here on the committed legacy sample, without a broker (memory://).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import find_image, register_image, store_root
from imgfarm.models.jobs import get_job
from imgfarm.protocol import ImageFormat, sha256_file
from imgfarm.tasks.convert import run_convert
from imgfarm.tasks.nodes import add_node
from imgfarm.tasks.submit import submit_restore

SAMPLE = Path(__file__).parent / "data" / "legacy" / "sample-ext2.000"


def test_restore_convert_of_a_name_with_plus(settings_env: str, tmp_path: Path) -> None:
    name = "win7+sp1"
    src = store_root() / name
    src.mkdir(parents=True)
    shutil.copyfile(SAMPLE, src / f"{name}.000")
    with session_scope() as s:
        add_node(s, "n1", disk=str(tmp_path / "n1.img"))
        register_image(s, name, ImageFormat.PARTIMAGE, name, size_bytes=SAMPLE.stat().st_size,
                       checksums={f"{name}.000": sha256_file(src / f"{name}.000").sha256})

    sub = submit_restore("n1", name, convert=True, enqueue=False)
    assert sub.convert_job_id is not None and len(sub.job_ids) == 1
    assert run_convert(sub.convert_job_id) == states.SUCCEEDED

    with session_scope() as s:
        conv = get_job(s, sub.convert_job_id)
        assert (conv.state, conv.error) == (states.SUCCEEDED, "")
        img = find_image(s, f"{name}-ng")
        assert img is not None and img.format == ImageFormat.NG
        assert img.manifest["name"] == f"{name}-ng" and img.origin["source_image"] == name
        restore = get_job(s, sub.job_ids[0])
        # released to run the converted image (its task sent to the in-memory broker)
        assert restore.state == states.QUEUED and restore.celery_task_id
        assert restore.image_name == f"{name}-ng"
    assert (store_root() / f"{name}-ng" / "manifest.json").is_file()
