"""A farm whose nodes are QEMU machines: the real API, worker, pxe + ipmi drivers, NFS store.

`vm_site()` starts nfs-ganesha exporting the farm's image store, the farm
(SQLite job database, a private Redis database and key prefix, the API on
127.0.0.1 at a free port, one Celery worker) configured as a plain PXE site:
the pxe boot driver writing under a TFTP root that QEMU's TFTP serves, iPXE
fetching the boot image over HTTP from the API's /tftp/ route, the ipmi
power driver, and the agents mounting `10.0.2.2:/images` over NFSv4.1 with
`IMGFARM_IMAGE_STORE_NFS_OPTIONS=port=N`. A pxelinux node boots Debian's
lpxelinux.0, which reads the per-MAC file the driver wrote and fetches the
kernel and initrd by the node's `kernel`/`initrd` URLs. Everything it started is stopped
when the `with` ends, whatever happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfarm.drivers.base import BootTarget
from imgfarm.drivers.pxe import boot_file, read_target
from tests.farm import Farm, running_farm
from tests.support import wait_for
from tests.vm import vmlib

# Each user of vm_site gets its own Redis database: running_farm empties it at the
# start and the end, so two farms (parallel test workers, a demo) must not share one.
REDIS_DB = {"jobs": 12, "power": 13, "demo": 14, "bench": 15}


@dataclass
class VmSite:
    root: Path
    farm: Farm
    nfs: vmlib.Ganesha
    tftp: Path
    store: Path
    stack: contextlib.ExitStack
    boot_url: str  # the TFTP root over HTTP, as the guest reaches it
    nodes: dict[str, vmlib.VmNode] = field(default_factory=dict)

    def add_node(self, name: str, index: int, *, table: str | None = "dos", bus: str = "virtio",
                 loader: str = "ipxe", size_mib: int = 160, bmc: bool = True,
                 random_kib: int = 4096) -> vmlib.VmNode:
        """A QEMU node with its BMC running, known to the farm as a pxe + ipmi node."""
        disk = self.root / "disks" / f"{name}.img"
        disk.parent.mkdir(exist_ok=True)
        if table:
            vmlib.make_disk(disk, name, table=table, size_mib=size_mib, random_kib=random_kib)
        else:
            vmlib.blank_disk(disk, size_mib)
        settings = ["--set", f"loader={loader}"]
        bootfile = "boot.ipxe"
        if loader == "pxelinux":
            # lpxelinux.0 is pxelinux with HTTP: it reads pxelinux.cfg/01-<mac> over TFTP
            # like pxelinux.0, then fetches the node's kernel and initrd by URL, which
            # takes seconds where QEMU's TFTP takes minutes for a 20 MiB initrd.
            bootfile = "lpxelinux.0"
            settings += ["--set", f"kernel={self.boot_url}imgfarm/vmlinuz",
                         "--set", f"initrd={self.boot_url}imgfarm/initrd.img"]
        vm = vmlib.VmNode(name, self.root / "vms" / name, disk, vmlib.mac_for(index), self.tftp,
                          bootfile, disk_bus=bus)
        if bmc:
            self.stack.enter_context(vmlib.machines(vm))
        else:  # a BMC that does not answer: its port is chosen, nothing listens there
            vm.write_scripts()
        self.nodes[name] = vm
        self.farm.cli("node", "add", name, *vm.add_args(), *settings)
        return vm

    def job(self, job_id: int) -> dict[str, Any]:
        data: dict[str, Any] = self.farm.cli_json("job", str(job_id))
        return data

    def boot_target(self, name: str, loader: str = "ipxe") -> BootTarget:
        return read_target(boot_file(self.tftp, loader, self.nodes[name].mac))

    def wait_final(self, job_ids: list[int], timeout: float) -> list[dict[str, Any]]:
        """The jobs' views from the CLI once all have ended (polled in the job database:
        a CLI run per poll costs CPU the QEMU machines need)."""
        final = {"succeeded", "failed", "cancelled"}

        def done() -> bool:
            states = self.farm.job_states()
            return all(states.get(j) in final for j in job_ids)

        try:
            wait_for(done, timeout, interval=0.5, what=f"jobs {job_ids} to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        return [self.job(j) for j in job_ids]

    def diagnostics(self) -> str:
        """What a failed test shows: the end of each console and of the worker's log."""
        out = [f"--- worker log\n{self.farm.log('worker')[-3000:]}"]
        for name, vm in self.nodes.items():
            out.append(f"--- console of {name}\n{vm.console_text()[-2500:]}")
        return "\n".join(out)


