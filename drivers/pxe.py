"""The pxe boot driver: per-MAC boot files under a TFTP root, no xCAT.

A site that PXE-boots without xCAT points its DHCP at pxelinux, iPXE or
GRUB as usual; each of those looks for a file named after the booting MAC
before its default. This driver writes that file: an entry that boots the
farm's agent kernel with the job's orders on its command line, and, when the
job ends, an entry that boots the local disk.

Each loader is one `Loader` record: the path rule of its per-MAC file and
how it names the kernel; the file itself is a template under `templates/`
(`<loader>_agent.template`, `<loader>_local.template`, as Ironic keeps
`pxe_config.template`), filled by `render()`:

  pxelinux  pxelinux.cfg/01-aa-bb-cc-dd-ee-ff
  ipxe      ipxe/aa-bb-cc-dd-ee-ff.ipxe      (chain it with ${mac:hexhyp})
  grub      grub/grub.cfg-01-aa-bb-cc-dd-ee-ff (GRUB's own per-MAC name; UEFI)

Files are written atomically (temp file, fsync, rename) so a node booting
mid-write reads the old file or the new one, never half; they are 0644 and
their directories 0755 because tftpd reads them as an unprivileged user, so
they hold no secret: the agent takes its job's token from the API, once.
The first line of every file says what it does (`# imgfarm: agent ...` /
`# imgfarm: local`), which is how `get_boot_target` reads it back.
"""

from __future__ import annotations

import os
import re
import string
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import AgentOrders, BootInterface, BootTarget, NodeInfo, Property
from imgfarm.drivers.properties import value_of
from imgfarm.errors import DriverError, DriverSettingsError
from imgfarm.protocol import normalize_mac

# Characters every loader passes through literally: no quoting, no expansion
# (GRUB and iPXE expand "$", GRUB splits on ";", pxelinux ends a line at "\n").
# Matched with fullmatch: `$` would also match before a final newline.
_CMDLINE_SAFE = re.compile(r"[A-Za-z0-9 ._:/=,@%+~-]*")
_PATH_SAFE = re.compile(r"[A-Za-z0-9._:/=,@%+~-]*")  # the same, without the space
HEADER = "# imgfarm: "
TEMPLATES = Path(__file__).with_name("templates")


# --- loaders -----------------------------------------------------------------

def _from_root(path: str) -> str:
    return "/" + path.lstrip("/")


def _ipxe_uri(path: str) -> str:
    # A relative URI would resolve against the script's directory (ipxe/).
    base = get_settings().pxe.ipxe_base_url
    return base + path if base else _from_root(path)


@dataclass(frozen=True)
class Loader:
    """A boot loader: where it looks for a MAC's file, how it names a file to fetch."""

    name: str
    file_rule: str  # under the TFTP root; {mac} is aa-bb-cc-dd-ee-ff
    locate: Callable[[str], str]  # a path under the TFTP root, as this loader fetches it

    def boot_file(self, root: Path, mac: str) -> Path:
        return root / self.file_rule.format(mac=mac.replace(":", "-"))


LOADERS: dict[str, Loader] = {
    "pxelinux": Loader("pxelinux", "pxelinux.cfg/01-{mac}", lambda path: path),
    "ipxe": Loader("ipxe", "ipxe/{mac}.ipxe", _ipxe_uri),
    "grub": Loader("grub", "grub/grub.cfg-01-{mac}", _from_root),
}

LOADER = Property("loader", "the boot loader that reads the node's file", setting="pxe.loader",
                  choices=tuple(LOADERS), example="grub")
PROPERTIES = (
    LOADER,
    Property("kernel", "the agent kernel, a path under the TFTP root", setting="pxe.kernel",
             example="imgfarm/vmlinuz"),
    Property("initrd", "the agent initrd, a path under the TFTP root", setting="pxe.initrd",
             example="imgfarm/initrd.img"),
    Property("kcmdline", "extra kernel parameters for this node, after the site's "
             "extra_cmdline (plain key=value words)", example="console=ttyS1,115200"),
    Property("mac", "the boot NIC's MAC, when the node's own --mac is not set",
             example="52:54:00:12:34:01"),
)


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


def node_loader(node: NodeInfo) -> Loader:
    name = value_of(node.driver_info, LOADER).lower()
    if name not in LOADERS:
        raise DriverSettingsError(
            f"node {node.name}: unknown PXE loader {name!r}",
            hint=f"use --set loader=pxelinux|ipxe|grub (or IMGFARM_PXE__LOADER); "
            f"known: {', '.join(LOADERS)}",
        )
    return LOADERS[name]


def boot_file(root: Path, loader: str, mac: str) -> Path:
    """Where `loader` looks for the per-MAC file of `mac` under the TFTP root."""
    return LOADERS[loader].boot_file(root, mac)


