"""Build the agent's boot image from the build host's own Debian packages.

What goes in is collected the way initramfs-tools collects it: each program
with the shared libraries `ldd` names and the dynamic loader; the kernel
modules `modprobe --show-depends` lists for the disk, NIC, USB and NFS
drivers, dependencies included, with a `modules.dep` made by `depmod`; the
image's Python with only the stdlib modules the agent imports (found by
modulefinder run by that Python); the agent itself, which imports nothing of
the farm but imgfarm.protocol; busybox for the shell, DHCP and mount; and
/init (files/init). Nothing is downloaded.

The initrd is a deterministic cpio (cpio.py) compressed by zstd or gzip:
the same inputs give the same bytes. A build is keyed by the sha256 of its
inputs (every file's path, mode and content hash, the kernel, the builder's
version and the compression), and a built image is kept under the cache
directory by that key, so a second build of the same inputs is a copy.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgfarm.bootimage import cpio
from imgfarm.bootimage.loaders import place
from imgfarm.errors import ImgfarmError, InvalidInput

# Bump when the image's layout or contents change for the same host files.
BUILDER_VERSION = "3"
INITRD_BUDGET = 100 << 20
FILES = Path(__file__).with_name("files")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "imgfarm"  # the installed imgfarm package
HOST_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")  # never a user's PATH (pyenv shims, venvs)
PYTHON = "/usr/bin/python3.11"
COMPRESSIONS = ("zstd", "gzip")

# The programs of the image (besides busybox): the agent's tools and what a
# person at the debug shell needs to look at a disk.
PROGRAMS = (
    "partimage", "zstd", "sfdisk", "blkid", "lsblk", "blockdev", "losetup", "wipefs", "dd",
    "mke2fs", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4", "e2fsck", "fsck.ext4", "tune2fs", "resize2fs",
    "dumpe2fs", "mkfs.fat", "mkfs.vfat", "fsck.fat", "fsck.vfat", "fatlabel",
    "ntfs-3g", "ntfsclone", "ntfsresize", "mkntfs", "ntfsfix", "ntfslabel",
    "kmod", "modprobe", "insmod", "rmmod", "lsmod", "modinfo",
    "nice",  # coreutils: /init loads the drivers a boot does not wait for at the lowest priority
)
PROGRAM_GLOBS = ("partclone.*",)
# Opened by glibc with dlopen, so ldd never names them (pthread_cancel needs libgcc_s).
DLOPENED = ("libgcc_s.so.1",)

DISK_MODULES = ("virtio_blk", "virtio_scsi", "ahci", "ata_piix", "sd_mod", "nvme", "usb-storage", "uas",
                "mmc_block", "sdhci_pci", "sdhci_acpi", "xhci_pci", "ehci_pci", "ohci_pci", "uhci_hcd",
                "loop")
NIC_MODULES = ("virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "bnxt_en",
               "mlx4_en", "mlx5_core", "tg3", "r8169")
OTHER_MODULES = ("nfsv4", "nfsv3", "fuse", "usbhid", "hid_generic")
MODULES = DISK_MODULES + NIC_MODULES + OTHER_MODULES
MODULE_INDEXES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")

# The image's directories that are symlinks into /usr (Debian's merged /usr).
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


class BuildError(ImgfarmError):
    """The build host lacks something the image needs (a package, a kernel)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


@dataclasses.dataclass
class Image:
    """A built (or cached) image: its files and what went into it."""

    key: str
    vmlinuz: Path
    initrd: Path
    manifest: dict[str, Any]
    cached: bool


# --- what goes in ---------------------------------------------------------------

