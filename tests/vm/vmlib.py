"""QEMU nodes for the test suite: every part between the farm and the disk is the real one.

A node is a `qemu-system-x86_64 -accel tcg` machine whose NIC boots QEMU's
iPXE ROM (Debian's ipxe-qemu) from the pxe driver's TFTP root through QEMU's
user-mode network, so the firmware reads exactly the files the driver wrote;
under SeaBIOS, or under OVMF (UEFI, Debian's ovmf) for a `firmware="uefi"` node,
whose NVRAM is a copy of OVMF's variable store in the node's directory.
Its power is an `ipmi_sim` BMC whose chassis-control script starts, stops and
resets that QEMU process (the idea of OpenStack's VirtualBMC), so the farm's
real ipmi driver powers it. Its image store is an nfs-ganesha export on
127.0.0.1 (QEMU maps the guest's 10.0.2.2 to the host's loopback), and its
disk is a raw file with a real partition table, attached as virtio-blk or
NVMe.

Everything here is started by a context manager and always stopped in its
`finally`: QEMU, ipmi_sim, ganesha, the boot-file HTTP server, loop devices.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfarm.bootimage.loaders import LOADER_FILES, install_loaders
from tests.ipmisim import SimBmc
from tests.support import kill_session, loop_device_at, wait_for

HOST_FROM_GUEST = "10.0.2.2"  # QEMU user networking: the host's 127.0.0.1
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")  # virtio-net-pci's default ROM (BIOS + UEFI)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # UEFI firmware (ovmf), read-only flash
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")  # its NVRAM template; each node writes a copy
GRUB_EFI = Path("/usr/lib/grub/x86_64-efi")  # GRUB's UEFI modules (grub-efi-amd64-bin)
GRUB_NET_BOOTFILE = "grub/x86_64-efi/core.efi"  # what grub-mknetdir --subdir=/grub makes
BMC_PASSWORD = "vm-bmc-Pw1"

# The tools a VM test needs, each with the Debian package that brings it.
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86", "ganesha.nfsd": "nfs-ganesha",
    "ipmi_sim": "openipmi", "ipmitool": "ipmitool", "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs",
    "mkfs.fat": "dosfstools", "mcopy": "mtools", "losetup": "mount",
}
# the loaders `imgfarm bootimage install` puts under the TFTP root, from their packages
FILES = {IPXE_ROM: "ipxe-qemu", **{f.source: f.package for f in LOADER_FILES if f.source},
         Path("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"): "nfs-ganesha-vfs"}


# What a UEFI node needs besides: only the tests that boot one are skipped without them.
UEFI_TOOLS = {"grub-mknetdir": "grub-common", "grub-mkimage": "grub-common"}
UEFI_FILES = {OVMF_CODE: "ovmf", OVMF_VARS: "ovmf", GRUB_EFI / "efinet.mod": "grub-efi-amd64-bin"}


def _absent(tools: dict[str, str], files: dict[Path, str]) -> list[str]:
    why = [f"{exe} ({pkg})" for exe, pkg in tools.items() if not shutil.which(exe)]
    return why + [f"{path} ({pkg})" for path, pkg in files.items() if not path.exists()]


def missing_tools() -> str:
    """Why the VM tests cannot run here ('' when they can)."""
    why = _absent(TOOLS, FILES)
    if os.geteuid() != 0:
        why.append("root (ganesha, loop devices)")
    return ", ".join(why)


def missing_uefi_tools() -> str:
    """Why a UEFI node (OVMF, GRUB's network image) cannot boot here ('' when it can)."""
    return ", ".join(_absent(UEFI_TOOLS, UEFI_FILES))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_pidfile(pidfile: Path, timeout: float = 10) -> None:
    """Stop the process named in `pidfile` (TERM, then KILL); no error if it is gone."""
    try:
        pid = int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if pid <= 0:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------- NFS

GANESHA_CONF = """NFS_CORE_PARAM {{
    NFS_Port = {port};
    Bind_addr = 127.0.0.1;
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}}
NFSv4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "{root}/recovery";
}}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1;
    Path = "{export}";
    Pseudo = {pseudo};
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


class Ganesha:
    """nfs-ganesha in the foreground, exporting one directory on 127.0.0.1:`port` (NFSv4 only)."""

    def __init__(self, root: Path, export: Path, pseudo: str = "/images") -> None:
        self.root = root
        self.export = export
        self.pseudo = pseudo
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "recovery").mkdir(parents=True, exist_ok=True)
        self.conf = root / "ganesha.conf"
        self.conf.write_text(GANESHA_CONF.format(port=self.port, root=root, export=export,
                                                 pseudo=pseudo))

    @property
    def spec(self) -> str:
        """The export as the guest names it."""
        return f"{HOST_FROM_GUEST}:{self.pseudo}"

    def start(self) -> None:
        log = open(self.root / "ganesha.out", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            ["nice", "ganesha.nfsd", "-F", "-f", str(self.conf), "-L", str(self.root / "ganesha.log"),
             "-p", str(self.root / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and listening(self.port),
                 30, interval=0.1, what=f"nfs-ganesha on 127.0.0.1:{self.port} ({self.log()[-800:]})")

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_session(self.proc, 30)
        self.proc = None

    def log(self) -> str:
        path = self.root / "ganesha.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def ganesha(root: Path, export: Path) -> Iterator[Ganesha]:
    server = Ganesha(root, export)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- HTTP

@contextlib.contextmanager
def http_server(directory: Path, root: Path) -> Iterator[int]:
    """A static HTTP server for the TFTP root (iPXE fetches kernel and initrd over HTTP)."""
    port = free_port()
    log = open(root / "http.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory),
         str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    log.close()
    try:
        wait_for(lambda: proc.poll() is None and listening(port), 20, what="the boot HTTP server")
        yield port
    finally:
        kill_session(proc)


# --------------------------------------------------------------------------- machines

CHASSIS = r"""#!/bin/sh
# ipmi_sim's chassis_control program for one QEMU machine (VirtualBMC's idea):
# power on starts QEMU, off kills it (a power cut), reset is off then on; the
# boot device is remembered in a file. Each line of chassis.log: time, request.
D="{dir}"
echo "$(date +%s.%N) $*" >> "$D/chassis.log"
running() {{ [ -s "$D/qemu.pid" ] && kill -0 "$(cat "$D/qemu.pid")" 2>/dev/null; }}
stop() {{
    if running; then
        pid=$(cat "$D/qemu.pid"); kill -9 "$pid"
        i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    fi
    rm -f "$D/qemu.pid"
}}
start() {{ running || "$D/start.sh" >> "$D/chassis.log" 2>&1; }}
op=$1; shift
case "$op" in
get) for k in "$@"; do
       case "$k" in
       power) if running; then v=1; else v=0; fi ;;
       boot) v=$(cat "$D/boot" 2>/dev/null); [ -n "$v" ] || v=none ;;
       *) v=0 ;;
       esac
       printf '%s:%s\n' "$k" "$v"; done ;;
