"""The network boot loaders a site's DHCP server hands out, put under the TFTP root.

A node's firmware fetches one of these by DHCP (`filename`/option 67); the loader then
reads the per-MAC file the pxe driver writes and boots the farm's boot image. They come
from Debian's own packages, like everything in the boot image, so a site does not have
to find, build or trust a loader from elsewhere. A loader whose package is not installed
is reported, not invented.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# iPXE loaded from the TFTP root (undionly.kpxe, ipxe.efi) or the NIC's own iPXE ROM asks
# DHCP again; the site answers iPXE clients with this script, which fetches the node's
# own file (the pxe driver's ipxe/<mac>.ipxe) from the same server.
BOOT_IPXE = "#!ipxe\nchain ipxe/${mac:hexhyp}.ipxe\n"


@dataclass(frozen=True)
class LoaderFile:
    """One file under the TFTP root: where Debian installs it, which package has it, and
    which firmware the site's DHCP should hand it to."""

    name: str
    source: Path | None  # None: written by the farm (the iPXE chain script)
    package: str
    for_whom: str


LOADER_FILES: tuple[LoaderFile, ...] = (
    LoaderFile("pxelinux.0", Path("/usr/lib/PXELINUX/pxelinux.0"), "pxelinux",
               "BIOS PXE (loader=pxelinux; kernel and initrd over TFTP)"),
    LoaderFile("lpxelinux.0", Path("/usr/lib/PXELINUX/lpxelinux.0"), "pxelinux",
               "BIOS PXE (loader=pxelinux with http:// kernel and initrd)"),
    LoaderFile("ldlinux.c32", Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"), "syslinux-common",
               "needed by pxelinux.0 and lpxelinux.0"),
    LoaderFile("undionly.kpxe", Path("/usr/lib/ipxe/undionly.kpxe"), "ipxe",
               "BIOS PXE chain-loading iPXE (loader=ipxe)"),
    LoaderFile("ipxe.efi", Path("/usr/lib/ipxe/ipxe.efi"), "ipxe",
               "UEFI PXE chain-loading iPXE (loader=ipxe)"),
    LoaderFile("boot.ipxe", None, "", "iPXE clients (DHCP user class iPXE, option 175)"),
)


@dataclass(frozen=True)
class Installed:
    name: str
    path: Path | None  # None: its package is not installed here
    package: str
    for_whom: str


def place(dest: Path, *, src: Path | None = None, data: bytes = b"") -> None:
    """`src`'s bytes (or `data`) at `dest`, 0644, atomically: a node booting while the
    files are replaced reads the old file or the new one, never half of one. A directory it
    makes is 0755 whatever the umask, as the pxe driver makes its own: tftpd must traverse it."""
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(dest.parent, 0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if src is None:
                f.write(data)
            else:
                with src.open("rb") as s:
                    shutil.copyfileobj(s, f, 1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_loaders(tftp_root: Path, files: tuple[LoaderFile, ...] = LOADER_FILES) -> list[Installed]:
    """Copy the loaders this host has into `tftp_root` and write the iPXE chain script.

    Returns one entry per loader, with `path` None where its Debian package is missing,
    so the caller can name the package to install.
    """
    done = []
    for f in files:
        dest = tftp_root / f.name
        if f.source is None:
            place(dest, data=BOOT_IPXE.encode())
        elif f.source.is_file():
            place(dest, src=f.source)
        else:
            done.append(Installed(f.name, None, f.package, f.for_whom))
            continue
        done.append(Installed(f.name, dest, f.package, f.for_whom))
    return done
