"""The pxe boot driver: per-MAC boot files under a TFTP root, no xCAT.

A site that PXE-boots without xCAT points its DHCP at pxelinux, iPXE or
GRUB as usual; each of those looks for a file named after the booting MAC
before its default. This driver writes that file: an entry that boots the
farm's agent kernel with the job's orders on its command line, and, when the
job ends, an entry that boots the local disk.

  pxelinux  pxelinux.cfg/01-aa-bb-cc-dd-ee-ff
  ipxe      ipxe/aa-bb-cc-dd-ee-ff.ipxe      (chain it with ${mac:hexhyp})
  grub      grub/grub.cfg-01-aa-bb-cc-dd-ee-ff (GRUB's own per-MAC name; UEFI)

Files are written atomically (temp file, fsync, rename) so a node booting
mid-write reads the old file or the new one, never half; they are 0644 and
their directories 0755 because tftpd reads them as an unprivileged user. The
only secret on the command line is the one-job token, dead with the job.
The first line of every file says what it does (`# imgfarm: agent ...` /
`# imgfarm: local`), which is how `get_boot_target` reads it back.

driver_info keys: `loader` (pxelinux|ipxe|grub; default settings.pxe.loader),
`kernel`, `initrd`, `kcmdline` (optional per-node overrides/additions).
The node's MAC comes from the node's `mac` field (or driver_info `mac`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import AgentOrders, BootInterface, BootTarget, NodeInfo
from imgfarm.errors import DriverError, DriverSettingsError

LOADERS = ("pxelinux", "ipxe", "grub")
_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
# Characters every loader passes through literally: no quoting, no expansion
# (GRUB and iPXE expand "$", GRUB splits on ";", pxelinux ends a line at "\n").
_CMDLINE_SAFE = re.compile(r"^[A-Za-z0-9 ._:/=,@%+~-]*$")
HEADER = "# imgfarm: "


def normalize_mac(mac: str) -> str | None:
    """"AA:BB:CC:DD:EE:FF" / "aa-bb-..." / "aabbccddeeff" -> "aa:bb:cc:dd:ee:ff", else None."""
    mac = mac.strip().lower()
    if not _MAC.match(mac):
        return None
    digits = re.sub(r"[:-]", "", mac)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def node_mac(node: NodeInfo) -> str:
    raw = str(node.mac or node.driver_info.get("mac", "") or "")
    mac = normalize_mac(raw)
    if mac is None:
        what = f"MAC address {raw!r} is malformed" if raw else "has no MAC address"
        raise DriverSettingsError(
            f"node {node.name}: the pxe driver needs the boot NIC's MAC; the node {what}",
            hint=f"give it with `imgfarm node set {node.name} --mac aa:bb:cc:dd:ee:ff` "
            "(or --set mac=aa:bb:cc:dd:ee:ff)",
        )
    return mac


def node_loader(node: NodeInfo) -> str:
    loader = str(node.driver_info.get("loader") or get_settings().pxe.loader).strip().lower()
    if loader not in LOADERS:
        raise DriverSettingsError(
            f"node {node.name}: unknown PXE loader {loader!r}",
            hint=f"use --set loader=pxelinux|ipxe|grub (or IMGFARM_PXE__LOADER); "
            f"known: {', '.join(LOADERS)}",
        )
    return loader


def boot_file(root: Path, loader: str, mac: str) -> Path:
    """Where `loader` looks for the per-MAC file of `mac` under the TFTP root."""
    hyph = mac.replace(":", "-")
    if loader == "pxelinux":
        return root / "pxelinux.cfg" / f"01-{hyph}"
    if loader == "ipxe":
        return root / "ipxe" / f"{hyph}.ipxe"
    return root / "grub" / f"grub.cfg-01-{hyph}"


# --- file contents -------------------------------------------------------------

def render_agent(loader: str, kernel: str, initrd: str, cmdline: str, note: str) -> str:
    """The boot entry that runs the agent kernel with `cmdline`."""
    if loader == "pxelinux":
        return (
            f"{HEADER}agent {note}\n"
            "DEFAULT imgfarm-agent\nPROMPT 0\nTIMEOUT 0\n\n"
            "LABEL imgfarm-agent\n"
            f"  KERNEL {kernel}\n"
            f"  APPEND initrd={initrd} {cmdline}\n"
        )
    if loader == "ipxe":
        base = get_settings().pxe.ipxe_base_url
        # A relative URI would resolve against this script's directory (ipxe/).
        k = base + kernel if base else "/" + kernel.lstrip("/")
        i = base + initrd if base else "/" + initrd.lstrip("/")
        return (
            f"#!ipxe\n{HEADER}agent {note}\n"
            f"kernel {k} initrd={os.path.basename(initrd)} {cmdline}\n"
            f"initrd {i}\n"
            "boot\n"
        )
    return (
        f"{HEADER}agent {note}\n"
        "set timeout=0\nset default=imgfarm-agent\n"
        "menuentry 'imgfarm agent' --id imgfarm-agent {\n"
        f"    linux /{kernel.lstrip('/')} {cmdline}\n"
        f"    initrd /{initrd.lstrip('/')}\n"
        "}\n"
    )


def render_local(loader: str) -> str:
    """The boot entry that hands the node to its local disk."""
    if loader == "pxelinux":
        return f"{HEADER}local\nDEFAULT local\nPROMPT 0\nTIMEOUT 0\n\nLABEL local\n  LOCALBOOT 0\n"
    if loader == "ipxe":
        # exit returns to the firmware, which tries the next boot device: the disk.
        return f"#!ipxe\n{HEADER}local\nexit\n"
    return (
        f"{HEADER}local\nset timeout=0\nset default=local\n"
        "menuentry 'local disk' --id local {\n    exit\n}\n"
    )


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Replace `path` with `text` so no reader ever sees half a file; mode 0644."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)  # tftpd must traverse it whatever our umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_target(path: Path) -> BootTarget:
    try:
        with open(path) as fh:
            head = fh.read(200)
    except FileNotFoundError:
        return BootTarget.UNKNOWN  # the loader falls back to the site's default
    for line in head.splitlines()[:2]:
        if line.startswith(HEADER):
            word = line[len(HEADER):].split(" ", 1)[0]
            return {"agent": BootTarget.AGENT, "local": BootTarget.LOCAL}.get(
                word, BootTarget.UNKNOWN)
    return BootTarget.UNKNOWN


# --- the driver ----------------------------------------------------------------

class PxeBoot(BootInterface):
    """Per-MAC pxelinux / iPXE / GRUB files under settings.pxe.tftp_root."""

    name = "pxe"

    def validate(self, node: NodeInfo) -> None:
        node_mac(node)
        node_loader(node)
        extra = str(node.driver_info.get("kcmdline", ""))
        if not _CMDLINE_SAFE.match(extra):
            raise DriverSettingsError(
                f"node {node.name}: kcmdline {extra!r} has characters a boot loader "
                "would interpret ($ ; quotes ...)",
                hint="use plain key=value words",
            )

    def _root(self) -> Path:
        root = Path(get_settings().pxe.tftp_root)
        if not root.is_dir():
            raise DriverError(
                f"TFTP root {root} does not exist",
                hint="create it (the directory tftpd serves) or set IMGFARM_PXE__TFTP_ROOT",
            )
        return root

    def boot_agent(self, node: NodeInfo, orders: AgentOrders) -> None:
        self.validate(node)
        cfg = get_settings().pxe
        info = node.driver_info
        cmdline = " ".join(
            p for p in (cfg.extra_cmdline, str(info.get("kcmdline", "")), orders.kernel_params())
            if p
        )
        if not _CMDLINE_SAFE.match(cmdline):
            raise DriverError(
                f"node {node.name}: the kernel command line has characters a boot loader "
                "would interpret",
                hint="check IMGFARM_PXE__EXTRA_CMDLINE and the API URL",
            )
        loader = node_loader(node)
        text = render_agent(
            loader,
            str(info.get("kernel") or cfg.kernel),
            str(info.get("initrd") or cfg.initrd),
            cmdline,
            f"job={orders.job_id} node={node.name}",
        )
        try:
            write_atomic(boot_file(self._root(), loader, node_mac(node)), text)
        except OSError as exc:
            raise DriverError(f"could not write the boot file of {node.name}: {exc}") from exc

    def boot_local(self, node: NodeInfo) -> None:
        mac = node_mac(node)
        root = self._root()
        chosen = node_loader(node)
        try:
            write_atomic(boot_file(root, chosen, mac), render_local(chosen))
            # The loader may have changed since the agent file was written:
            # no agent file of this MAC may outlive the job under any loader.
            for other in LOADERS:
                path = boot_file(root, other, mac)
                if other != chosen and read_target(path) is BootTarget.AGENT:
                    write_atomic(path, render_local(other))
        except OSError as exc:
            raise DriverError(f"could not write the boot file of {node.name}: {exc}") from exc

    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        return read_target(boot_file(self._root(), node_loader(node), node_mac(node)))


__all__ = ["LOADERS", "PxeBoot", "boot_file", "normalize_mac", "render_agent", "render_local"]
