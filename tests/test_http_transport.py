"""The image store over HTTP: a broken transfer resumes, a damaged byte is caught and named.

Real farm (API, worker, Redis, SQLite), real agent and tools on sim nodes. Between
the agents and the API sits a small TCP relay that cuts the first full-file download
of a partition stream at 40 % of its bytes, like a link that drops.
"""

from __future__ import annotations

import filecmp
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.farm import Farm, free_port, running_farm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="sim disks need root (loop devices)"),
]


class CuttingRelay:
    """Forwards 127.0.0.1:port to the API; cuts one partition download at `fraction`."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.port = free_port()
        self.target = 0
        self.cuts: list[str] = []
        self.ranges: list[str] = []
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.cut_sizes: dict[str, int] = {}  # file name -> size, cut when first fetched whole
        self.cut_puts: dict[str, int] = {}  # file name -> piece offset whose first PUT is cut
        self.put_cuts: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # the API is not up yet
            client.close()
            return
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                break
            head += chunk
        upstream.sendall(head)
        request = head.split(b"\r\n", 1)[0].decode(errors="replace")
        ranged = b"\nrange:" in head.lower()
        limit = -1
        for name, size in self.cut_sizes.items():
            if "/store/" in request and request.split()[1].endswith("/" + name):
                if ranged:
                    self.ranges.append(request)
                elif name not in self.cuts:
                    self.cuts.append(name)
                    limit = int(size * self.fraction)

        up_limit = -1
        if request.startswith("PUT "):
            lower = head.lower()
            for name, offset in self.cut_puts.items():
                if request.split()[1].endswith("/" + name) and f"content-range: bytes {offset}-".encode() in lower:
                    key = f"{name}@{offset}"
                    if key not in self.put_cuts:
                        self.put_cuts.append(key)
                        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                        up_limit = int(length * self.fraction)

        def pump_up() -> None:
            body_seen = len(head) - (head.index(b"\r\n\r\n") + 4) if b"\r\n\r\n" in head else 0
            try:
                while up_limit < 0 or body_seen < up_limit:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    body_seen += len(chunk)
                    upstream.sendall(chunk)
                if up_limit >= 0:  # the link drops mid-upload
                    for s in (client, upstream):
                        s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent, body_at = 0, -1
        buf = b""
        try:
            while chunk := upstream.recv(65536):
                if limit >= 0:
                    buf += chunk
                    if body_at < 0 and b"\r\n\r\n" in buf:
                        body_at = buf.index(b"\r\n\r\n") + 4
                    if body_at >= 0 and len(buf) - body_at >= limit:
                        client.sendall(buf[:body_at + limit])
                        break
                    continue
                client.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@pytest.fixture
def relay_farm(tmp_path: Path) -> Iterator[tuple[Farm, CuttingRelay]]:
    relay = CuttingRelay(0.4)
    url = f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}"
    with running_farm(tmp_path, url, redis_db=3, IMGFARM_API_URL=f"http://127.0.0.1:{relay.port}") as farm:
        relay.target = farm.port
        farm.start_api()
        farm.start_worker()
        try:
            yield farm, relay
        finally:
            relay.server.close()


def _captured(farm: Farm) -> tuple[Path, Path]:
    src = farm.add_node("n1", fill=True, size_mib=32)
    farm.cli("capture", "n1", "--image", "base", "--wait")
    manifest = json.loads((farm.root / "data" / "images" / "base" / "manifest.json").read_text())
    part = farm.root / "data" / "images" / "base" / manifest["partitions"][0]["file"]
    return src, part


def test_cut_at_40_percent_resumes_from_the_byte_reached(relay_farm: tuple[Farm, CuttingRelay]) -> None:
    farm, relay = relay_farm
    src, part = _captured(farm)
    relay.cut_sizes[part.name] = part.stat().st_size
    disk = farm.add_node("n2")
    out = farm.cli("restore", "n2", "--image", "base", "--transport", "http", "--wait", check=False)
    assert out.returncode == 0, out.stdout + out.stderr + farm.log("worker")
    assert relay.cuts == [part.name]
    assert len(relay.ranges) == 1, relay.ranges  # one resumed request, not a new download
    assert filecmp.cmp(src, disk, shallow=False)
    job = farm.cli_json("jobs", "--node", "n2")[0]
    detail = farm.cli_json("job", str(job["id"]))
    notes = " | ".join(e["message"] for e in detail["events"])
    cut_at = int(part.stat().st_size * 0.4)
    assert f"transfer broke at byte {cut_at}" in notes and "resuming from there" in notes, notes
    assert detail["result"]["files"][part.name] == detail["result"]["files"][part.name]
    image = farm.cli_json("image", "list")[0]
    assert detail["result"]["files"][part.name] == image["checksums"][part.name]


def test_a_corrupted_byte_fails_the_job_naming_the_file(relay_farm: tuple[Farm, CuttingRelay]) -> None:
    farm, _relay = relay_farm
    _src, part = _captured(farm)
    data = bytearray(part.read_bytes())
    at = len(data) // 2
    data[at] ^= 0xFF
    part.write_bytes(bytes(data))
    farm.add_node("n2")
    out = farm.cli("restore", "n2", "--image", "base", "--transport", "http", "--wait", check=False)
    assert out.returncode == 1
    job = farm.cli_json("jobs", "--node", "n2")[0]
    assert job["state"] == "failed"
    error = farm.cli_json("job", str(job["id"]))["error"]
    assert part.name in error, error
    assert "bytes of its stream" in error or "sha256" in error, error


def test_capture_upload_cut_at_40_percent_resumes(relay_farm: tuple[Farm, CuttingRelay]) -> None:
    import subprocess

    farm, relay = relay_farm
    path = farm.root / "disks" / "n1.img"
    with open(path, "wb") as fh:
        fh.truncate(32 << 20)
    content = farm.root / "disks" / "n1-content"
    content.mkdir(parents=True)
    (content / "noise.bin").write_bytes(os.urandom(12 << 20))  # a stream of three pieces
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True, capture_output=True)
    farm.cli("node", "add", "n1", "--disk", str(path))
    relay.cut_puts["part0.ptcl.zst"] = 4 << 20  # the second piece
    out = farm.cli("capture", "n1", "--image", "up", "--transport", "http", "--wait", check=False)
    assert out.returncode == 0, out.stdout + out.stderr + farm.log("worker")
    assert relay.put_cuts == [f"part0.ptcl.zst@{4 << 20}"]
    job = farm.cli_json("jobs", "--node", "n1")[0]
    notes = " | ".join(e["message"] for e in farm.cli_json("job", str(job["id"]))["events"])
    assert f"upload broke at byte {4 << 20}" in notes, notes
    assert farm.cli("image", "verify", "up", check=False).returncode == 0
    disk = farm.add_node("n2")
    farm.cli("restore", "n2", "--image", "up", "--transport", "http", "--wait")
    assert filecmp.cmp(path, disk, shallow=False)


def test_store_needs_the_job_token(relay_farm: tuple[Farm, CuttingRelay]) -> None:
    farm, _relay = relay_farm
    api = f"http://127.0.0.1:{farm.port}"
    r = httpx.get(f"{api}/agent/v1/jobs/1/store/base/manifest.json", timeout=10)
    assert r.status_code == 401
    r = httpx.get(f"{api}/agent/v1/jobs/1/store/base/manifest.json",
                  headers={"Authorization": "Bearer nottherightone"}, timeout=10)
    assert r.status_code == 401
