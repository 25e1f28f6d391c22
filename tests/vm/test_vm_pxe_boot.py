"""The pxe and ipmi drivers drive a QEMU machine: its firmware reads the files the driver wrote.

The boot image here is a small busybox initramfs made by the test (it prints
the kernel command line, mounts the ganesha export over NFSv4.1 and writes a
file there, then powers off), small enough for Debian's plain pxelinux.0 and
for GRUB to fetch over QEMU's TFTP: pxelinux.0 (SeaBIOS) reading
pxelinux.cfg/01-<mac>, and GRUB under UEFI (OVMF, GRUB made by grub-mknetdir)
reading grub/grub.cfg-01-<mac>; power through ipmi_sim's chassis script, the
NFS export as the guest sees it, and the local-boot file after the job (the
UEFI node boots it too, and it must reach the loader on the node's disk). The
farm's own image boots by iPXE and lpxelinux.0 over HTTP in test_vm_jobs.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import AgentOrders, BootTarget, NodeInfo, PowerState
from imgfarm.drivers.ipmi import IpmiPower
from imgfarm.drivers.pxe import PxeBoot
from tests.support import wait_for
from tests.vm import vmlib

# one VM at a time: the tests of tests/vm share one pytest-xdist worker (a mark added by
# conftest.py at collection comes too late for xdist's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("vm")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "HARNESS cmdline: $(cat /proc/cmdline)"
for m in /lib/modules/*.ko; do insmod $m 2>/dev/null; done
ip link set eth0 up
printf '#!/bin/sh\n[ "$1" = bound ] && ip addr add $ip/$mask dev $interface\nexit 0\n' > /tmp/dhcp
chmod +x /tmp/dhcp
udhcpc -i eth0 -s /tmp/dhcp -q -n -t 5 >/dev/null 2>&1
for w in $(cat /proc/cmdline); do case "$w" in
  imgfarm.job=*) JOB=${w#imgfarm.job=} ;;
  harness.nfs=*) NFS=${w#harness.nfs=} ;;
  harness.port=*) PORT=${w#harness.port=} ;;
esac; done
if mount -t nfs4 -o vers=4.1,port=$PORT,proto=tcp $NFS /mnt; then
  echo "job $JOB disks: $(ls /sys/block | tr '\n' ' ')" > /mnt/booted-$JOB && sync
  umount /mnt && echo "HARNESS nfs ok"
fi
poweroff -f
"""


@pytest.fixture(scope="module")
def harness_initrd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    version, kernel = vmlib.host_kernel()
    mods = vmlib.module_paths(version, "virtio_pci", "virtio_net", "virtio_blk", "nvme", "nfsv4")
    out = tmp_path_factory.mktemp("harness")
    return kernel, vmlib.busybox_initrd(out / "initrd.img", INIT, mods)


@pytest.fixture
def site(tftp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         harness_initrd: tuple[Path, Path]) -> Iterator[int]:
    kernel, initrd = harness_initrd
    (tftp_root / "imgfarm").mkdir()
    shutil.copy(kernel, tftp_root / "imgfarm" / "vmlinuz")
    shutil.copy(initrd, tftp_root / "imgfarm" / "initrd.img")
    with vmlib.http_server(tftp_root, tmp_path) as port:
        for name, value in {
            "IMGFARM_DATA_DIR": str(tmp_path / "data"),
            "IMGFARM_PXE__TFTP_ROOT": str(tftp_root),
            "IMGFARM_PXE__IPXE_BASE_URL": f"http://{vmlib.HOST_FROM_GUEST}:{port}/",
            "IMGFARM_PXE__EXTRA_CMDLINE": "console=ttyS0",
            "IMGFARM_IPMI__TIMEOUT": "30", "IMGFARM_IPMI__RETRIES": "1",
            "IMGFARM_IPMI__BACKOFF": "0.2", "IMGFARM_IPMI__CIPHER_SUITE": "3",
        }.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield port
    get_settings.cache_clear()


