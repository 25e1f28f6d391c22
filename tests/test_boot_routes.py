"""GET /tftp/PATH: the boot files over HTTP, and nothing outside the TFTP root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from imgfarm.config.settings import get_settings

    root = tmp_path / "tftp"
    (root / "imgfarm").mkdir(parents=True)
    (root / "imgfarm" / "initrd.img").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 64)
    (root / "ipxe").mkdir()
    (root / "ipxe" / "up").symlink_to("../imgfarm/initrd.img")  # a link inside the root is fine
    (tmp_path / "secret").write_text("not a boot file")
    (root / "escape").symlink_to(tmp_path / "secret")
    monkeypatch.setenv("IMGFARM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMGFARM_PXE__TFTP_ROOT", str(root))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    from imgfarm.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def test_serves_a_boot_file_whole_and_in_ranges(client: TestClient, root: Path) -> None:
    data = (root / "imgfarm" / "initrd.img").read_bytes()
    got = client.get("/tftp/imgfarm/initrd.img")
    assert got.status_code == 200 and got.content == data
    assert client.get("/tftp/ipxe/up").content == data
    head = client.head("/tftp/imgfarm/initrd.img")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    part = client.get("/tftp/imgfarm/initrd.img", headers={"Range": "bytes=4-7"})
    assert part.status_code == 206 and part.content == data[4:8]


@pytest.mark.parametrize("path", ["/tftp/escape", "/tftp/../secret", "/tftp/imgfarm/../../secret",
                                  "/tftp/%2e%2e/secret", "/tftp/imgfarm", "/tftp/", "/tftp/nothing"])
def test_serves_nothing_else(client: TestClient, path: str) -> None:
    got = client.get(path)
    assert got.status_code == 404, (path, got.status_code, got.content[:100])
    assert b"not a boot file" not in got.content


def test_a_write_is_refused(client: TestClient, root: Path) -> None:
    assert client.put("/tftp/imgfarm/initrd.img", content=b"x").status_code == 405
    assert client.delete("/tftp/imgfarm/initrd.img").status_code == 405
    assert (root / "imgfarm" / "initrd.img").read_bytes().startswith(b"\x28\xb5\x2f\xfd")
