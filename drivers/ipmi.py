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

driver_info keys:
  bmc_address        required: the BMC's host name or IP
  bmc_port           default settings.ipmi.port (623)
  bmc_username       default settings.ipmi.username
  bmc_password_file  default settings.ipmi.password_file (one of these, or
  bmc_password       ... this, must give a password)
  bmc_bootdev        what `reboot` sets for the next boot: pxe (default) | none
  bmc_uefi           "true": ask for a UEFI PXE boot (bootdev options=efiboot)
  bmc_cipher_suite   ipmitool -C (default settings.ipmi.cipher_suite; empty: negotiate)
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
from imgfarm.drivers.base import NodeInfo, PowerInterface, PowerState, require
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


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class IpmiPower(PowerInterface):
    """Power on/off/reset/status and next-boot-PXE through ipmitool."""

    name = "ipmi"

    # --- settings ------------------------------------------------------------

    def validate(self, node: NodeInfo) -> None:
        require(node, "ipmi", "bmc_address")
        info = node.driver_info
        port = info.get("bmc_port", "")
        if port != "" and not str(port).isdigit():
            raise DriverSettingsError(
                f"node {node.name}: bmc_port {port!r} is not a port number",
                hint=f"`imgfarm node set {node.name} --set bmc_port=623`",
            )
        has_pw = info.get("bmc_password_file") or info.get("bmc_password")
        if not has_pw and not get_settings().ipmi.password_file:
            raise DriverSettingsError(
                f"node {node.name}: the ipmi driver has no BMC password: "
                "bmc_password_file is not set for the node or the site",
                hint=f"`imgfarm node set {node.name} --set bmc_password_file=/etc/imgfarm/"
                "bmc.pw` (a 0600 file holding the password), or IMGFARM_IPMI__PASSWORD_FILE",
            )
        bootdev = str(info.get("bmc_bootdev", "pxe"))
        if bootdev not in ("pxe", "none"):
            raise DriverSettingsError(
                f"node {node.name}: bmc_bootdev must be pxe or none, not {bootdev!r}")

    def _target(self, node: NodeInfo) -> tuple[str, int]:
        self.validate(node)
        info = node.driver_info
        port = int(info.get("bmc_port") or get_settings().ipmi.port)
        return str(info["bmc_address"]).strip(), port

    def command(self, node: NodeInfo, *args: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment for one ipmitool call (no password in argv)."""
        cfg = get_settings().ipmi
        addr, port = self._target(node)
        info = node.driver_info
        exe = shutil.which(cfg.ipmitool) or cfg.ipmitool
        # ipmitool's own retransmits stay short: our retries do the patient part.
        per_try = str(max(1, min(5, int(cfg.timeout / 10))))
        argv = [exe, "-I", cfg.interface, "-H", addr, "-p", str(port), "-N", per_try, "-R", "1"]
        suite = str(info.get("bmc_cipher_suite") or cfg.cipher_suite)
        if suite:
            argv += ["-C", suite]
        user = str(info.get("bmc_username") or cfg.username)
        if user:
            argv += ["-U", user]
        env = {k: v for k, v in os.environ.items() if k != "IPMI_PASSWORD"}
        env["LC_ALL"] = "C"
        pw_file = str(info.get("bmc_password_file") or "")
        if pw_file:
            argv += ["-f", pw_file]
        elif info.get("bmc_password"):
            argv += ["-E"]
            env["IPMI_PASSWORD"] = str(info["bmc_password"])
        else:
            argv += ["-f", cfg.password_file]
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
        if str(node.driver_info.get("bmc_bootdev", "pxe")) == "none":
            return
        args = ["chassis", "bootdev", "pxe"]
        if _truthy(node.driver_info.get("bmc_uefi", "")):
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
