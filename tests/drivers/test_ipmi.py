"""The ipmi power driver against a real BMC simulator (OpenIPMI's ipmi_sim).

Each test runs `ipmi_sim` on 127.0.0.1 (tests/ipmisim.py: a lanplus channel, an
admin user with a password) whose `chassis_control` script, written here, keeps
the power state in files, so power really changes and every request the BMC
got can be read back. The simulator is killed when the test ends.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgfarm.drivers.base import NodeInfo, PowerState
from imgfarm.drivers.ipmi import IpmiPower
from imgfarm.errors import DriverError, DriverSettingsError
from tests.ipmisim import SimBmc

pytestmark = pytest.mark.skipif(not (shutil.which("ipmi_sim") and shutil.which("ipmitool")),
                                reason="openipmi (ipmi_sim) / ipmitool not installed")

PASSWORD = "s3cret-Pw"

CHASSIS = """#!/bin/sh
# ipmi_sim chassis_control program: state in files beside this script.
D="$(dirname "$0")/chassis"
echo "$*" >> "$D/log"
if [ -f "$D/fail" ] && [ "$(cat "$D/fail")" -gt 0 ]; then
    echo $(( $(cat "$D/fail") - 1 )) > "$D/fail"; exit 1
fi
op=$1; shift
case "$op" in
get) for k in "$@"; do
       v=$(cat "$D/$k" 2>/dev/null)
       [ -n "$v" ] || { [ "$k" = boot ] && v=none || v=0; }
       printf '%s:%s\\n' "$k" "$v"; done ;;
set) while [ $# -gt 1 ]; do
       if [ "$1" = reset ]; then echo reset >> "$D/resets"; else echo "$2" > "$D/$1"; fi
       shift 2; done ;;
esac
"""


@dataclass
class Bmc:
    port: int
    chassis: Path  # the chassis state directory
    password_file: Path

    def read(self, name: str, default: str = "") -> str:
        path = self.chassis / name
        return path.read_text().strip() if path.exists() else default

    def node(self, **info: str) -> NodeInfo:
        di = {"bmc_address": "127.0.0.1", "bmc_port": str(self.port), "bmc_username": "admin",
              "bmc_password_file": str(self.password_file), **info}
        return NodeInfo(name="b1", power_driver="ipmi", driver_info=di)


@pytest.fixture
def bmc(tmp_path: Path, settings_env) -> Iterator[Bmc]:
    settings_env.set("IMGFARM_IPMI__TIMEOUT", "5")
    settings_env.set("IMGFARM_IPMI__RETRIES", "2")
    settings_env.set("IMGFARM_IPMI__BACKOFF", "0.1")
    # ipmi_sim does not answer the cipher-suite query: pinning one saves 1 s a call.
    settings_env.set("IMGFARM_IPMI__CIPHER_SUITE", "3")
    d = tmp_path / "bmc"
    (d / "chassis").mkdir(parents=True)
    script = d / "chassis.sh"
    script.write_text(CHASSIS)
    script.chmod(0o755)
    with SimBmc(d, script, PASSWORD) as sim:
        yield Bmc(sim.port, d / "chassis", sim.password_file)


def test_power_really_changes(bmc):
    power = IpmiPower()
    node = bmc.node()
    assert power.get_power_state(node) is PowerState.OFF
    power.set_power_state(node, PowerState.ON)
    assert bmc.read("power") == "1"
    assert power.get_power_state(node) is PowerState.ON
    power.set_power_state(node, PowerState.OFF)
    assert bmc.read("power") == "0"
    assert power.get_power_state(node) is PowerState.OFF


def test_reboot_sets_pxe_then_powers_on_or_resets(bmc):
    power = IpmiPower()
    node = bmc.node()
    power.reboot(node)  # off -> on
    assert bmc.read("boot") == "pxe"
    assert bmc.read("power") == "1"
    assert bmc.read("resets") == ""
    (bmc.chassis / "boot").write_text("none\n")
    power.reboot(node)  # on -> reset
    assert bmc.read("boot") == "pxe"
    assert bmc.read("resets") == "reset"


def test_bootdev_none_leaves_boot_device_alone(bmc):
    IpmiPower().reboot(bmc.node(bmc_bootdev="none"))
    assert bmc.read("boot") == ""
    assert bmc.read("power") == "1"


def test_password_from_environment_not_argv(bmc):
    power = IpmiPower()
    node = bmc.node(bmc_password_file="", bmc_password=PASSWORD)
    argv, env = power.command(node, "chassis", "power", "status")
    assert PASSWORD not in " ".join(argv) and "-E" in argv
    assert env["IPMI_PASSWORD"] == PASSWORD
    assert power.get_power_state(node) is PowerState.OFF  # and the BMC accepts it


def test_password_file_is_passed_by_name(bmc):
    argv, env = IpmiPower().command(bmc.node(), "chassis", "power", "status")
    assert argv[argv.index("-f") + 1] == str(bmc.password_file)
    assert PASSWORD not in " ".join(argv) and "IPMI_PASSWORD" not in env


def test_wrong_password_is_a_clear_error(bmc, tmp_path, settings_env):
    settings_env.set("IMGFARM_IPMI__RETRIES", "1")
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    t0 = time.monotonic()
    with pytest.raises(DriverError) as info:
        IpmiPower().get_power_state(bmc.node(bmc_password_file=str(wrong)))
    msg = str(info.value)
    assert "Unable to establish IPMI v2 / RMCP+ session" in msg
    assert "ipmitool chassis power status" in msg and "exit 1" in msg and "2 attempt(s)" in msg
    assert "not-the-password" not in msg and PASSWORD not in msg
    assert time.monotonic() - t0 < 15


def test_flaky_bmc_is_retried(bmc):
    (bmc.chassis / "fail").write_text("2\n")  # the next two chassis operations fail
    power = IpmiPower()
    power.set_power_state(bmc.node(), PowerState.ON)
    assert bmc.read("power") == "1"
    assert bmc.read("fail") == "0"


def test_persistent_failure_gives_up_after_the_retries(bmc):
    (bmc.chassis / "fail").write_text("100\n")
    with pytest.raises(DriverError, match=r"failed after 3 attempt\(s\)"):
        IpmiPower().set_power_state(bmc.node(), PowerState.ON)
    assert int(bmc.read("fail")) == 97  # exactly 1 + retries(2) tries reached the BMC


def test_validate_names_missing_settings(settings_env):
    power = IpmiPower()
    with pytest.raises(DriverSettingsError, match="bmc_address") as info:
        power.validate(NodeInfo(name="x1", driver_info={"bmc_password_file": "/p"}))
    assert "--set bmc_address=" in str(info.value)
    with pytest.raises(DriverSettingsError, match="bmc_password_file"):
        power.validate(NodeInfo(name="x1", driver_info={"bmc_address": "10.0.0.9"}))
    settings_env.set("IMGFARM_IPMI__PASSWORD_FILE", "/etc/imgfarm/bmc.pw")
    power.validate(NodeInfo(name="x1", driver_info={"bmc_address": "10.0.0.9"}))
    with pytest.raises(DriverSettingsError, match="bmc_port"):
        power.validate(NodeInfo(name="x1", driver_info={"bmc_address": "h", "bmc_port": "x"}))


def test_registry_finds_ipmi(settings_env):
    from imgfarm.drivers import registry

    assert isinstance(registry.power_driver("ipmi"), IpmiPower)