LOCAL_DISK = "HARNESS the loader on the local disk ran"


@pytest.mark.parametrize("loader", ["pxelinux", "grub"])  # iPXE: the jobs' tests (test_vm_jobs.py)
def test_firmware_boots_what_the_pxe_driver_wrote(loader: str, site: int, tftp_root: Path,
                                                   tmp_path: Path, nfs_export: vmlib.Ganesha) -> None:
    uefi = loader == "grub"
    if uefi and (why := vmlib.missing_uefi_tools()):
        pytest.skip(f"the UEFI node needs: {why}")
    if uefi:  # GRUB under UEFI; the disk has an EFI system partition, booted after the network
        vm = vmlib.VmNode("h1", tmp_path / "h1", vmlib.efi_disk(tmp_path / "h1.img", LOCAL_DISK),
                          vmlib.mac_for(0x31), tftp_root, vmlib.write_grub_netdir(tftp_root),
                          firmware="uefi")
    else:
        vm = vmlib.VmNode("h1", tmp_path / "h1", vmlib.blank_disk(tmp_path / "h1.img", 16),
                          vmlib.mac_for(0x31), tftp_root, "pxelinux.0")
    node = NodeInfo(name="h1", mac=vm.mac, boot_driver="pxe", power_driver="ipmi", driver_info={
        "loader": loader, "bmc_address": "127.0.0.1", "bmc_username": "admin",
        "bmc_password_file": str(vm.password_file), "bmc_uefi": str(uefi).lower(),
        "kcmdline": f"harness.nfs={nfs_export.spec} harness.port={nfs_export.port}"})
    boot, power = PxeBoot(), IpmiPower()
    with vmlib.machines(vm):
        node = dataclasses.replace(node, driver_info={**node.driver_info,
                                                      "bmc_port": str(vm.bmc_port)})
        boot.boot_agent(node, AgentOrders(api_url="http://10.0.2.2:1", job_id=4242, token="t" * 32))
        assert boot.get_boot_target(node) is BootTarget.AGENT
        power.reboot(node)  # ipmi_sim -> chassis script -> QEMU starts
        assert power.get_power_state(node) is PowerState.ON
        wait_for(lambda: "HARNESS nfs ok" in vm.console_text(), 150, interval=0.5,
                 what=f"the {loader} boot to mount the export (console: {vm.console_text()[-1500:]})")
        console = vm.console_text()
        assert "imgfarm.job=4242" in console and "console=ttyS0" in console
        written = (nfs_export.export / "booted-4242").read_text()
        assert written.startswith("job 4242 disks: ") and "vda" in written
        wait_for(lambda: power.get_power_state(node) is PowerState.OFF, 60, interval=0.5,
                 what="the guest to power off (QEMU exits, the BMC reads off)")
        boot.boot_local(node)
        assert boot.get_boot_target(node) is BootTarget.LOCAL
        if uefi:  # the local-boot file must hand the node to its disk, not to a firmware menu
            power.set_power_state(node, PowerState.ON)
            wait_for(lambda: LOCAL_DISK in vm.console_text(), 90, interval=0.5,
                     what=f"GRUB's local-boot entry to start the disk's loader "
                     f"(console: {vm.console_text()[-1500:]})")
            wait_for(lambda: power.get_power_state(node) is PowerState.OFF, 60, interval=0.5,
                     what="the disk's loader to power the node off")
    if uefi:
        assert "Booting `imgfarm agent'" in console and "grub/x86_64-efi/core.efi" in console
        assert LOCAL_DISK not in console  # the network came first, with a bootable disk attached
        after = vm.console_text()[len(console):]
        assert "Booting `local disk'" in after
        assert "booting the local disk's /EFI/BOOT/BOOTX64.EFI" in after
    else:
        assert "pxelinux.0... ok" in console and "PXELINUX" in console
    assert not vm.running()