# --- file contents -------------------------------------------------------------

class _BootTemplate(string.Template):
    """`{{ name }}` placeholders, so the loaders' own `$` / `${...}` stay literal."""

    pattern = r"""
        \{\{\s*(?P<named>[a-z_]+)\s*\}\}
        | (?P<braced>(?!))
        | (?P<escaped>(?!))
        | (?P<invalid>\{\{)
    """  # type: ignore[assignment]  # a str here; Template compiles it


@cache
def _template(loader: str, target: BootTarget) -> _BootTemplate:
    text = (TEMPLATES / f"{loader}_{target.value}.template").read_text()
    first = text.removeprefix("#!ipxe\n").split("\n", 1)[0]
    if not first.startswith(f"{HEADER}{target.value}"):  # how get_boot_target reads it back
        raise RuntimeError(f"template {loader}_{target.value} must start with "
                           f"{HEADER}{target.value}")
    return _BootTemplate(text)


def render(loader: str, target: BootTarget, values: Mapping[str, str] | None = None) -> str:
    """The boot file of `loader` for `target`, its placeholders filled from `values`.

    Every value must be text each loader takes literally: a newline, `$`, `;`
    or a quote would let a value rewrite the file.
    """
    values = dict(values or {})
    for key, text in values.items():
        if not _CMDLINE_SAFE.fullmatch(text):
            raise DriverError(
                f"the {loader} boot file's {key} {text[:80]!r} has characters a boot "
                "loader would interpret ($ ; quotes, newlines ...)",
                hint="check IMGFARM_PXE__KERNEL/INITRD/EXTRA_CMDLINE/IPXE_BASE_URL, the "
                "node's kernel/initrd/kcmdline and the API URL",
            )
    return _template(loader, target).substitute(values)


def agent_values(loader: Loader, kernel: str, initrd: str, cmdline: str,
                 note: str) -> dict[str, str]:
    """What the agent templates may use: paths as `loader` fetches them, the command line."""
    return {
        "kernel": loader.locate(kernel),
        "initrd": loader.locate(initrd),
        "initrd_name": os.path.basename(initrd),
        "cmdline": cmdline,
        "note": note,
    }


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
    """Per-MAC pxelinux, iPXE or GRUB files under a TFTP root (needs the node's --mac)."""

    name = "pxe"
    properties = PROPERTIES

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        node_mac(node)
        node_loader(node)
        extra = self.value(node, "kcmdline")
        if not _CMDLINE_SAFE.fullmatch(extra):
            raise DriverSettingsError(
                f"node {node.name}: kcmdline {extra!r} has characters a boot loader "
                "would interpret ($ ; quotes ...)",
                hint="use plain key=value words",
            )
        for key in ("kernel", "initrd"):
            path = str(node.driver_info.get(key) or "")
            if not _PATH_SAFE.fullmatch(path):
                raise DriverSettingsError(
                    f"node {node.name}: {key} {path!r} is not a plain path under the TFTP root",
                    hint="use letters, digits and . _ - / + ~ @ % , : = (no spaces, $ or ;)",
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
        cmdline = " ".join(
            p for p in (get_settings().pxe.extra_cmdline, self.value(node, "kcmdline"),
                        orders.kernel_params())
            if p
        )
        loader = node_loader(node)
        values = agent_values(loader, self.value(node, "kernel"), self.value(node, "initrd"),
                              cmdline, f"job={orders.job_id} node={node.name}")
        text = render(loader.name, BootTarget.AGENT, values)
        try:
            write_atomic(loader.boot_file(self._root(), node_mac(node)), text)
        except OSError as exc:
            raise DriverError(f"could not write the boot file of {node.name}: {exc}") from exc

    def boot_local(self, node: NodeInfo) -> None:
        mac = node_mac(node)
        root = self._root()
        chosen = node_loader(node)
        try:
            write_atomic(chosen.boot_file(root, mac), render(chosen.name, BootTarget.LOCAL))
            # The loader may have changed since the agent file was written:
            # no agent file of this MAC may outlive the job under any loader.
            for other in LOADERS.values():
                path = other.boot_file(root, mac)
                if other is not chosen and read_target(path) is BootTarget.AGENT:
                    write_atomic(path, render(other.name, BootTarget.LOCAL))
        except OSError as exc:
            raise DriverError(f"could not write the boot file of {node.name}: {exc}") from exc

    def get_boot_target(self, node: NodeInfo) -> BootTarget:
        return read_target(node_loader(node).boot_file(self._root(), node_mac(node)))


__all__ = ["LOADERS", "Loader", "PxeBoot", "boot_file", "normalize_mac", "render"]
