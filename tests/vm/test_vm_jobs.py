"""The farm's jobs on QEMU machines: PXE boot of the real boot image, ipmi power, NFS store.

One farm (module fixture) serves every test here; the boot image is built
once per session by `imgfarm bootimage build` (its cache makes later runs
free). The nodes' disks are raw files with a real MBR or GPT table holding
ext4 and FAT32 partitions full of files; after a restore every partition
must equal the captured node's byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imgfarm.drivers.base import BootTarget
from tests.support import wait_for
from tests.vm import vmlib
from tests.vm.site import VmSite, vm_site

# one VM at a time: the tests of tests/vm share one pytest-xdist worker (a mark added by
# conftest.py at collection comes too late for xdist's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("vm")

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, boot_image: Path) -> Iterator[VmSite]:
    with vm_site(tmp_path_factory.mktemp("vmsite"), boot_image) as s:
        yield s


def _states(job: dict[str, Any]) -> list[str]:
    return [e["state"] for e in job["events"] if e["kind"] == "state"]


def _submit(site: VmSite, *args: str) -> list[int]:
    ids: list[int] = site.farm.cli_json(*args)["job_ids"]
    return ids


@pytest.fixture(scope="module")
def captured(site: VmSite) -> dict[str, Any]:
    """Node vma (MBR: ext4 + FAT32, virtio) captured over NFS into the image `vmbase`.

    Its ext4 holds 24 MiB of random bytes: a restore of it reads for seconds, so the NFS test
    below stops the store while most of the image is still to be read (with 4 MiB, the guest
    had read the whole image before the stop, and that restore succeeded)."""
    site.add_node("vma", 0x11, table="dos", bus="virtio", random_kib=24 << 10)
    t0 = time.monotonic()
    [job_id] = _submit(site, "capture", "vma", "--image", "vmbase")
    [job] = site.wait_final([job_id], 420)
    site.nodes["vma"].kill()  # powered off by now (IMGFARM_POWER_CYCLE_AFTER=false); sure of it
    return {"job": job, "seconds": time.monotonic() - t0}


def test_capture_then_restore_to_virtio_and_nvme_at_once(site: VmSite, captured: dict[str, Any]) -> None:
    job = captured["job"]
    assert job["state"] == "succeeded", f"{job.get('error')}\n{site.diagnostics()}"
    assert _states(job) == ["queued", "booting", "running", "finalizing", "succeeded"]
    image = next(i for i in site.farm.cli_json("image", "list") if i["name"] == "vmbase")
    manifest = (site.store / image["location"] / "manifest.json").read_text()
    assert '"ext4"' in manifest and '"vfat"' in manifest and '"type": "dos"' in manifest
    assert site.boot_target("vma") is BootTarget.LOCAL
    assert "/dev/vda" in site.nodes["vma"].console_text()

    # B starts with a GPT disk of other files, C with a blank one on NVMe.
    site.add_node("vmb", 0x12, table="gpt", bus="virtio")
    site.add_node("vmc", 0x13, table=None, bus="nvme")
    ids = _submit(site, "restore", "vmb,vmc", "--image", "vmbase")
    jobs = site.wait_final(ids, 420)
    for node in ("vmb", "vmc"):
        site.nodes[node].kill()  # nothing writes to the disk files while they are compared
    for j in jobs:
        assert j["state"] == "succeeded", f"{j['node']}: {j.get('error')}\n{site.diagnostics()}"
        assert _states(j) == ["queued", "booting", "running", "finalizing", "succeeded"]
        progress = [e for e in j["events"] if e["kind"] == "progress"]
        assert progress and all(e["state"] == "running" for e in progress), j["events"]
        assert site.boot_target(j["node"]) is BootTarget.LOCAL

    src = site.nodes["vma"].disk
    want = vmlib.partitions(src)
    assert [p.type for p in want] == ["83", "c"]
    for node in ("vmb", "vmc"):
        disk = site.nodes[node].disk
        got = vmlib.partitions(disk)
        assert [(p.start, p.size, p.type) for p in got] == [(p.start, p.size, p.type) for p in want]
        for a, b in zip(want, got, strict=True):
            assert vmlib.partition_sha256(src, a) == vmlib.partition_sha256(disk, b), \
                f"{node} partition {b.number} differs from vma's"
    assert "/dev/vda" in site.nodes["vmb"].console_text()
    assert "/dev/nvme0n1" in site.nodes["vmc"].console_text()


def test_nfs_server_stopped_mid_restore_fails_naming_the_store(site: VmSite,
                                                              captured: dict[str, Any]) -> None:
    assert captured["job"]["state"] == "succeeded"
    vm = site.add_node("vmd", 0x14, table=None, bus="virtio", loader="pxelinux")
    [job_id] = _submit(site, "restore", "vmd", "--image", "vmbase")

    def tool_running() -> bool:  # the API, not the CLI: a CLI start costs more than the window
        job = httpx.get(f"http://127.0.0.1:{site.farm.port}/api/v1/jobs/{job_id}", timeout=5).json()
        return bool(job["state"] == "running" and (job.get("bytes_done") or 0) > 0)

    try:
        wait_for(tool_running, 300, interval=0.2, what="the restore to be reading the image")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{site.diagnostics()}") from None
    site.nfs.stop()
    try:
        [job] = site.wait_final([job_id], 300)
    finally:
        site.nfs.start()  # the other tests' store
        vm.kill()
    assert job["state"] == "failed", job
    assert f"image store {site.nfs.spec} stopped answering" in job["error"], job["error"]
    assert "booting" not in _states(job)[-1:]
    assert site.boot_target("vmd", "pxelinux") is BootTarget.LOCAL
    console = vm.console_text()
    assert "lpxelinux.0" in console and f"BOOTIF=01-{vm.mac.replace(':', '-')}" in console


def test_legacy_partimage_in_the_vm_and_converted_give_partimages_bytes(site: VmSite) -> None:
    """The committed partimage 0.6.9 sample: restored by partimage inside the VM, and
    converted to partimage-ng and restored by partclone; both must give the bytes that
    `partimage restore` gave on the host when the sample was made."""
    sample = json.loads((LEGACY / "sample-ext2.json").read_text())
    size = sample["partition_size_bytes"]
    site.farm.start_worker("cpu", concurrency=1, cpu=True)
    site.farm.cli("image", "import", str(LEGACY / "sample-ext2.000"), "--name", "legacy")
    site.farm.cli("convert", "legacy", "--name", "legacy-ng", "--wait")
    mib = max(16, -(-size // (1 << 20)))
    site.add_node("vmp", 0x15, table=None, size_mib=mib)
    site.add_node("vmq", 0x16, table=None, size_mib=mib, bus="nvme")
    ids = _submit(site, "restore", "vmp", "--image", "legacy")
    ids += _submit(site, "restore", "vmq", "--image", "legacy-ng")
    jobs = site.wait_final(ids, 420)
    for node in ("vmp", "vmq"):
        site.nodes[node].kill()
    for j in jobs:
        assert j["state"] == "succeeded", f"{j['node']}: {j.get('error')}\n{site.diagnostics()}"
        assert site.boot_target(j["node"]) is BootTarget.LOCAL
        with open(site.nodes[j["node"]].disk, "rb") as fh:
            got = hashlib.sha256(fh.read(size)).hexdigest()
        assert got == sample["restored_sha256"], f"{j['node']} ({j['format']}) differs from partimage's"
    assert {j["format"] for j in jobs} == {"partimage", "partimage-ng"}
