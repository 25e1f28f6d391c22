"""`make demo-vm`: the farm's main job on three QEMU machines that boot the farm's own image.

Builds (or reuses, by its cache) the boot image with `imgfarm bootimage
build`, starts a farm configured as a plain PXE site (pxe boot driver, ipmi
power driver against one ipmi_sim BMC per machine, the image store exported
by nfs-ganesha), makes three nodes (vma: MBR with ext4 + FAT32 on virtio;
vmb: a GPT disk of other files on virtio; vmc: a blank NVMe disk), captures
vma, restores the image to vmb and vmc at once, checks every partition of
both against vma's byte for byte, checks each node's boot file is back at
local boot, and prints the job table. Exit 0 only if all of that held.

Work files go under ./.imgfarm-demo-vm (removed at the start of a run).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imgfarm.bootimage.build import build  # noqa: E402
from imgfarm.drivers.base import BootTarget  # noqa: E402
from tests.vm import vmlib  # noqa: E402
from tests.vm.site import vm_site  # noqa: E402


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main() -> int:
    why = vmlib.missing_tools()
    if why:
        print(f"demo-vm needs: {why} (run `make setup` as root)", file=sys.stderr)
        return 2
    work = ROOT / ".imgfarm-demo-vm"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    say("boot image: imgfarm bootimage build (reused when its inputs did not change)")
    image = build()
    size = image.initrd.stat().st_size
    say(f"boot image {image.key[:12]} ready: initrd {size / 2**20:.1f} MiB "
        f"({time.monotonic() - t0:.0f} s)")
    failures: list[str] = []
    with vm_site(work, image, user="demo") as site:
        say("nodes: vma (MBR ext4+FAT32, virtio), vmb (GPT, virtio), vmc (blank, NVMe); "
            "each powered by its own ipmi_sim BMC")
        site.add_node("vma", 0x21, table="dos", bus="virtio")
        site.add_node("vmb", 0x22, table="gpt", bus="virtio")
        site.add_node("vmc", 0x23, table=None, bus="nvme")
        say("capture vma -> image demo-base (PXE boot, NFSv4.1 store)")
        [cap] = site.farm.cli_json("capture", "vma", "--image", "demo-base")["job_ids"]
        [job] = site.wait_final([cap], 900)
        site.nodes["vma"].kill()
        if job["state"] != "succeeded":
            failures.append(f"capture of vma: {job['state']}: {job.get('error')}")
        else:
            say("restore demo-base -> vmb, vmc at once")
            ids = site.farm.cli_json("restore", "vmb,vmc", "--image", "demo-base")["job_ids"]
            jobs = site.wait_final(ids, 900)
            for j in jobs:
                site.nodes[j["node"]].kill()
                if j["state"] != "succeeded":
                    failures.append(f"restore of {j['node']}: {j['state']}: {j.get('error')}")
            src = site.nodes["vma"].disk
            want = vmlib.partitions(src)
            for node in ("vmb", "vmc"):
                disk = site.nodes[node].disk
                got = vmlib.partitions(disk)
                if [(p.start, p.size) for p in got] != [(p.start, p.size) for p in want]:
                    failures.append(f"{node}: partition table differs from vma's")
                    continue
                for a, b in zip(want, got, strict=True):
                    same = vmlib.partition_sha256(src, a) == vmlib.partition_sha256(disk, b)
                    say(f"{node} partition {b.number} ({b.size >> 20} MiB): "
                        f"{'same bytes as vma' if same else 'DIFFERS from vma'}")
                    if not same:
                        failures.append(f"{node} partition {b.number} differs from vma's")
        for node in ("vma", "vmb", "vmc"):
            target = site.boot_target(node)
            if target is not BootTarget.LOCAL:
                failures.append(f"{node}: boot file says {target.value}, not local")
        print(site.farm.cli("jobs").stdout, flush=True)
        if failures:
            print(site.diagnostics()[-6000:], file=sys.stderr)
    took = time.monotonic() - t0
    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        return 1
    say(f"all held: 1 capture + 2 restores on QEMU nodes, partitions equal, boot files local "
        f"({took:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
