"""Boot time and size of the agent's boot image under QEMU TCG.

Prints, for the boot image (built, or taken from the build cache): its
sizes, and the time from starting QEMU to the agent's first call to the API
(a listener on the host's 127.0.0.1 that the guest reaches as 10.0.2.2),
with the guest's own uptime at each step /init reports. The machine has a
virtio NIC and a blank virtio disk, as a node has. For comparison, in
the same run: the same kernel with a busybox-only initramfs that powers off
at once (the floor any image pays for firmware and kernel start under TCG
on this machine, at its current load). The load average is printed too: the
machine's cores are shared, and TCG time grows with the load.

    .venv/bin/python bench/bootimage.py [--runs 2] [--smp 1] [--compress zstd|gzip ...]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgfarm.bootimage import cpio  # noqa: E402
from imgfarm.bootimage.build import build, find_kernel  # noqa: E402
from tests.vm.vmlib import FirstCallListener, Qemu, blank_disk, direct_boot_args  # noqa: E402

BASELINE_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "BASELINE up $(/bin/busybox cut -d' ' -f1 /proc/uptime) s"
/bin/busybox poweroff -f
"""


def baseline_initrd(out: Path) -> Path:
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed"
    entries = [cpio.directory("bin"), cpio.directory("proc"), cpio.directory("dev"),
               cpio.chardev("dev/console", 5, 1),
               cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, source=Path(busybox)),
               cpio.Entry("init", stat.S_IFREG | 0o755, data=BASELINE_INIT)]
    buf = io.BytesIO()
    cpio.write(buf, entries)
    out.write_bytes(buf.getvalue())
    return out


def boot_baseline(kernel: Path, initrd: Path, work: Path) -> tuple[float, float]:
    with Qemu(direct_boot_args(kernel, initrd, "", nic=""), work / "baseline.log") as vm:
        m = vm.console.wait_for(r"^BASELINE up ([\d.]+) s", timeout=300)
        return time.monotonic() - vm.started, float(m.group(1))


STEPS = (("kernel runs /init", r"imgfarm-init: imgfarm boot image .* up ([\d.]+) s"),
         ("NIC drivers loaded", r"imgfarm-init: NIC drivers loaded .* up ([\d.]+) s"),
         ("boot NIC up", r"imgfarm-init: boot NIC .* up ([\d.]+) s"),
         ("DHCP lease", r"imgfarm-init: DHCP lease .* up ([\d.]+) s"),
         ("all modules loaded (background)", r"imgfarm-init: modules loaded .* up ([\d.]+) s"))


def boot_image(image: object, work: Path, run: int, smp: int) -> tuple[float, dict[str, float]]:
    # A disk, as a node has one (virtio-blk: its driver is loaded like a node's).
    disk = blank_disk(work / "disk.img", 64)
    with FirstCallListener() as api:
        append = f"imgfarm.api=http://10.0.2.2:{api.port} imgfarm.job=1 imgfarm.token=bench imgfarm.after=poweroff"
        args = [*direct_boot_args(image.vmlinuz, image.initrd, append), "-smp", str(smp),  # type: ignore[attr-defined]
                "-drive", f"file={disk},if=virtio,format=raw"]
        with Qemu(args, work / f"boot-{run}.log") as vm:
            first = api.wait_first(timeout=600, vm=vm)
            text = vm.console.text()
    steps = {}
    for name, rx in STEPS:
        m = re.search(rx, text, re.M)
        if m:
            steps[name] = float(m.group(1))
    return first.at - vm.started, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--smp", type=int, default=1, help="virtual CPUs of the machine (default 1)")
    parser.add_argument("--compress", nargs="+", default=["zstd"], choices=["zstd", "gzip"])
    args = parser.parse_args()
    kernel = find_kernel()
    with tempfile.TemporaryDirectory(prefix="imgfarm-bench-boot-") as tmp:
        work = Path(tmp)
        print(f"kernel {kernel.version}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for compression in args.compress:
            started = time.monotonic()
            image = build(compression=compression)
            took = time.monotonic() - started
            ini, kern = image.manifest["initrd"], image.manifest["kernel"]
            print(f"\nboot image {image.key[:12]} {compression} -{ini['level']}: "
                  f"initrd {ini['bytes'] / 2**20:.1f} MiB ({ini['cpio_bytes'] / 2**20:.1f} MiB unpacked), "
                  f"kernel {kern['bytes'] / 2**20:.1f} MiB; "
                  f"{'from the cache' if image.cached else 'built'} in {took:.1f} s")
            for run in range(1, args.runs + 1):
                wall, steps = boot_image(image, work, run, args.smp)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                print(f"  run {run}, {args.smp} vCPU: power-on -> agent's first API call {wall:.1f} s wall "
                      f"(budget 45 s); guest uptime at: {shown}; load {os.getloadavg()[0]:.1f}")
        initrd = baseline_initrd(work / "baseline.img")
        wall, up = boot_baseline(kernel.vmlinuz, initrd, work)
        print(f"\ncomparison, busybox-only initramfs: power-on -> its /init {wall:.1f} s wall "
              f"(guest uptime {up:.1f} s); load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
