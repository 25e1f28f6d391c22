"""Benchmark: the farm's jobs on a QEMU node (TCG), against the same tools bare on the host.

Starts a farm configured as a plain PXE site (tests/vm/site.py: pxe + ipmi
drivers, ipmi_sim BMCs starting QEMU, nfs-ganesha store), makes node vma
(MBR: ext4 + FAT32, both full of files, mostly incompressible) and a blank
node vmb, captures vma and restores the image to vmb, and prints:

- the boot image's size (vmlinuz, initrd.img);
- power-on (the BMC's chassis script starting QEMU) to the agent's first report
  (the job's `running` event), for both jobs;
- capture and restore throughput in the VM (the bytes partclone reads or writes,
  i.e. the partitions' used blocks, over the agent's own tool time), set against
  `partclone.<fs> -c | zstd -3` and `zstd -dc | partclone.restore` run bare on
  this host over the same partitions (loop devices) in the same run.

    sudo .venv/bin/python bench/vm.py [--random-mib 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgfarm.bootimage.build import build  # noqa: E402
from tests.vm import vmlib  # noqa: E402
from tests.vm.site import VmSite, vm_site  # noqa: E402


def _when(text: str) -> float:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _power_on_at(chassis_log: Path, after: float) -> float:
    """The first time the BMC started QEMU (power on or reset) after `after`."""
    for line in chassis_log.read_text().splitlines():
        stamp, _, request = line.partition(" ")
        if float(stamp) >= after and request in ("set power 1", "set reset 1"):
            return float(stamp)
    raise RuntimeError(f"no power-on in {chassis_log}")


def _first_report(job: dict[str, Any]) -> float:
    return next(_when(e["at"]) for e in job["events"] if e["kind"] == "state" and e["state"] == "running")


def _timed_on_loop(disk: Path, part: vmlib.Part, command: str) -> float:
    """Seconds `command` (a shell line; {dev} is the partition's loop device) takes."""
    dev = subprocess.run(["losetup", "-f", "--show", "--offset", str(part.start), "--sizelimit",
                          str(part.size), str(disk)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        t0 = time.monotonic()
        subprocess.run(command.format(dev=dev), shell=True, check=True)
        return time.monotonic() - t0
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _host_partclone(src: Path, parts: list[vmlib.Part], manifest: dict[str, Any],
                    work: Path) -> dict[str, float]:
    """Bare partclone | zstd on this host over the same partitions: capture, then restore."""
    target = vmlib.blank_disk(work / "host-target.img", src.stat().st_size >> 20)
    cap = res = 0.0
    for part, entry in zip(parts, manifest["partitions"], strict=True):
        out = work / f"host-{part.number}.ptcl.zst"
        cap += _timed_on_loop(src, part, f"partclone.{entry['tool']} -c -s {{dev}} -o - 2>/dev/null "
                              f"| zstd -q -T0 -3 -c > {out}")
        res += _timed_on_loop(target, part, f"zstd -q -dc {out} | partclone.restore -s - -O {{dev}} 2>/dev/null")
    return {"capture_s": cap, "restore_s": res}


def _run_job(site: VmSite, kind: str, node: str) -> tuple[dict[str, Any], float]:
    """One job on `node`, to its end; the job and the seconds from power-on to its first
    report. The node is killed afterwards (it idles at local boot): its core is given back."""
    t0 = time.time()
    [job_id] = site.farm.cli_json(kind, node, "--image", "bench")["job_ids"]
    [job] = site.wait_final([job_id], 1200)
    site.nodes[node].kill()
    if job["state"] != "succeeded":
        raise RuntimeError(f"{kind} failed: {job.get('error')}\n{site.diagnostics()}")
    return job, _first_report(job) - _power_on_at(site.nodes[node].dir / "chassis.log", t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-mib", type=int, default=24, help="incompressible MiB in vma's ext4")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = vmlib.missing_tools()
    if why:
        print(f"bench/vm.py needs: {why}", file=sys.stderr)
        return 2
    image = build()
    sizes = {"vmlinuz": image.vmlinuz.stat().st_size, "initrd.img": image.initrd.stat().st_size}
    work = Path(tempfile.mkdtemp(prefix="imgfarm-bench-vm-"))
    try:
        with vm_site(work / "site", image, user="bench") as site:
            a = site.add_node("vma", 0x51, table="dos", size_mib=160, random_kib=args.random_mib << 10)
            site.add_node("vmb", 0x52, table=None, size_mib=160)
            try:
                cap, cap_boot = _run_job(site, "capture", "vma")
                res, res_boot = _run_job(site, "restore", "vmb")
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            boot = {"capture": cap_boot, "restore": res_boot}
            img = next(i for i in site.farm.cli_json("image", "list") if i["name"] == "bench")
            manifest = json.loads((site.store / img["location"] / "manifest.json").read_text())
            used = sum(p["used_bytes"] for p in manifest["partitions"])
            stream = sum(p["stream_bytes"] for p in manifest["partitions"])
            vm_s = {"capture_s": float(cap["result"]["duration"]),
                    "restore_s": float(res["result"]["duration"])}
            host = _host_partclone(a.disk, vmlib.partitions(a.disk), manifest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = used / 2**20
    out = {
        "boot_image": {"vmlinuz_bytes": sizes["vmlinuz"], "initrd_bytes": sizes["initrd.img"]},
        "power_on_to_first_report_s": {k: round(v, 1) for k, v in boot.items()},
        "used_mib": round(mib, 1), "stream_mib": round(stream / 2**20, 1),
        "vm": {k: round(v, 2) for k, v in vm_s.items()},
        "host": {k: round(v, 2) for k, v in host.items()},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"boot image: vmlinuz {sizes['vmlinuz'] / 2**20:.1f} MiB, "
          f"initrd.img {sizes['initrd.img'] / 2**20:.1f} MiB")
    print(f"power-on -> agent's first report: capture {boot['capture']:.1f} s, "
          f"restore {boot['restore']:.1f} s (TCG)")
    print(f"data: {mib:.1f} MiB in use on 2 partitions, {stream / 2**20:.1f} MiB compressed")
    print(f"{'':24}{'VM (agent, TCG, NFS)':>24}{'host partclone|zstd':>24}")
    for kind in ("capture", "restore"):
        v, h = vm_s[f"{kind}_s"], host[f"{kind}_s"]
        print(f"{kind:24}{f'{mib / v:.1f} MiB/s ({v:.1f} s)':>24}{f'{mib / h:.1f} MiB/s ({h:.1f} s)':>24}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
