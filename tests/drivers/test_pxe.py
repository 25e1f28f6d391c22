"""The pxe boot driver, with its files checked by real tools.

GRUB files go through `grub-script-check` (grub-common); pxelinux files,
for which no parser is installed, through a strict parser of the keywords
pxelinux documents; iPXE scripts through a check of the `#!ipxe` header and
known commands. Then the files are served by a real TFTP server (`in.tftpd`
from tftpd-hpa, which drops to the unprivileged `tftp` user, so permissions
are tested too) on 127.0.0.1 and fetched with the real `tftp` client.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from imgfarm.drivers.base import AgentOrders, BootTarget, NodeInfo
from imgfarm.drivers.pxe import PxeBoot, boot_file, normalize_mac
from imgfarm.errors import DriverSettingsError
from tests.support import run, stop_process, wait_for

ORDERS = AgentOrders(api_url="http://10.0.0.1:8470", job_id=7, token="Tok_" + "a" * 40)
MAC = "AA:BB:CC:00:11:22"


def node(loader: str = "", mac: str = MAC, **info: str) -> NodeInfo:
    di = {"loader": loader, **info} if loader else dict(info)
    return NodeInfo(name="n7", mac=mac, boot_driver="pxe", driver_info=di)


@pytest.fixture
def tftp_root(settings_env, tmp_path: Path) -> Path:
    root = tmp_path / "tftp"
    root.mkdir()
    os.chmod(root, 0o755)
    settings_env.set("IMGFARM_PXE__TFTP_ROOT", root)
    return root


# --- strict checkers for the formats with no installed parser ----------------

PXELINUX_KEYWORDS = {"DEFAULT", "PROMPT", "TIMEOUT", "LABEL", "KERNEL", "LINUX",
                     "INITRD", "APPEND", "IPAPPEND", "LOCALBOOT", "MENU", "ONTIMEOUT"}


def check_pxelinux(text: str) -> dict[str, dict[str, str]]:
    """Parse a pxelinux config strictly: known keywords, a DEFAULT that exists."""
    labels: dict[str, dict[str, str]] = {}
    default = None
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        key = key.upper()
        assert key in PXELINUX_KEYWORDS, f"line {n}: unknown keyword {key!r}"
        if key == "DEFAULT":
            default = value.strip()
        elif key == "LABEL":
            current = value.strip()
            assert current and current not in labels, f"line {n}: bad label"
            labels[current] = {}
        elif key in ("KERNEL", "LINUX", "APPEND", "IPAPPEND", "LOCALBOOT", "INITRD"):
            assert current is not None, f"line {n}: {key} outside a LABEL"
            labels[current][key] = value.strip()
        elif key in ("PROMPT", "TIMEOUT"):
            assert value.strip().isdigit(), f"line {n}: {key} needs a number"
    assert default in labels, f"DEFAULT {default!r} names no LABEL"
    for name, body in labels.items():
        assert ("KERNEL" in body) != ("LOCALBOOT" in body), f"label {name}: kernel xor localboot"
    return labels


IPXE_COMMANDS = {"kernel", "initrd", "boot", "exit", "chain", "imgargs", "echo", "sanboot",
                 "set", "imgfetch", "module"}


def check_ipxe(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == "#!ipxe", "an iPXE script must start with #!ipxe"
    cmds = []
    for line in lines[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        assert words[0] in IPXE_COMMANDS, f"unknown iPXE command {words[0]!r}"
        assert "${" not in line, "unexpected iPXE variable expansion"
        cmds.append(words)
    return cmds


def grub_check(path: Path) -> None:
    res = run("grub-script-check", path, check=False)
    assert res.returncode == 0, f"grub-script-check {path}: {res.stderr or res.stdout}"


# --- behaviour -------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [
    ("AA:BB:CC:00:11:22", "aa:bb:cc:00:11:22"), ("aa-bb-cc-00-11-22", "aa:bb:cc:00:11:22"),
    ("aabbcc001122", "aa:bb:cc:00:11:22"), ("aa:bb:cc:00:11", None), ("aa:bb-cc:00:11:22", None),
    ("zz:bb:cc:00:11:22", None), ("", None)])
def test_normalize_mac(raw, want):
    assert normalize_mac(raw) == want


def test_validate_names_the_missing_or_bad_mac(tftp_root):
    with pytest.raises(DriverSettingsError, match="has no MAC address") as info:
        PxeBoot().validate(node(mac=""))
    assert "--mac" in str(info.value)
    with pytest.raises(DriverSettingsError, match="malformed"):
        PxeBoot().validate(node(mac="aa:bb:cc"))
    with pytest.raises(DriverSettingsError, match="loader is 'syslinux6', not one of pxelinux, ipxe, grub"):
        PxeBoot().validate(node(loader="syslinux6"))
    with pytest.raises(DriverSettingsError, match="would interpret"):
        PxeBoot().validate(node(kcmdline="console=$evil;reboot"))


def test_pxelinux_agent_then_local(tftp_root):
    boot = PxeBoot()
    boot.boot_agent(node("pxelinux", kcmdline="console=ttyS0,115200"), ORDERS)
    path = tftp_root / "pxelinux.cfg" / "01-aa-bb-cc-00-11-22"
    labels = check_pxelinux(path.read_text())
    append = labels["imgfarm-agent"]["APPEND"]
    assert ORDERS.kernel_params() in append and "console=ttyS0,115200" in append
    assert labels["imgfarm-agent"]["KERNEL"] == "imgfarm/vmlinuz"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert boot.get_boot_target(node("pxelinux")) is BootTarget.AGENT

    boot.boot_local(node("pxelinux"))
    labels = check_pxelinux(path.read_text())
    assert labels == {"local": {"LOCALBOOT": "0"}}
    assert ORDERS.token not in path.read_text()
    assert boot.get_boot_target(node("pxelinux")) is BootTarget.LOCAL
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_grub_files_pass_grub_script_check(tftp_root):
    boot = PxeBoot()
    boot.boot_agent(node("grub"), ORDERS)
    path = tftp_root / "grub" / "grub.cfg-01-aa-bb-cc-00-11-22"
    grub_check(path)
    text = path.read_text()
    assert f"linux /imgfarm/vmlinuz {ORDERS.kernel_params()}" in text
    assert "initrd /imgfarm/initrd.img" in text
    boot.boot_local(node("grub"))
    grub_check(path)
    assert "exit" in path.read_text() and ORDERS.token not in path.read_text()


def test_grub_check_would_catch_a_broken_file(tmp_path):
    bad = tmp_path / "grub.cfg"
    bad.write_text("menuentry 'x' {\n linux /k\n")  # unclosed block
    assert run("grub-script-check", bad, check=False).returncode != 0


def test_ipxe_script(tftp_root, settings_env):
    boot = PxeBoot()
    boot.boot_agent(node("ipxe"), ORDERS)
    path = tftp_root / "ipxe" / "aa-bb-cc-00-11-22.ipxe"
    cmds = check_ipxe(path.read_text())
    assert [c[0] for c in cmds] == ["kernel", "initrd", "boot"]
    assert cmds[0][1] == "/imgfarm/vmlinuz" and " ".join(cmds[0][2:]).endswith(
        ORDERS.kernel_params())
    boot.boot_local(node("ipxe"))
    assert [c[0] for c in check_ipxe(path.read_text())] == ["exit"]

    settings_env.set("IMGFARM_PXE__IPXE_BASE_URL", "http://10.0.0.1/boot/")
    boot.boot_agent(node("ipxe"), ORDERS)
    assert check_ipxe(path.read_text())[0][1] == "http://10.0.0.1/boot/imgfarm/vmlinuz"


def test_loader_from_site_setting_and_stale_agent_files_are_reverted(tftp_root, settings_env):
    settings_env.set("IMGFARM_PXE__LOADER", "grub")
    boot = PxeBoot()
    boot.boot_agent(node(), ORDERS)  # no per-node loader: the site's, grub
    grub = boot_file(tftp_root, "grub", "aa:bb:cc:00:11:22")
    assert grub.exists()
    # The operator switches this node to pxelinux while the job runs.
    boot.boot_local(node("pxelinux"))
    assert ORDERS.token not in grub.read_text()  # the old grub agent file was reverted
    assert boot.get_boot_target(node()) is BootTarget.LOCAL


GOLDEN = {  # byte for byte what the driver writes (the templates must not drift)
    ("pxelinux", "agent"): "# imgfarm: agent job=7 node=n7\nDEFAULT imgfarm-agent\nPROMPT 0\n"
    "TIMEOUT 0\n\nLABEL imgfarm-agent\n  KERNEL imgfarm/vmlinuz\n"
    "  APPEND initrd=imgfarm/initrd.img {params}\n  IPAPPEND 2\n",
    ("pxelinux", "local"): "# imgfarm: local\nDEFAULT local\nPROMPT 0\nTIMEOUT 0\n\n"
    "LABEL local\n  LOCALBOOT 0\n",
    ("ipxe", "agent"): "#!ipxe\n# imgfarm: agent job=7 node=n7\nkernel /imgfarm/vmlinuz "
    "initrd=initrd.img {params}\ninitrd /imgfarm/initrd.img\nboot\n",
    ("ipxe", "local"): "#!ipxe\n# imgfarm: local\nexit\n",
    ("grub", "agent"): "# imgfarm: agent job=7 node=n7\nset timeout=0\nset default=imgfarm-agent\n"
    "menuentry 'imgfarm agent' --id imgfarm-agent {{\n    linux /imgfarm/vmlinuz {params}\n"
    "    initrd /imgfarm/initrd.img\n}}\n",
    ("grub", "local"): (
        '# imgfarm: local\n'
        'set timeout=0\n'
        'set default=local\n'
        "menuentry 'local disk' --id local {{\n"
        '    # GRUB loads no partition map by itself; a netbooted GRUB takes these modules from\n'
        '    # its prefix on the TFTP server (where grub-mknetdir puts them).\n'
        '    insmod part_gpt\n'
        '    insmod part_msdos\n'
        '    insmod fat\n'
        "    # UEFI's fallback loader of a disk, then the common distributions' own. A bare\n"
        '    # `exit` reports success to the firmware, and EDK2-based firmware (OVMF and many\n'
        '    # servers) then opens its boot menu instead of trying the next boot entry.\n'
        '    for efi in /EFI/BOOT/BOOTX64.EFI /EFI/debian/shimx64.efi /EFI/ubuntu/shimx64.efi \\\n'
        '            /EFI/redhat/shimx64.efi /EFI/rocky/shimx64.efi /EFI/centos/shimx64.efi \\\n'
        '            /EFI/opensuse/shim.efi /EFI/Microsoft/Boot/bootmgfw.efi; do\n'
        '        if search --no-floppy --file --set=root $efi; then\n'
        '            echo "imgfarm: booting the local disk\'s $efi"\n'
        '            chainloader $efi\n'
        '            boot\n'
        '        fi\n'
        '    done\n'
        '    echo "imgfarm: no EFI loader found on the local disks"\n'
        '    exit\n'
        '}}\n'
    ),
}


@pytest.mark.parametrize("loader", ["pxelinux", "ipxe", "grub"])
def test_files_are_the_templates_filled_byte_for_byte(tftp_root, loader):
    boot = PxeBoot()
    path = boot_file(tftp_root, loader, MAC.lower())
    boot.boot_agent(node(loader), ORDERS)
    assert path.read_text() == GOLDEN[loader, "agent"].format(params=ORDERS.kernel_params())
    boot.boot_local(node(loader))
    assert path.read_text() == GOLDEN[loader, "local"].format()


def test_paths_and_site_settings_cannot_rewrite_a_boot_file(tftp_root, settings_env):
    from imgfarm.errors import DriverError

    for bad in ("imgfarm/vmlinuz\nboot", "$prefix/vmlinuz", "a b", "k;reboot"):
        with pytest.raises(DriverSettingsError, match="kernel"):
            PxeBoot().validate(node("grub", kernel=bad))
    settings_env.set("IMGFARM_PXE__IPXE_BASE_URL", "http://10.0.0.1/${evil}/")
    with pytest.raises(DriverError, match="kernel .* characters a boot loader would interpret"):
        PxeBoot().boot_agent(node("ipxe"), ORDERS)
    assert not (tftp_root / "ipxe").exists()  # nothing written


def test_missing_tftp_root_is_a_clear_error(settings_env, tmp_path):
    from imgfarm.errors import DriverError

    settings_env.set("IMGFARM_PXE__TFTP_ROOT", tmp_path / "nope")
    with pytest.raises(DriverError, match="IMGFARM_PXE__TFTP_ROOT"):
        PxeBoot().boot_agent(node("pxelinux"), ORDERS)


# --- served by a real TFTP server ------------------------------------------------

def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("in.tftpd") and shutil.which("tftp")),
                    reason="tftpd-hpa / tftp-hpa not installed")
def test_files_served_by_real_tftpd(tftp_root, tmp_path):
    boot = PxeBoot()
    nodes = {"pxelinux": "aa:bb:cc:00:00:01", "ipxe": "aa:bb:cc:00:00:02",
             "grub": "aa:bb:cc:00:00:03"}
    for loader, mac in nodes.items():
        boot.boot_agent(node(loader, mac=mac), ORDERS)
    port = _free_udp_port()
    server = subprocess.Popen(
        ["in.tftpd", "-L", "-a", f"127.0.0.1:{port}", "-s", str(tftp_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Bound yet? (a datagram sent before that costs the client a 5 s retransmit)
        wait_for(lambda: f"0100007F:{port:04X}" in Path("/proc/net/udp").read_text(),
                 timeout=10, interval=0.02, what=f"in.tftpd on udp port {port}")
        for loader, mac in nodes.items():
            rel = boot_file(tftp_root, loader, mac).relative_to(tftp_root)
            dest = tmp_path / f"got-{loader}"

            def fetched(rel: Path = rel, dest: Path = dest) -> bool:
                res = run("tftp", "127.0.0.1", str(port), "-c", "get", str(rel), str(dest),
                          check=False, timeout=5)
                return res.returncode == 0 and dest.exists() and dest.stat().st_size > 0

            wait_for(fetched, timeout=10, what=f"tftp get {rel}")
            assert dest.read_text() == (tftp_root / rel).read_text()
            assert ORDERS.kernel_params() in dest.read_text()
        # tftpd reads as the `tftp` user: a 0600 file is refused, so 0644 mattered.
        private = tftp_root / "private.cfg"
        private.write_text("x")
        private.chmod(0o600)
        res = run("tftp", "127.0.0.1", str(port), "-c", "get", "private.cfg",
                  str(tmp_path / "private"), check=False, timeout=5)
        assert "Permission denied" in res.stdout + res.stderr  # tftp-hpa exits 0 anyway
        # After the job: the same names now serve local boot.
        boot.boot_local(node("pxelinux", mac=nodes["pxelinux"]))
        rel = boot_file(tftp_root, "pxelinux", nodes["pxelinux"]).relative_to(tftp_root)
        dest = tmp_path / "after"
        run("tftp", "127.0.0.1", str(port), "-c", "get", str(rel), str(dest), timeout=5)
        assert check_pxelinux(dest.read_text()) == {"local": {"LOCALBOOT": "0"}}
    finally:
        stop_process(server)


def test_registry_finds_pxe(settings_env):
    from imgfarm.drivers import registry

    assert isinstance(registry.boot_driver("pxe"), PxeBoot)
