"""The agent mounts the NFS image store with `mount -t nfs` and always unmounts.

This kernel has no NFS client, so the test puts stand-in `mount`/`umount`
executables first on PATH and checks the exact command contract (arguments,
and that a failing mount becomes a clear error with mount's own words).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from imgfarm.agent.imaging import ToolError
from imgfarm.agent.main import StoreMount
from imgfarm.protocol import LocalStore, NfsStore


@pytest.fixture
def fake_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls.log"
    for name in ("mount", "umount"):
        script = tmp_path / "bin" / name
        script.parent.mkdir(exist_ok=True)
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*" >> {log}\n'
            'case "$*" in *badserver*) echo "mount.nfs: Connection refused" >&2; exit 32;; esac\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr("imgfarm.agent.main.RUN_DIR", tmp_path / "run")
    return log


def test_nfs_store_is_mounted_and_unmounted(fake_mount: Path, tmp_path: Path) -> None:
    with StoreMount(NfsStore(export="imagesrv:/srv/images"), 7) as root:
        assert root == tmp_path / "run" / "store-7" and root.is_dir()
    calls = fake_mount.read_text().splitlines()
    assert calls == [
        f"mount -t nfs -o vers=3,hard,nolock imagesrv:/srv/images {tmp_path}/run/store-7",
        f"umount {tmp_path}/run/store-7",
    ]


def test_failed_mount_is_a_clear_error(fake_mount: Path) -> None:
    with pytest.raises(ToolError, match="cannot mount image store badserver:/x") as err:
        with StoreMount(NfsStore(export="badserver:/x", options="vers=4"), 8):
            pass
    assert "Connection refused" in err.value.stderr_tail
    assert "-o vers=4 badserver:/x" in fake_mount.read_text()


def test_local_store_must_exist(tmp_path: Path) -> None:
    with StoreMount(LocalStore(path=str(tmp_path)), 1) as root:
        assert root == tmp_path
    with pytest.raises(ToolError, match="is not a directory"):
        with StoreMount(LocalStore(path=str(tmp_path / "nope")), 1):
            pass