set) while [ $# -gt 1 ]; do
       case "$1" in
       power) if [ "$2" = 1 ]; then start; else stop; fi ;;
       reset) stop; start ;;
       boot) echo "$2" > "$D/boot" ;;
       esac
       shift 2; done ;;
esac
"""

@dataclass
class VmNode:
    """One QEMU machine: its disk, NIC, console log, and the ipmi_sim BMC that powers it."""

    name: str
    dir: Path
    disk: Path
    mac: str
    tftp_root: Path
    bootfile: str  # what QEMU's DHCP tells the ROM to fetch: boot.ipxe, pxelinux.0, GRUB's core.efi
    disk_bus: str = "virtio"  # virtio | nvme
    memory_mib: int = 1024
    firmware: str = "bios"  # bios (SeaBIOS) | uefi (OVMF)
    bmc: SimBmc = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.firmware not in ("bios", "uefi"):
            raise ValueError(f"VmNode {self.name}: firmware {self.firmware!r} is not bios or uefi")
        self.bmc = SimBmc(self.dir, self.dir / "chassis.sh", BMC_PASSWORD, name=f"{self.name}-bmc")

    @property
    def bmc_port(self) -> int:
        return self.bmc.port

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def password_file(self) -> Path:
        return self.bmc.password_file

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    @property
    def nvram(self) -> Path:
        """The UEFI node's own copy of OVMF's variable store (its NVRAM, kept across power cycles)."""
        return self.dir / "OVMF_VARS.fd"

    def qemu_argv(self) -> list[str]:
        drive = f"file={self.disk},if=none,format=raw,id=d0,cache=unsafe"
        dev = ("nvme,drive=d0,serial=imgfarm-" + self.name if self.disk_bus == "nvme"
               else "virtio-blk-pci,drive=d0")
        nic = f"virtio-net-pci,netdev=n0,mac={self.mac}"
        if self.firmware == "uefi":
            # OVMF ignores -boot order= (SeaBIOS's); it boots by the devices' bootindex:
            # network first, then the disk, as a site sets a node it images.
            firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,file={self.nvram}"]
            nic, dev = nic + ",bootindex=0", dev + ",bootindex=1"
        else:
            firmware = ["-boot", "order=n"]
        return [
            "nice", "-n", "10", "qemu-system-x86_64", "-name", self.name, "-accel", "tcg",
            "-m", str(self.memory_mib), "-smp", "1", "-nographic", "-monitor", "none",
            "-chardev", f"file,id=con0,path={self.console},append=on", "-serial", "chardev:con0",
            *firmware,
            "-netdev", f"user,id=n0,tftp={self.tftp_root},bootfile={self.bootfile}",
            "-device", nic, "-drive", drive, "-device", dev,
        ]

    def write_scripts(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        start = self.dir / "start.sh"
        # -nographic (SeaBIOS and iPXE print on the serial console too) cannot be
        # combined with -daemonize: a session of its own, and $! is QEMU's pid
        # (setsid and nice exec it). Nothing waits, so a BMC request returns at once.
        start.write_text(
            "#!/bin/sh\n"
            "setsid " + " ".join(_sh(a) for a in self.qemu_argv())
            + " </dev/null >>" + _sh(str(self.dir / "qemu.out")) + " 2>&1 &\n"
            "echo $! > " + _sh(str(self.pidfile)) + "\n")
        self.bmc.chassis.write_text(CHASSIS.format(dir=self.dir))
        if self.firmware == "uefi" and not self.nvram.exists():
            shutil.copy(OVMF_VARS, self.nvram)
        for p in (start, self.bmc.chassis):
            p.chmod(0o755)
        self.bmc.write()

    # ---------------------------------------------------------------- the BMC
    def start_bmc(self) -> None:
        self.write_scripts()
        self.bmc.start()

    def stop_bmc(self) -> None:
        self.bmc.stop()

    # ---------------------------------------------------------------- the machine
    def power_on(self) -> None:
        """Start QEMU directly (for harness tests that need no BMC)."""
        self.write_scripts()
        subprocess.run([str(self.dir / "start.sh")], check=True, capture_output=True, timeout=60)

    def running(self) -> bool:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def kill(self) -> None:
        kill_pidfile(self.pidfile)

    def add_args(self, bmc: bool = True) -> list[str]:
        """`imgfarm node add` arguments for a pxe + ipmi node."""
        args = ["--mac", self.mac, "--boot", "pxe"]
        if bmc:
            args += ["--power", "ipmi", "--set", "bmc_address=127.0.0.1",
                     "--set", f"bmc_port={self.bmc_port}", "--set", "bmc_username=admin",
                     "--set", f"bmc_password_file={self.password_file}"]
        return args


def _sh(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@contextlib.contextmanager
def machines(*nodes: VmNode) -> Iterator[tuple[VmNode, ...]]:
    """Start each node's BMC; afterwards kill every QEMU and BMC, even on failure."""
    try:
        for node in nodes:
            node.start_bmc()
        yield nodes
    finally:
        for node in nodes:
            node.stop_bmc()
            node.kill()


