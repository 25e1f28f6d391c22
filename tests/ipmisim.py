"""OpenIPMI's `ipmi_sim` as a test BMC on 127.0.0.1: one lanplus channel, an admin user
with a password, and a chassis whose power and boot device are a `chassis_control`
program of the test's own (ipmi_sim's extcmd contract: `PROG get power` prints
`power:1`; `PROG set power 0`, `set reset 1`, `set boot pxe`).

The driver tests give it a script that keeps the chassis state in files; the VM
tests give it one that starts and kills a QEMU machine. Both start it through
`SimBmc`, which waits until the simulator listens and always kills it on stop.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import kill_session, wait_for

LAN_CONF = """name "{name}"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{chassis}"
  user 2 true "admin" "{password}" admin 10 none md2 md5 straight
"""

EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SimBmc:
    """One ipmi_sim BMC: its files under `dir`, the admin user's password, its UDP port."""

    dir: Path
    chassis: Path  # the chassis_control program
    password: str
    name: str = "imgfarm-test-bmc"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def password_file(self) -> Path:
        return self.dir / "bmc.pw"

    def write(self) -> None:
        """lan.conf, the emu file, the password file (0600) and the state directory; the port
        is chosen here if none was given, so a node can name a BMC nobody started."""
        self.port = self.port or free_udp_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "lan.conf").write_text(LAN_CONF.format(name=self.name, port=self.port,
                                                           chassis=self.chassis, password=self.password))
        (self.dir / "bmc.emu").write_text(EMU)
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        (self.dir / "state").mkdir(exist_ok=True)

    def start(self) -> None:
        self.write()
        self.proc = subprocess.Popen(
            ["ipmi_sim", "-c", str(self.dir / "lan.conf"), "-f", str(self.dir / "bmc.emu"),
             "-s", str(self.dir / "state"), "-n"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        port = self.port
        try:
            wait_for(lambda: self.proc is not None and self.proc.poll() is None
                     and f"0100007F:{port:04X}" in Path("/proc/net/udp").read_text(),
                     15, interval=0.05, what=f"ipmi_sim {self.name} on udp port {port}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the simulator and whatever chassis program it is running (its session)."""
        if self.proc is None:
            return
        kill_session(self.proc)
        self.proc = None

    def __enter__(self) -> SimBmc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
