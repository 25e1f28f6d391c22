"""The agent mounts the NFS image store (`mount -t nfs4`, v4.1 by default) and always unmounts.

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
from imgfarm.agent.job import StoreMount
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
    monkeypatch.setattr("imgfarm.agent.job.RUN_DIR", tmp_path / "run")
    return log


def test_nfs_store_is_mounted_and_unmounted(fake_mount: Path, tmp_path: Path) -> None:
    with StoreMount(NfsStore(export="imagesrv:/srv/images"), 7) as root:
        assert root == tmp_path / "run" / "store-7" and root.is_dir()
    calls = fake_mount.read_text().splitlines()
    assert calls == [
        f"mount -t nfs4 -o vers=4.1,proto=tcp,soft,timeo=100,retrans=3 imagesrv:/srv/images "
        f"{tmp_path}/run/store-7",
        f"umount {tmp_path}/run/store-7",
    ]


def test_a_restore_mounts_read_only_whatever_the_site_says(fake_mount: Path, tmp_path: Path) -> None:
    with StoreMount(NfsStore(export="imagesrv:/srv/images", options="rw,port=20490"), 8, read_only=True):
        pass
    mount = fake_mount.read_text().splitlines()[0]
    opts = mount.split(" -o ")[1].split(" ")[0].split(",")
    assert "ro" in opts and "rw" not in opts and "port=20490" in opts


def test_failed_mount_is_a_clear_error(fake_mount: Path) -> None:
    with pytest.raises(ToolError, match="cannot mount image store badserver:/x") as err:
        with StoreMount(NfsStore(export="badserver:/x", options="vers=3,nolock"), 8):
            pass
    assert "Connection refused" in err.value.stderr_tail
    assert ("mount -t nfs -o proto=tcp,soft,timeo=100,retrans=3,vers=3,nolock badserver:/x"
            in fake_mount.read_text())


def test_site_options_apply_over_the_agents() -> None:
    assert StoreMount.options("port=20490") == "vers=4.1,proto=tcp,soft,timeo=100,retrans=3,port=20490"
    assert StoreMount.options("hard,timeo=600") == "vers=4.1,proto=tcp,retrans=3,hard,timeo=600"
    assert StoreMount.options("") == StoreMount.NFS_OPTIONS


def test_a_silent_server_is_named_with_its_port() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mount = StoreMount(NfsStore(export="127.0.0.1:/images", options=f"port={port}"), 9)
    assert mount.unreachable().startswith(f"NFS server 127.0.0.1 port {port}: ")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        alive = StoreMount(NfsStore(export="127.0.0.1:/images",
                                    options=f"port={srv.getsockname()[1]}"), 9)
        assert alive.unreachable() == ""
    assert StoreMount(LocalStore(path="/"), 9).unreachable() == ""


def test_local_store_must_exist(tmp_path: Path) -> None:
    with StoreMount(LocalStore(path=str(tmp_path)), 1) as root:
        assert root == tmp_path
    with pytest.raises(ToolError, match="is not a directory"):
        with StoreMount(LocalStore(path=str(tmp_path / "nope")), 1):
            pass


def test_a_dead_server_is_detached_at_once_when_the_job_failed(fake_mount: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: the server is gone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError, match="Input/output error"):
        with StoreMount(NfsStore(export="127.0.0.1:/images", options=f"port={port}"), 10):
            raise OSError(5, "Input/output error")
    assert fake_mount.read_text().splitlines()[-1] == f"umount -l {tmp_path}/run/store-10"