@contextlib.contextmanager
def vm_site(root: Path, boot_image: Any = None, user: str = "jobs", **extra_env: str) -> Iterator[VmSite]:
    """`boot_image`: an imgfarm.bootimage.build.Image (its vmlinuz and initrd are put where
    the pxe driver's default kernel and initrd settings point), or None for tests that boot
    nothing."""
    root.mkdir(parents=True, exist_ok=True)
    store = root / "data" / "images"
    store.mkdir(parents=True)
    tftp = root / "tftp"
    vmlib.write_boot_scripts(tftp)
    with contextlib.ExitStack() as stack:
        nfs = stack.enter_context(vmlib.ganesha(root / "ganesha", store))
        env = {
            "IMGFARM_IMAGE_STORE": str(store),
            "IMGFARM_IMAGE_STORE_NFS": nfs.spec,
            # A short soft timeout: an NFS request the server leaves unanswered is sent 3 times,
            # 2 + 4 + 6 s apart (TCP backs off linearly), so a stopped server fails the job
            # 12 s after it went, while a live one must stall one request 12 s to fail it.
            "IMGFARM_IMAGE_STORE_NFS_OPTIONS": f"port={nfs.port},timeo=20,retrans=2",
            "IMGFARM_DEFAULT_BOOT_DRIVER": "pxe", "IMGFARM_DEFAULT_POWER_DRIVER": "ipmi",
            "IMGFARM_PXE__TFTP_ROOT": str(tftp),
            # Powered off when the agent ends. After a failed job the farm powers it on into
            # local boot (the NFS-stop test sees that); after a success it leaves it off, as
            # IMGFARM_POWER_CYCLE_AFTER=false says: the boot file is what the tests check, and
            # a firmware run into an empty disk costs CPU the other machines need.
            "IMGFARM_PXE__EXTRA_CMDLINE": "console=ttyS0 imgfarm.after=poweroff",
            "IMGFARM_POWER_CYCLE_AFTER": "false",
            "IMGFARM_IPMI__TIMEOUT": "30", "IMGFARM_IPMI__RETRIES": "1",
            "IMGFARM_IPMI__BACKOFF": "0.5", "IMGFARM_IPMI__CIPHER_SUITE": "3",
            "IMGFARM_BOOT_TIMEOUT": "300", "IMGFARM_HEARTBEAT_TIMEOUT": "120",
            "IMGFARM_JOB_TIMEOUT": "900", "IMGFARM_PROGRESS_INTERVAL": "1",
            **extra_env,
        }
        farm = stack.enter_context(running_farm(root, f"sqlite:///{root / 'data' / 'imgfarm.db'}",
                                                REDIS_DB[user], **env))
        if boot_image is not None:
            # as a site does it: the boot image (the fixture's build, from the build cache) and
            # the loaders where the pxe driver's files point
            installed = farm.cli_json("bootimage", "install")
            assert installed["key"] == boot_image.key and not installed["missing_packages"], installed
        farm.start_api()
        # The agents reach the API as the guest sees the host; the tests use loopback.
        guest_api = f"http://{vmlib.HOST_FROM_GUEST}:{farm.port}"
        farm.env["IMGFARM_API_URL"] = guest_api
        # iPXE (and lpxelinux) fetch the boot image over HTTP from the API's /tftp/ route.
        boot_url = f"{guest_api}/tftp/"
        farm.env["IMGFARM_PXE__IPXE_BASE_URL"] = boot_url
        farm.start_worker(concurrency=8)
        yield VmSite(root, farm, nfs, tftp, store, stack, boot_url)
