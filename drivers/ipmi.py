"""The ipmi power driver: `ipmitool -I lanplus` against each node's BMC.

BMCs are slow and flaky, so every ipmitool call is bounded (settings.ipmi
.timeout), retried with exponential backoff (settings.ipmi.retries /
.backoff), and calls to one BMC are serialized within the process (many
BMCs refuse a second session, and a job's reboot must not race the drift
checker's status query). Power changes are confirmed by reading the state
back until it matches or the timeout passes.

Credentials never appear on a command line (`ps` shows those to every
user): the password is read by ipmitool from a file (`-f`), or, when the
node carries a password itself, passed in the environment (`-E`,
IPMI_PASSWORD), which only root and the worker's user can read.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import NodeInfo, PowerInterface, PowerState, Property
from imgfarm.drivers.properties import Kind, as_text, is_true
from imgfarm.errors import DriverError, DriverSettingsError

log = logging.getLogger(__name__)

_STATUS = re.compile(r"Chassis Power is (on|off)", re.IGNORECASE)
# ipmitool prints this when the BMC lacks the cipher-suite query; it is not an error.
_NOISE = ("Unable to Get Channel Cipher Suites",)

_bmc_locks: dict[tuple[str, int], threading.Lock] = {}
_bmc_locks_guard = threading.Lock()


def _bmc_lock(addr: str, port: int) -> threading.Lock:
    with _bmc_locks_guard:
        return _bmc_locks.setdefault((addr, port), threading.Lock())


PROPERTIES = (
    Property("bmc_address", "the BMC's host name or IP address", required=True,
             example="10.1.0.101"),
    Property("bmc_port", "the BMC's RMCP+ UDP port", setting="ipmi.port", kind=Kind.PORT,
             example="6230"),
    Property("bmc_username", "the BMC user", setting="ipmi.username", example="admin"),
    Property("bmc_password_file", "a file on every worker holding the BMC password "
             "(mode 0600), read by ipmitool -f; this, bmc_password or the site's "
             "password file is needed", setting="ipmi.password_file",
             example="/etc/imgfarm/bmc.pw"),
    Property("bmc_password", "the BMC password itself, handed to ipmitool in its "
             "environment (-E), never on a command line; prefer bmc_password_file",
             secret=True),
    Property("bmc_bootdev", "what a reboot sets as the next boot device (none: leave it alone)",
             default="pxe", choices=("pxe", "none"), example="none"),
    Property("bmc_uefi", "ask for a UEFI network boot (chassis bootdev pxe options=efiboot)",
             default="false", kind=Kind.BOOLEAN, example="true"),
    Property("bmc_cipher_suite", "ipmitool -C: the RMCP+ cipher suite (empty: negotiate, "
             "which costs a round trip per call)", setting="ipmi.cipher_suite",
             kind=Kind.INTEGER, example="17"),
)


class IpmiPower(PowerInterface):
    """ipmitool lanplus against the node's BMC: power, reset, next boot from the network."""

    name = "ipmi"
    properties = PROPERTIES

    # --- settings ------------------------------------------------------------

    def validate(self, node: NodeInfo) -> None:
        super().validate(node)
        if not self.value(node, "bmc_password_file") and not self.value(node, "bmc_password"):
            raise DriverSettingsError(
                f"node {node.name}: the ipmi driver has no BMC password: "
                "bmc_password_file is not set for the node or the site",
                hint=f"`imgfarm node set {node.name} --set bmc_password_file=/etc/imgfarm/"
                "bmc.pw` (a 0600 file holding the password), or IMGFARM_IPMI__PASSWORD_FILE",
            )

    def _target(self, node: NodeInfo) -> tuple[str, int]:
        self.validate(node)
        return self.value(node, "bmc_address"), int(self.value(node, "bmc_port"))

    def command(self, node: NodeInfo, *args: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment for one ipmitool call (no password in argv)."""
        cfg = get_settings().ipmi
        addr, port = self._target(node)
        exe = shutil.which(cfg.ipmitool) or cfg.ipmitool
        # ipmitool's own retransmits stay short: our retries do the patient part.
        per_try = str(max(1, min(5, int(cfg.timeout / 10))))
        argv = [exe, "-I", cfg.interface, "-H", addr, "-p", str(port), "-N", per_try, "-R", "1"]
        suite = self.value(node, "bmc_cipher_suite")
        if suite:
            argv += ["-C", suite]
        user = self.value(node, "bmc_username")
        if user:
            argv += ["-U", user]
        env = {k: v for k, v in os.environ.items() if k != "IPMI_PASSWORD"}
        env["LC_ALL"] = "C"
        # The node's own file, else its own password, else the site's file.
        pw_file = as_text(node.driver_info.get("bmc_password_file"))
        password = str(node.driver_info.get("bmc_password") or "")  # spaces and all
        if pw_file or not password:
            argv += ["-f", pw_file or cfg.password_file]
        else:
            argv += ["-E"]
            env["IPMI_PASSWORD"] = password
        return argv + list(args), env

    # --- running ipmitool -------------------------------------------------------

    def _run(self, node: NodeInfo, *args: str) -> str:
        """Run one ipmitool command with bounded retries; return its stdout."""
        cfg = get_settings().ipmi
        argv, env = self.command(node, *args)
        pw_idx = argv.index("-f") + 1 if "-f" in argv else None
        if pw_idx is not None and not os.access(argv[pw_idx], os.R_OK):
            raise DriverError(
                f"node {node.name}: BMC password file {argv[pw_idx]} is not readable here",
                hint="create it on every worker (mode 0600, the password on one line)",
            )
        addr, port = self._target(node)
        what = f"ipmitool {' '.join(args)}"
        attempts = 1 + max(0, cfg.retries)
        last = ""
        with _bmc_lock(addr, port):
            for attempt in range(attempts):
                if attempt:
                    time.sleep(cfg.backoff * (2 ** (attempt - 1)))
                try:
                    proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                                          timeout=cfg.timeout)
                except FileNotFoundError as exc:
                    raise DriverError(
                        f"{cfg.ipmitool} not found", hint="install ipmitool on the worker, "
                        "or set IMGFARM_IPMI__IPMITOOL to its path") from exc
                except subprocess.TimeoutExpired:
                    last = f"timed out after {cfg.timeout:g}s"
                    log.info("%s on %s: %s (attempt %d)", what, node.name, last, attempt + 1)
                    continue
                if proc.returncode == 0:
                    return proc.stdout
                err = _clean(proc.stderr) or _clean(proc.stdout) or "no output"
                last = f"exit {proc.returncode}: {err}"
                log.info("%s on %s: %s (attempt %d)", what, node.name, last, attempt + 1)
        raise DriverError(
            f"{what} for {node.name} (BMC {addr}:{port}) failed after {attempts} "
            f"attempt(s), {last}",
            hint="check the BMC address and port, bmc_username and the password file; "
            "'Unable to establish IPMI v2 / RMCP+ session' is a wrong user/password or "
            "an unreachable BMC",
        )

    # --- the interface -------------------------------------------------------------

    def get_power_state(self, node: NodeInfo) -> PowerState:
        out = self._run(node, "chassis", "power", "status")
        m = _STATUS.search(out)
        return PowerState(m.group(1).lower()) if m else PowerState.UNKNOWN

    def set_power_state(self, node: NodeInfo, state: PowerState) -> None:
        if state not in (PowerState.ON, PowerState.OFF):
            raise DriverError(f"cannot set power state {state!r}")
        self._run(node, "chassis", "power", state.value)
        self._confirm(node, state)

    def reboot(self, node: NodeInfo) -> None:
        """Next boot from the network, then reset if on, power on if off."""
        self.set_boot_device_pxe(node)
        if self.get_power_state(node) is PowerState.ON:
            self._run(node, "chassis", "power", "reset")
        else:
            self._run(node, "chassis", "power", "on")
            self._confirm(node, PowerState.ON)

    def set_boot_device_pxe(self, node: NodeInfo) -> None:
        """One-time next boot from PXE (unless the node says bmc_bootdev=none)."""
        if self.value(node, "bmc_bootdev").lower() == "none":
            return
        args = ["chassis", "bootdev", "pxe"]
        if is_true(self.value(node, "bmc_uefi")):
            args.append("options=efiboot")
        self._run(node, *args)

    def _confirm(self, node: NodeInfo, want: PowerState) -> None:
        """BMCs act asynchronously: poll the state until it is `want` or time is up."""
        cfg = get_settings().ipmi
        deadline = time.monotonic() + cfg.timeout
        delay = 0.2
        while True:
            got = self.get_power_state(node)
            if got is want:
                return
            if time.monotonic() + delay > deadline:
                raise DriverError(
                    f"node {node.name}: BMC accepted power {want.value} but still reports "
                    f"{got.value} after {cfg.timeout:g}s",
                    hint="the BMC may be wedged: try `ipmitool ... mc reset cold`",
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _clean(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() not in _NOISE]
    return " | ".join(lines)[-400:]


__all__ = ["IpmiPower"]