def mac_for(index: int) -> str:
    return f"52:54:00:1f:00:{index:02x}"


def write_boot_scripts(tftp_root: Path) -> None:
    """The site's DHCP-level loaders under the TFTP root, as `imgfarm bootimage install`
    puts them there: iPXE's chain script, pxelinux."""
    tftp_root.mkdir(parents=True, exist_ok=True)
    missing = [f"{p.name} ({p.package})" for p in install_loaders(tftp_root) if p.path is None]
    assert not missing, f"boot loaders missing on this host: {missing}"


def write_grub_netdir(tftp_root: Path) -> str:
    """GRUB for UEFI network boot under the TFTP root, made as GRUB's manual says
    (`grub-mknetdir --subdir=/grub`): its prefix is the TFTP server's /grub, where it
    looks for grub.cfg-01-<mac> (the pxe driver's file) before grub.cfg, and loads its
    modules from. Returns the boot file for DHCP."""
    subprocess.run(["grub-mknetdir", f"--net-directory={tftp_root}", "--subdir=/grub",
                    "-d", str(GRUB_EFI), "--fonts=", "--locales=", "--themes="],
                   check=True, capture_output=True, timeout=120)
    if not (tftp_root / GRUB_NET_BOOTFILE).is_file():
        raise FileNotFoundError(f"grub-mknetdir made no {tftp_root / GRUB_NET_BOOTFILE}")
    return GRUB_NET_BOOTFILE