def find_kernel(version: str = "", boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Kernel:
    """The kernel to ship: `version`, or the newest /boot/vmlinuz-* that has its modules."""
    if version:
        candidates = [version]
    else:
        found = [p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*")]
        candidates = sorted(found, key=_version_key, reverse=True)
    for ver in candidates:
        if (boot / f"vmlinuz-{ver}").is_file() and (modules / ver / "modules.order").is_file():
            return Kernel(ver, boot / f"vmlinuz-{ver}", modules / ver)
    what = f"kernel {version}" if version else "a kernel"
    raise BuildError(f"{what} with its modules is not installed ({boot}/vmlinuz-*, {modules}/VERSION)",
                     hint="install Debian's kernel: apt-get install linux-image-amd64")


def _version_key(ver: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", ver)]


def which(name: str) -> Path | None:
    for d in HOST_PATH:
        p = Path(d) / name
        if p.is_file() or p.is_symlink():
            return p
    return None


def image_path(host: str | Path) -> str:
    """Where a host file goes in the image: its path, with /lib, /bin... under /usr."""
    rel = str(host).lstrip("/")
    top, _, rest = rel.partition("/")
    if top in MERGED:
        rel = MERGED[top] + ("/" + rest if rest else "")
    return rel


class Collector:
    """The image's entries by path; adding a host file adds what it needs."""

    def __init__(self) -> None:
        self.entries: dict[str, cpio.Entry] = {}
        self.problems: list[str] = []
        self._ldd_done: set[str] = set()

    def add(self, entry: cpio.Entry) -> None:
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = cpio.directory(parent)
        self.entries[entry.path] = entry

    def add_data(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self.add(cpio.Entry(path, stat.S_IFREG | perm, data=data))

    def add_host_file(self, host: Path, *, libs: bool = True, dest: str = "") -> None:
        """A host file at its own place in the image: symlinks kept (their targets added),
        an ELF file's libraries and loader added too."""
        dest = dest or image_path(host)
        if dest in self.entries:
            return
        if host.is_symlink():
            target = os.readlink(host)
            self.add(cpio.symlink(dest, target))
            resolved = (host.parent / target) if not os.path.isabs(target) else Path(target)
            self.add_host_file(Path(os.path.normpath(resolved)), libs=libs)
            return
        mode = host.stat().st_mode
        self.add(cpio.Entry(dest, stat.S_IFREG | (mode & 0o755 | 0o644), source=host))
        if libs and (mode & 0o111 or host.name.endswith(".so") or ".so." in host.name):
            self._add_libraries(host)

    def _add_libraries(self, host: Path) -> None:
        if str(host) in self._ldd_done or not _is_elf(host):
            return
        self._ldd_done.add(str(host))
        out = subprocess.run(["ldd", str(host)], capture_output=True, text=True)
        if out.returncode != 0:  # a static program ("not a dynamic executable")
            return
        for line in out.stdout.splitlines():
            m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
            if m:
                lib = Path(m.group(1))
                dest = image_path(lib)
                if dest not in self.entries:
                    self.add(cpio.Entry(dest, stat.S_IFREG | 0o755, source=lib.resolve()))
                    self._add_libraries(lib.resolve())
            elif "=> not found" in line:
                self.problems.append(f"{host}: {line.strip()}")


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _programs() -> list[Path]:
    found: dict[str, Path] = {}
    missing = []
    for name in PROGRAMS:
        p = which(name)
        if p is None:
            missing.append(name)
        else:
            found[name] = p
    for pattern in PROGRAM_GLOBS:
        for d in HOST_PATH[:2]:
            for p in sorted(Path(d).glob(pattern)):
                found.setdefault(p.name, p)
    if missing:
        raise BuildError(f"programs the boot image needs are not installed: {', '.join(missing)}",
                         hint="install the farm's system packages: make system-packages "
                         "(scripts/system-packages.sh)")
    if not any(n.startswith("partclone.") for n in found):
        raise BuildError("partclone is not installed", hint="apt-get install partclone")
    return [found[n] for n in sorted(found)]


def _busybox(c: Collector) -> None:
    busybox = which("busybox")
    if busybox is None or not _is_static(busybox):
        raise BuildError("a static busybox is not installed (/usr/bin/busybox)",
                         hint="apt-get install busybox-static")
    c.add_host_file(busybox)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in sorted(applets):
        dest = f"usr/bin/{applet}"
        if dest not in c.entries and f"usr/sbin/{applet}" not in c.entries:
            c.add(cpio.symlink(dest, "busybox"))


def _is_static(path: Path) -> bool:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    return out.returncode != 0 or "statically linked" in out.stdout


def _modules(c: Collector, kernel: Kernel) -> list[str]:
    """The modules (with dependencies) and the module indexes; the names not found."""
    missing = []
    for name in MODULES:
        out = subprocess.run(["modprobe", "-S", kernel.version, "--show-depends", name],
                             capture_output=True, text=True)
        if out.returncode != 0:
            missing.append(name)
            continue
        for line in out.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                ko = Path(words[1])
                rel = ko.relative_to(Path("/lib/modules") / kernel.version)
                c.add(cpio.Entry(f"usr/lib/modules/{kernel.version}/{rel}", stat.S_IFREG | 0o644,
                                 source=kernel.modules / rel))
    for index in MODULE_INDEXES:
        if (kernel.modules / index).is_file():
            c.add(cpio.Entry(f"usr/lib/modules/{kernel.version}/{index}", stat.S_IFREG | 0o644,
                             source=kernel.modules / index))
    return missing


def _depmod(c: Collector, kernel: Kernel) -> None:
    """modules.dep and the other indexes, made by depmod over the image's own modules."""
    prefix = f"usr/lib/modules/{kernel.version}/"
    with tempfile.TemporaryDirectory(prefix="imgfarm-depmod-") as tmp:
        base = Path(tmp) / "lib" / "modules" / kernel.version
        for path, entry in c.entries.items():
            if path.startswith(prefix) and entry.kind == "file" and ".ko" in path:
                dest = base / path[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(entry.content())
        out = subprocess.run(["depmod", "-b", tmp, kernel.version], capture_output=True, text=True)
        if out.returncode != 0:
            raise BuildError(f"depmod failed: {out.stderr.strip()[-500:]}")
        for f in sorted(base.glob("modules.*")):
            if f.is_file() and not f.is_symlink() and f.name not in MODULE_INDEXES:
                c.add_data(prefix + f.name, f.read_bytes())


def _python(c: Collector) -> dict[str, str]:
    """The image's Python and the stdlib files the agent imports; its version facts."""
    if not Path(PYTHON).is_file():
        raise BuildError(f"{PYTHON} is not installed", hint="apt-get install python3.11")
    out = subprocess.run([PYTHON, "-I", "-S", str(FILES / "stdlib_closure.py"), str(PACKAGE_ROOT.parent),
                          str(PACKAGE_ROOT / "agent" / "main.py")], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"cannot list the stdlib modules the agent needs: {out.stderr.strip()[-500:]}")
    found = json.loads(out.stdout)
    c.add_host_file(Path(PYTHON))
    for name in found["files"]:
        c.add_host_file(Path(name), libs=name.endswith(".so"))
    return {"version": found["version"], "magic": found["magic"], "stdlib_files": str(len(found["files"]))}


def _agent(c: Collector) -> None:
    """The agent and the protocol module, as the package `imgfarm` of the image."""
    c.add_data("usr/lib/imgfarm/imgfarm/__init__.py", b'"""imgfarm: the agent side of the farm."""\n')
    for part in ("agent", "protocol"):
        for f in sorted((PACKAGE_ROOT / part).resolve().glob("*.py")):
            c.add(cpio.Entry(f"usr/lib/imgfarm/imgfarm/{part}/{f.name}", stat.S_IFREG | 0o644, source=f))


def _skeleton(c: Collector, kernel: Kernel) -> None:
    for top, target in MERGED.items():
        c.add(cpio.symlink(top, target))
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", "var"):
        c.add(cpio.directory(d, 0o1777 if d == "tmp" else 0o755))
    c.add(cpio.chardev("dev/console", 5, 1))
    c.add(cpio.chardev("dev/null", 1, 3, 0o666))
    c.add(cpio.symlink("var/run", "../run"))
    c.add(cpio.Entry("init", stat.S_IFREG | 0o755, source=FILES / "init"))
    c.add(cpio.Entry("usr/lib/imgfarm/init-functions.sh", stat.S_IFREG | 0o644,
                     source=FILES / "init-functions.sh"))
    c.add(cpio.Entry("usr/share/udhcpc/default.script", stat.S_IFREG | 0o755, source=FILES / "udhcpc.script"))
    c.add(cpio.Entry("usr/bin/imgfarm-agent", stat.S_IFREG | 0o755, source=FILES / "imgfarm-agent"))
    c.add_data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.add_data("etc/group", b"root:x:0:\n")
    c.add_data("etc/hosts", b"127.0.0.1 localhost\n")
    c.add_data("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    c.add_data("etc/resolv.conf", b"")
    # busybox sh prefers its own applets: the real programs by path, for a person at the shell
    c.add_data("etc/profile", b'export PATH=/usr/sbin:/usr/bin PS1="imgfarm# "\n'
               + b"".join(b"alias %s=/usr/sbin/%s\n" % (n, n) for n in (b"modprobe", b"insmod", b"rmmod", b"lsmod",
                                                                    b"modinfo", b"losetup", b"blkid", b"sfdisk"))
               + b"alias lsblk=/usr/bin/lsblk dd=/usr/bin/dd\n")


def collect(kernel: Kernel) -> tuple[Collector, dict[str, Any]]:
    """Every entry of the initrd, and the facts about them for the manifest."""
    c = Collector()
    _skeleton(c, kernel)
    for program in _programs():
        c.add_host_file(program)
    _busybox(c)
    for lib in DLOPENED:
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
            if (Path(d) / lib).exists():
                c.add_host_file(Path(d) / lib)
                break
    python = _python(c)
    _agent(c)
    missing_modules = _modules(c, kernel)
    if c.problems:
        raise BuildError("libraries the image's programs need are missing: " + "; ".join(c.problems[:5]))
    return c, {"python": python, "modules_missing": missing_modules}


# --- the key, the archive, the cache -----------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def input_list(entries: Iterable[cpio.Entry]) -> list[dict[str, Any]]:
    out = []
    for e in sorted(entries, key=lambda e: e.path):
        item: dict[str, Any] = {"path": "/" + e.path, "kind": e.kind, "mode": oct(stat.S_IMODE(e.mode))}
        if e.kind == "file":
            item["bytes"] = e.source.stat().st_size if e.source is not None else len(e.data or b"")
            item["sha256"] = _sha256(e.source) if e.source is not None else hashlib.sha256(e.data or b"").hexdigest()
            if e.source is not None:
                item["source"] = str(e.source)
        elif e.kind == "symlink":
            item["target"] = e.target
        elif e.kind == "char":
            item["rdev"] = list(e.rdev)
        out.append(item)
    return out


def build_key(kernel_sha: str, inputs: list[dict[str, Any]], compression: str, level: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "kernel": kernel_sha, "compression": compression,
                         "level": level}, sort_keys=True).encode())
    for item in inputs:
        h.update(json.dumps({k: v for k, v in item.items() if k != "source"}, sort_keys=True).encode())
    return h.hexdigest()


def _compile(c: Collector) -> None:
    """Byte-code for every .py, by the image's Python, checked by hash rather than mtime (the
    archive's mtimes are all the same), so the node does not compile at every boot."""
    sources = {p: e for p, e in c.entries.items() if p.endswith(".py") and e.kind == "file"}
    with tempfile.TemporaryDirectory(prefix="imgfarm-pyc-") as tmp:
        jobs = []
        for path, entry in sorted(sources.items()):
            src = Path(tmp) / "src" / path
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_bytes(entry.content())
            pyc = Path(path).parent / "__pycache__" / f"{Path(path).stem}.cpython-311.pyc"
            jobs.append({"src": str(src), "pyc": str(Path(tmp) / "pyc" / pyc), "dfile": "/" + path,
                         "dest": str(pyc)})
        script = ("import json, py_compile, sys\n"
                  "for j in json.load(sys.stdin):\n"
                  "    py_compile.compile(j['src'], j['pyc'], j['dfile'], doraise=True,\n"
                  "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n")
        out = subprocess.run([PYTHON, "-I", "-S", "-c", script], input=json.dumps(jobs), capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise BuildError(f"byte-compiling the agent failed: {out.stderr.strip()[-500:]}")
        for j in jobs:
            c.add_data(j["dest"], Path(j["pyc"]).read_bytes())


def compress(data: bytes, compression: str, level: int) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    out = subprocess.run(["zstd", "-q", "-c", f"-{level}", "-T1"],
                         input=data, capture_output=True)
    if out.returncode != 0:
        raise BuildError(f"zstd failed: {out.stderr.decode(errors='replace').strip()[-300:]}")
    return out.stdout


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imgfarm" / "bootimage"


DEFAULT_LEVEL = {"zstd": 9, "gzip": 6}  # zstd -19: 12% smaller, 20x slower to build


def build(out: Path | None = None, *, cache_dir: Path | None = None, kernel_version: str = "",
          compression: str = "zstd", level: int = 0, use_cache: bool = True) -> Image:
    """Build (or take from the cache) the boot image; copy it to `out` if given."""
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r}", hint=f"use one of {', '.join(COMPRESSIONS)}")
    level = level or DEFAULT_LEVEL[compression]
    cache_dir = cache_dir or default_cache_dir()
    started = time.monotonic()
    kernel = find_kernel(kernel_version)
    c, facts = collect(kernel)
    inputs = input_list(c.entries.values())
    kernel_sha = _sha256(kernel.vmlinuz)
    key = build_key(kernel_sha, inputs, compression, level)
    slot = cache_dir / key[:32]
    cached = use_cache and (slot / "manifest.json").is_file()
    if not cached:
        c.add_data("etc/imgfarm-image", f"{key[:12]}\n".encode())  # the console's first line names it
        _depmod(c, kernel)
        _compile(c)
        buf = io.BytesIO()
        unpacked = cpio.write(buf, c.entries.values())
        archive = buf.getvalue()
        packed = compress(archive, compression, level)
        manifest = {
            "key": key, "builder_version": BUILDER_VERSION,
            "kernel": {"version": kernel.version, "source": str(kernel.vmlinuz), "sha256": kernel_sha,
                       "bytes": kernel.vmlinuz.stat().st_size},
            "initrd": {"bytes": len(packed), "sha256": hashlib.sha256(packed).hexdigest(),
                       "cpio_bytes": len(archive), "content_bytes": unpacked, "entries": len(c.entries) + 1,
                       "compression": compression, "level": level},
            "budget_bytes": INITRD_BUDGET,
            "python": facts["python"],
            "modules": sorted(MODULES), "modules_missing": facts["modules_missing"],
            "build_seconds": round(time.monotonic() - started, 1),
            "inputs": inputs,
        }
        _store(slot, kernel.vmlinuz, packed, manifest)
    manifest = json.loads((slot / "manifest.json").read_text())
    image = Image(key, slot / "vmlinuz", slot / "initrd.img", manifest, cached)
    if out is not None:
        copy_to(image, out)
    return image


def _store(slot: Path, vmlinuz: Path, initrd: bytes, manifest: dict[str, Any]) -> None:
    """Into the cache atomically: a half-written slot is never seen (two builds may race)."""
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slot.name}-", dir=slot.parent))
    try:
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        (tmp / "initrd.img").write_bytes(initrd)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(slot)
        except OSError:  # another build stored the same key first: same bytes
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_to(image: Image, out: Path, kernel_name: str = "vmlinuz", initrd_name: str = "initrd.img") -> None:
    """The image's two files into `out` (atomically each: a node booting now reads old or new)."""
    for src, name in ((image.vmlinuz, kernel_name), (image.initrd, initrd_name)):
        place(out / name, src=Path(src))
