"""The boot image builder without a VM: same inputs give the same bytes, and /init's
choice of the boot NIC (run by the host's busybox sh over a made-up /sys)."""

from __future__ import annotations

import glob
import gzip
import io
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from imgfarm.bootimage import cpio
from imgfarm.bootimage.build import FILES, build, image_path

BUSYBOX = shutil.which("busybox")


def _archive(entries: list[cpio.Entry]) -> bytes:
    buf = io.BytesIO()
    cpio.write(buf, entries)
    return buf.getvalue()


def test_cpio_is_sorted_and_the_same_whatever_the_order(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    entries = [cpio.Entry("usr/bin/x", stat.S_IFREG | 0o755, source=tmp_path / "f"),
               cpio.directory("usr"), cpio.directory("usr/bin"), cpio.chardev("dev/console", 5, 1),
               cpio.directory("dev"), cpio.symlink("bin", "usr/bin")]
    one, two = _archive(entries), _archive(list(reversed(entries)))
    assert one == two
    if shutil.which("cpio") is None:
        pytest.skip("no cpio to read the archive back")
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=one, capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    assert names == ["bin", "dev", "dev/console", "usr", "usr/bin", "usr/bin/x"]
    console = next(line for line in lines if line.endswith("dev/console"))
    assert console.startswith("crw-------") and re.search(r" 5, +1 ", console), console
    assert all(" root " in line and "1970" in line for line in lines)  # uid/gid 0, mtime 0


def test_host_paths_map_into_merged_usr() -> None:
    assert image_path("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert image_path("/lib/x86_64-linux-gnu/libc.so.6") == "usr/lib/x86_64-linux-gnu/libc.so.6"
    assert image_path("/usr/sbin/partimage") == "usr/sbin/partimage"
    assert image_path("/sbin") == "usr/sbin"


@pytest.mark.skipif(not glob.glob("/boot/vmlinuz-*") or BUSYBOX is None,
                    reason="no kernel under /boot or no busybox: nothing to build the image from")
def test_two_builds_of_the_same_inputs_are_the_same_bytes(tmp_path: Path) -> None:
    one = build(tmp_path / "out1", cache_dir=tmp_path / "c1", compression="gzip", level=1, use_cache=False)
    two = build(tmp_path / "out2", cache_dir=tmp_path / "c2", compression="gzip", level=1, use_cache=False)
    assert one.key == two.key and not one.cached
    assert (tmp_path / "out1" / "initrd.img").read_bytes() == (tmp_path / "out2" / "initrd.img").read_bytes()
    again = build(tmp_path / "out3", cache_dir=tmp_path / "c1", compression="gzip", level=1)
    assert again.cached and again.key == one.key
    # what went in, as the manifest says
    inputs = {i["path"]: i for i in one.manifest["inputs"]}
    assert inputs["/dev/console"]["rdev"] == [5, 1]
    assert "/usr/bin/python3.11" in inputs and "/usr/sbin/partimage" in inputs
    assert "/usr/lib/imgfarm/imgfarm/agent/main.py" in inputs
    assert inputs["/usr/sbin/partclone.ext4"] == {"path": "/usr/sbin/partclone.ext4", "kind": "symlink",
                                                  "mode": "0o777", "target": "partclone.extfs"}
    assert not any(p.startswith("/usr/lib/python3.11/unittest/") for p in inputs)
    assert one.manifest["initrd"]["bytes"] <= one.manifest["budget_bytes"]
    archive = gzip.decompress((tmp_path / "out1" / "initrd.img").read_bytes())
    ver = one.manifest["kernel"]["version"]
    assert f"usr/lib/modules/{ver}/modules.dep".encode() in archive
    assert b"kernel/drivers/net/virtio_net.ko" in archive


# --- /init's choice of the boot NIC -----------------------------------------------

def _sys(tmp_path: Path, nics: dict[str, tuple[str, int | None, int]]) -> Path:
    """A /sys/class/net: name -> (MAC, carrier or None when down, ARP type)."""
    root = tmp_path / "sys"
    for name, (mac, carrier, kind) in nics.items():
        d = root / "class" / "net" / name
        d.mkdir(parents=True)
        (d / "address").write_text(mac + "\n")
        (d / "type").write_text(f"{kind}\n")
        if carrier is not None:
            (d / "carrier").write_text(f"{carrier}\n")
    return root


def _choose(sys_root: Path, bootif: str = "", nic: str = "") -> tuple[int, str, str]:
    assert BUSYBOX is not None
    script = f'. {FILES / "init-functions.sh"}; choose_nic "$1" "$2"'
    out = subprocess.run([BUSYBOX, "sh", "-c", script, "sh", bootif, nic], capture_output=True, text=True,
                         env={"SYS": str(sys_root), "PATH": "/usr/bin:/bin"})
    return out.returncode, out.stdout.strip(), out.stderr.strip()


NICS = {"lo": ("00:00:00:00:00:00", 1, 772), "eth0": ("52:54:00:00:00:01", 0, 1),
        "eth1": ("52:54:00:00:00:02", 1, 1), "eth2": ("52:54:00:00:00:03", 1, 1),
        "ib0": ("80:00:00:00:00:00:00:00", 1, 32)}


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
@pytest.mark.parametrize(("bootif", "nic", "expect"), [
    ("01-52-54-00-00-00-03", "", "eth2"),  # BOOTIF= names the NIC by MAC
    ("01-52-54-00-00-00-03", "eth1", "eth2"),  # ... ahead of imgfarm.nic=
    ("01-52-54-00-00-00-01", "", "eth0"),  # ... even one without a link yet
    ("01-52-54-00-00-00-0A".lower(), "", ""),
    ("", "eth0", "eth0"),  # imgfarm.nic= by name
    ("", "52:54:00:00:00:02", "eth1"),  # ... or by MAC
    ("", "", "eth1"),  # else the first with a link (eth0 has none, lo and ib0 are not Ethernet)
])
def test_boot_nic_choice(tmp_path: Path, bootif: str, nic: str, expect: str) -> None:
    rc, got, err = _choose(_sys(tmp_path, NICS), bootif, nic)
    if expect:
        assert (rc, got) == (0, expect), err
    else:
        assert rc == 1 and got == "" and "no network interface has the BOOTIF address 52:54:00:00:00:0a" in err


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
@pytest.mark.parametrize(("nics", "bootif", "nic", "why"), [
    ({"eth0": ("52:54:00:00:00:01", 0, 1)}, "", "", "no network interface has a link (found: eth0 )"),
    ({"eth0": ("52:54:00:00:00:01", None, 1)}, "", "", "no network interface has a link"),
    ({}, "", "", "no Ethernet interface found (no driver for this NIC in the boot image?)"),
    ({"eth0": ("52:54:00:00:00:01", 1, 1)}, "", "eth7", "imgfarm.nic=eth7 names no network interface"),
    ({"eth0": ("52:54:00:00:00:01", 1, 1)}, "52-54-00", "", "is not a MAC in the 01-aa-bb-cc-dd-ee-ff form"),
])
def test_no_boot_nic_says_why_in_one_line(tmp_path: Path, nics: dict[str, tuple[str, int | None, int]],
                                          bootif: str, nic: str, why: str) -> None:
    root = _sys(tmp_path, nics)
    (root / "class" / "net").mkdir(parents=True, exist_ok=True)
    rc, got, err = _choose(root, bootif, nic)
    assert rc == 1 and got == ""
    assert why in err and len(err.splitlines()) == 1, err


# --- /init's driver passes: the NICs' modaliases first --------------------------------

DEVICES = {  # bus/device -> modalias, as QEMU's pc machine with a virtio NIC and disk has them
    "pci/0000:00:01.1": "pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80",  # PIIX IDE
    "pci/0000:00:02.0": "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",  # virtio-net
    "pci/0000:00:03.0": "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",  # virtio-blk
    "pci/0000:00:04.0": "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00",  # e1000
    "pci/0000:00:05.0": "pci:v00008086d000010D3sv00008086sd00000000bc0Csc03i30",  # USB host
    "virtio/virtio0": "virtio:d00000001v00001AF4",  # its NIC
    "virtio/virtio1": "virtio:d00000002v00001AF4",  # its disk
    "scsi/0:0:0:0": "scsi:t-0x05",
}


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_nic_pass_takes_only_the_nics_modaliases(tmp_path: Path) -> None:
    assert BUSYBOX is not None
    for where, alias in DEVICES.items():
        d = tmp_path / "sys" / "bus" / where.split("/")[0] / "devices" / where.split("/")[1]
        d.mkdir(parents=True)
        (d / "modalias").write_text(alias + "\n")

    def aliases(*ere: str) -> list[str]:
        script = f'. {FILES / "init-functions.sh"}; device_aliases "$@"'
        out = subprocess.run([BUSYBOX, "sh", "-c", script, "sh", *ere], capture_output=True, text=True,
                             env={"SYS": str(tmp_path / "sys"), "PATH": "/usr/bin:/bin"})
        return out.stdout.split()

    everything = aliases()
    assert everything == sorted(set(DEVICES.values()))
    nic_ere = re.search(r"^NIC_ALIASES='(.*)'$", (FILES / "init-functions.sh").read_text(), re.M)
    assert nic_ere
    assert aliases(nic_ere.group(1)) == sorted([  # network controllers, virtio's PCI transport, virtio NICs
        DEVICES["pci/0000:00:02.0"], DEVICES["pci/0000:00:03.0"], DEVICES["pci/0000:00:04.0"],
        DEVICES["virtio/virtio0"]])


def test_loaders_are_the_packages_files_and_the_chain_script_fetches_the_drivers_file(
        tmp_path: Path) -> None:
    from imgfarm.bootimage.loaders import BOOT_IPXE, LOADER_FILES, LoaderFile, install_loaders
    from imgfarm.drivers.pxe import LOADERS

    absent = LoaderFile("grubnetx64.efi", tmp_path / "not-installed.efi", "grub-efi-amd64-signed", "x")
    root = tmp_path / "tftp"
    root.mkdir()
    placed = {p.name: p for p in install_loaders(root, (*LOADER_FILES, absent))}
    assert placed["grubnetx64.efi"].path is None and not (root / "grubnetx64.efi").exists()
    for f in LOADER_FILES:
        if f.source is not None and f.source.is_file():
            assert (root / f.name).read_bytes() == f.source.read_bytes(), f.name
            assert stat.S_IMODE((root / f.name).stat().st_mode) == 0o644
        elif f.source is not None:
            assert placed[f.name].path is None, f"{f.name}: {f.source} is not here ({f.package})"
    # iPXE expands ${mac:hexhyp} to aa-bb-cc-dd-ee-ff: the name the pxe driver writes
    chain = (root / "boot.ipxe").read_text()
    assert chain == BOOT_IPXE and chain.startswith("#!ipxe\n")
    fetched = chain.split("chain ", 1)[1].strip().replace("${mac:hexhyp}", "52-54-00-12-34-56")
    assert str(LOADERS["ipxe"].boot_file(Path("."), "52:54:00:12:34:56")) == fetched
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_a_directory_made_for_the_boot_files_is_readable_by_tftpd_whatever_the_umask(
        tmp_path: Path) -> None:
    import os

    from imgfarm.bootimage.loaders import place

    old = os.umask(0o077)
    try:
        place(tmp_path / "tftp" / "imgfarm" / "vmlinuz", data=b"kernel")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tftp" / "imgfarm").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "tftp" / "imgfarm" / "vmlinuz").stat().st_mode) == 0o644