# --------------------------------------------------------------------------- disks

@dataclass(frozen=True)
class Part:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str


def partitions(disk: Path) -> list[Part]:
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    parts = []
    for i, p in enumerate(table["partitions"], start=1):
        parts.append(Part(i, int(p["start"]) * sector, int(p["size"]) * sector, str(p.get("type", ""))))
    return parts


def partition_bytes(disk: Path, part: Part) -> bytes:
    with open(disk, "rb") as fh:
        fh.seek(part.start)
        return fh.read(part.size)


def partition_sha256(disk: Path, part: Part) -> str:
    h = hashlib.sha256()
    with open(disk, "rb") as fh:
        fh.seek(part.start)
        left = part.size
        while left:
            chunk = fh.read(min(left, 4 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def blank_disk(path: Path, size_mib: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size_mib << 20)
    return path


ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def efi_disk(path: Path, marker: str, size_mib: int = 16) -> Path:
    """A GPT disk whose EFI system partition holds /EFI/BOOT/BOOTX64.EFI, the path firmware
    boots from a disk it has no entry for: a GRUB image that prints `marker` on the console
    and powers off. It stands in for an installed system, so a test sees a local boot end."""
    blank_disk(path, size_mib)
    subprocess.run(["sfdisk", "-q", str(path)], input=f"label: gpt\nstart=2048, type={ESP_TYPE}\n",
                   text=True, check=True, capture_output=True)
    esp = partitions(path)[0]
    work = path.parent / f"{path.stem}-esp"
    work.mkdir(parents=True, exist_ok=True)
    if not re.fullmatch(r"[A-Za-z0-9 ._-]+", marker):
        raise ValueError(f"efi_disk marker {marker!r}: GRUB's echo would interpret it")
    (work / "local.cfg").write_text(f"echo {marker}\nhalt\n")
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(GRUB_EFI), "-p", "/EFI/BOOT",
                    "-c", str(work / "local.cfg"), "-o", str(work / "BOOTX64.EFI"), "echo", "halt"],
                   check=True, capture_output=True)
    subprocess.run(["mkfs.fat", "-n", "ESP", "--offset", str(esp.start // 512), str(path),
                    str(esp.size // 1024)], check=True, capture_output=True)
    img, env = f"{path}@@{esp.start}", {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"], check=True, capture_output=True,
                   env=env)
    subprocess.run(["mcopy", "-i", img, str(work / "BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI"],
                   check=True, capture_output=True, env=env)
    shutil.rmtree(work)
    return path


def _content(dir: Path, label: str, random_kib: int) -> Path:
    """A directory of files: text, a nested tree, and incompressible bytes."""
    (dir / "etc").mkdir(parents=True, exist_ok=True)
    (dir / "etc" / "hostname").write_text(f"{label}\n")
    (dir / "README.TXT").write_text(f"imgfarm VM test disk {label}\n" * 400)
    for i in range(20):
        sub = dir / "data" / f"d{i:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:02d}.txt").write_text(f"{label} file {i}\n" * (50 * (i + 1)))
    (dir / "random.bin").write_bytes(os.urandom(random_kib << 10))
    return dir


def make_disk(path: Path, label: str, *, table: str = "dos", size_mib: int = 160,
              ext4_mib: int = 96, fat_mib: int = 48, random_kib: int = 4096) -> list[Part]:
    """A disk file with a real partition table: ext4 (loop device) then FAT32 (mtools), both full of files."""
    blank_disk(path, size_mib)
    fat_type = "c" if table == "dos" else "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
    ext_type = "83" if table == "dos" else "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    script = (f"label: {table}\n"
              f"start=2048, size={ext4_mib * 2048}, type={ext_type}\n"
              f"size={fat_mib * 2048}, type={fat_type}\n")
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                   capture_output=True)
    parts = partitions(path)
    work = path.parent / f"{path.stem}-content"
    ext_src = _content(work / "ext4", f"{label}-ext4", random_kib)
    with loop_device_at(path, parts[0].start, parts[0].size) as loop:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label[:16], "-E",
                        "lazy_itable_init=0,lazy_journal_init=0", "-d", str(ext_src), loop],
                       check=True, capture_output=True)
    fat = parts[1]
    sector_off = fat.start // 512
    subprocess.run(["mkfs.fat", "-F", "32", "-s", "1", "-n", "IMGFARM", "--offset", str(sector_off),
                    str(path), str(fat.size // 1024)], check=True, capture_output=True)
    fat_src = _content(work / "fat", f"{label}-fat", random_kib // 4)
    img = f"{path}@@{fat.start}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for item in sorted(fat_src.iterdir()):
        subprocess.run(["mcopy", "-s", "-i", img, str(item), "::/"], check=True, capture_output=True,
                       env=env)
    shutil.rmtree(work)
    return parts


# --------------------------------------------------------------------------- a throwaway initramfs

def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries, deterministic (mtime 0)."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data, rdev in [*entries, ("TRAILER!!!", 0, b"", 0)]:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
            len(namez), 0))
        out.write(hdr.encode() + namez)
        out.write(b"\0" * (-(110 + len(namez)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def busybox_initrd(out: Path, init: str, modules: list[str] | None = None) -> Path:
    """An initramfs of static busybox, `init` as /init, /dev/console, and the given kernel modules."""
    entries: list[tuple[str, int, bytes, int]] = []
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", 0))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes(), 0))
    entries.append(("init", stat.S_IFREG | 0o755, init.encode(), 0))
    for i, mod in enumerate(modules or []):
        entries.append((f"lib/modules/{i:02d}-{Path(mod).name}", stat.S_IFREG | 0o644,
                        Path(mod).read_bytes(), 0))
    out.write_bytes(gzip.compress(_cpio_newc(entries), 6, mtime=0))
    return out


def module_paths(kernel_version: str, *names: str) -> list[str]:
    """The .ko files of `names` with their dependencies, in load order, each once."""
    seen: list[str] = []
    for name in names:
        out = subprocess.run(["modprobe", "-S", kernel_version, "--show-depends", name],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("insmod "):
                path = line.split()[1]
                if path not in seen:
                    seen.append(path)
    return seen


def host_kernel() -> tuple[str, Path]:
    """The newest Debian kernel under /boot: (version, vmlinuz)."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise FileNotFoundError("no /boot/vmlinuz-*: install linux-image-amd64")
    k = kernels[-1]
    return k.name.removeprefix("vmlinuz-"), k


# --- direct boots of the farm's boot image (-kernel/-initrd, no firmware) ------------
#
# The boot image's own tests boot it straight from -kernel/-initrd under `nice`:
# its serial console goes to a log file, tests wait on a line there with a
# deadline (`Console.wait_for`) and fail with the console's tail, and `Qemu`
# kills the machine on exit whatever happened.

QEMU = "qemu-system-x86_64"


class Console:
    """A machine's serial console, as the log file QEMU writes it to."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.path = path
        self.proc = proc

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, what: str = "") -> re.Match[str]:
        """The first match of `pattern` (a regex, multiline) in the console's finished lines;
        fail at the deadline, or as soon as the machine is gone, with the console's tail."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            # Only whole lines: a `.*$` must not match a line the serial port is still writing.
            text = self.text()
            m = rx.search(text, 0, text.rfind("\n") + 1)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                m = rx.search(self.text())
                if m:
                    return m
                raise AssertionError(f"the machine exited ({self.proc.returncode}) before "
                                     f"{what or pattern!r} appeared; console:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what or pattern!r} on the console after {timeout:.0f} s; "
                                     f"console:\n{self.tail()}")
            time.sleep(0.2)


def direct_boot_args(kernel: Path, initrd: Path, append: str, *, memory: int = 1024,
                     nic: str = "virtio-net-pci", mac: str = "52:54:00:12:34:56",
                     netdev: str = "user,id=n0") -> list[str]:
    """QEMU arguments that boot `kernel` + `initrd` directly (no firmware PXE), one NIC on
    user-mode networking (the guest's 10.0.2.2 is the host's 127.0.0.1)."""
    args = ["-kernel", str(kernel), "-initrd", str(initrd), "-append", f"console=ttyS0 {append}",
            "-m", str(memory)]
    if nic:
        args += ["-netdev", netdev, "-device", f"{nic},netdev=n0,mac={mac}"]
    else:
        args += ["-nic", "none"]
    return args


@dataclass
class Qemu:
    """One QEMU machine: started on enter, killed (and reaped) on exit."""

    args: Sequence[str]
    log: Path
    started: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    console: Console = field(init=False)

    def __post_init__(self) -> None:
        self.console = Console(self.log)

    def command(self) -> list[str]:
        return ["nice", "-n", "10", QEMU, "-accel", "tcg", "-nographic", "-no-reboot",
                "-serial", f"file:{self.log}", "-monitor", "none", *self.args]

    def __enter__(self) -> Qemu:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.console.proc = self.proc
        return self

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the machine did not power off within {timeout:.0f} s; "
                                 f"console:\n{self.console.tail()}") from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Call:
    at: float  # time.monotonic() when it arrived
    method: str
    path: str
    headers: dict[str, str]


class FirstCallListener:
    """A tiny HTTP server on 127.0.0.1 that records every request and answers 404.

    Booting the image with `imgfarm.api=http://10.0.2.2:PORT` makes the agent's
    first call land here: the time from power-on to that call is the boot
    image's boot time as the farm sees it.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                listener.calls.append(Call(time.monotonic(), self.command, self.path, dict(self.headers)))
                body = b'{"error": "no such job here", "hint": "a test listener"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FirstCallListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_first(self, timeout: float, vm: Qemu | None = None) -> Call:
        deadline = time.monotonic() + timeout
        while not self.calls:
            if vm is not None and vm.proc is not None and vm.proc.poll() is not None:
                raise AssertionError(f"the machine exited before calling the API; console:\n{vm.console.tail()}")
            if time.monotonic() > deadline:
                tail = vm.console.tail() if vm is not None else ""
                raise AssertionError(f"no call to the API within {timeout:.0f} s; console:\n{tail}")
            time.sleep(0.1)
        return self.calls[0]

