"""The xcat drivers against stand-ins of xCAT's commands (tests/fakes/xcat).

xCAT cannot run here: these tests hold the drivers to xCAT's command
contract - arguments, `NODE: DATA` / `NODE: Error: TEXT` output lines, exit
codes, whole-command errors - as the stand-ins implement it from xCAT's man
pages and client source. Every stand-in invocation is logged, so batching is
measured by counting real processes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imgfarm.drivers import registry
from imgfarm.drivers.base import AgentOrders, BootTarget, NodeInfo, PowerState
from imgfarm.drivers.xcat import (
    XcatBoot,
    XcatPower,
    xcat_image_store,
    xcat_node_status,
)
from imgfarm.errors import DriverError, DriverSettingsError

ORDERS = AgentOrders(api_url="http://10.0.0.1:8470", job_id=42, token="t0k3n-" + "x" * 32)


def node(name: str, **info: str) -> NodeInfo:
    return NodeInfo(name=name, boot_driver="xcat", power_driver="xcat", driver_info=info)


def test_registry_finds_both_drivers(xcat):
    assert isinstance(registry.boot_driver("xcat"), XcatBoot)
    assert isinstance(registry.power_driver("xcat"), XcatPower)


def test_boot_agent_then_local_round_trip(xcat):
    xcat.define("n01")
    boot = XcatBoot()
    boot.boot_agent(node("n01"), ORDERS)

    st = xcat.nodes()["n01"]
    assert st["currstate"] == "netboot rocky9-x86_64-imgfarm"
    # The job's orders were in bootparams.addkcmdline when nodeset wrote the boot file.
    assert ORDERS.kernel_params() in st["boot_kcmdline"]
    assert boot.get_boot_target(node("n01")) is BootTarget.AGENT
    nodeset_args = [c["argv"] for c in xcat.calls("nodeset")]
    assert ["n01", "osimage=imgfarm-agent"] in nodeset_args
    assert ["n01", "stat"] in nodeset_args  # read back after setting

    boot.boot_local(node("n01"))
    st = xcat.nodes()["n01"]
    assert st["currstate"] == "boot"
    assert st["addkcmdline"] == ""  # the token does not linger in xCAT's tables
    assert boot.get_boot_target(node("n01")) is BootTarget.LOCAL


def test_xcat_node_name_from_driver_info(xcat):
    xcat.define("cn-0001")
    XcatBoot().boot_agent(node("lab001", xcat_node="cn-0001"), ORDERS)
    assert xcat.nodes()["cn-0001"]["currstate"].startswith("netboot")


def test_200_concurrent_boot_local_calls_share_a_few_nodeset_processes(xcat, settings_env):
    """The coalescer: 200 job threads ending together -> a handful of nodeset runs."""
    names = [f"n{i:03d}" for i in range(200)]
    xcat.define(*names, currstate="netboot rocky9-x86_64-imgfarm")
    settings_env.set("IMGFARM_XCAT__BATCH_WINDOW", "0.3")
    settings_env.set("IMGFARM_XCAT__BATCH_SIZE", "100")
    boot = XcatBoot()
    start = threading.Barrier(len(names))

    def one(name: str) -> None:
        start.wait()
        boot.boot_local(node(name))

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(one, names))

    states = xcat.nodes()
    assert all(states[n]["currstate"] == "boot" for n in names)
    sets = [c for c in xcat.calls("nodeset") if c["argv"][1] == "boot"]
    assert 2 <= len(sets) <= 6, f"{len(sets)} nodeset boot runs for 200 nodes"
    assert sum(len(c["argv"][0].split(",")) for c in sets) == 200
    assert max(len(c["argv"][0].split(",")) for c in sets) <= 100  # batch_size respected


def test_one_failing_node_fails_alone(xcat, settings_env):
    settings_env.set("IMGFARM_XCAT__BATCH_WINDOW", "0.3")
    xcat.define("a1", "a2", "a3")
    xcat.define("bad", fail={"nodeset": "Unable to find requested filesystem image"})
    boot = XcatBoot()
    with ThreadPoolExecutor(4) as pool:
        futs = {n: pool.submit(boot.boot_agent, node(n), ORDERS) for n in ("a1", "a2", "a3", "bad")}
    with pytest.raises(DriverError) as info:
        futs["bad"].result()
    msg = str(info.value)
    assert "nodeset" in msg and "exit 1" in msg and "Unable to find requested" in msg
    assert ORDERS.token not in msg
    for n in ("a1", "a2", "a3"):
        futs[n].result()
        assert xcat.nodes()[n]["currstate"].startswith("netboot")
    osimage_runs = [c for c in xcat.calls("nodeset") if c["argv"][1].startswith("osimage=")]
    assert len(osimage_runs) == 1  # one batch for the four


def test_unknown_node_does_not_fail_its_batch_or_get_created(xcat, settings_env):
    settings_env.set("IMGFARM_XCAT__BATCH_WINDOW", "0.3")
    xcat.define("k1", "k2")
    boot = XcatBoot()
    with ThreadPoolExecutor(3) as pool:
        futs = {n: pool.submit(boot.boot_agent, node(n), ORDERS) for n in ("k1", "ghost", "k2")}
    with pytest.raises(DriverError, match="ghost is not defined in xCAT"):
        futs["ghost"].result()
    futs["k1"].result()
    futs["k2"].result()
    assert "ghost" not in xcat.nodes()  # chdef would have created it


def test_state_mismatch_on_read_back_is_an_error(xcat):
    xcat.define("s1", sticky=True, currstate="shell")
    with pytest.raises(DriverError, match="says 'shell', not local"):
        XcatBoot().boot_local(node("s1"))


def test_whole_command_error_reaches_every_caller(xcat):
    xcat.define("e1")
    xcat.configure(exit={"nodeset": {"rc": 1, "stderr": "Error: [xcatmn]: Unable to "
                                     "connect to xcatd at localhost:3001\n"}})
    with pytest.raises(DriverError) as info:
        XcatBoot().boot_local(node("e1"))
    assert "exit 1" in str(info.value) and "Unable to connect to xcatd" in str(info.value)


def test_timeout_is_a_clear_error(xcat, settings_env):
    xcat.define("slow1")
    xcat.configure(sleep={"rpower": 5})
    settings_env.set("IMGFARM_XCAT__COMMAND_TIMEOUT", "0.5")
    t0 = time.monotonic()
    with pytest.raises(DriverError, match=r"rpower slow1 stat timed out after 0.5s"):
        XcatPower().get_power_state(node("slow1"))
    assert time.monotonic() - t0 < 4


def test_missing_commands_say_where_they_were_looked_for(xcat, settings_env, tmp_path):
    settings_env.set("IMGFARM_XCAT__BIN_DIR", tmp_path)
    with pytest.raises(DriverError, match="nodeset not found in") as info:
        XcatBoot().boot_local(node("x1"))
    assert "IMGFARM_XCAT__BIN_DIR" in str(info.value)


def test_power_on_off_reboot_and_stat(xcat):
    xcat.define("p1")
    power = XcatPower()
    assert power.get_power_state(node("p1")) is PowerState.OFF
    power.reboot(node("p1"))  # rpower boot: on when off
    assert power.get_power_state(node("p1")) is PowerState.ON
    assert xcat.nodes()["p1"]["boots"] == 1
    power.set_power_state(node("p1"), PowerState.OFF)
    assert power.get_power_state(node("p1")) is PowerState.OFF
    assert ["p1", "boot"] in [c["argv"] for c in xcat.calls("rpower")]


def test_power_error_names_command_and_bmc_text(xcat):
    xcat.define("p2", fail={"rpower": "Unable to establish IPMI v2 / RMCP+ session"})
    with pytest.raises(DriverError) as info:
        XcatPower().reboot(node("p2"))
    assert "rpower failed for p2 (exit 1)" in str(info.value)
    assert "RMCP+" in str(info.value)


def test_boot_local_many_uses_one_nodeset_per_batch(xcat, settings_env):
    settings_env.set("IMGFARM_XCAT__BATCH_SIZE", "30")
    names = [f"r{i:02d}" for i in range(50)]
    xcat.define(*names, currstate="netboot rocky9-x86_64-imgfarm")
    result = XcatBoot().boot_local_many([node(n) for n in names] + [node("gone")])
    assert result["gone"] is not None
    assert all(result[n] is None for n in names)
    sets = [c for c in xcat.calls("nodeset") if c["argv"][1] == "boot"]
    assert len(sets) == 3  # 51 nodes in batches of 30: one rerun after dropping "gone"


def test_image_store_from_site_table(xcat):
    xcat.configure(site={"master": "10.0.0.1", "IMAGELIBSERVER": "10.0.0.5",
                         "IMAGELIBINSTALLDIR": "/install/images"})
    assert xcat_image_store() == "10.0.0.5:/install/images"
    xcat_image_store()
    assert len(xcat.calls("tabdump")) == 1  # cached


def test_image_store_absent_from_site_table(xcat):
    xcat.configure(site={"master": "10.0.0.1"})
    assert xcat_image_store() is None


def test_nodestat_progress(xcat):
    xcat.define("w1", status="partimage-ng: 43%")
    xcat.define("w2", status="noping")
    assert xcat_node_status(node("w1")).percent == 43
    st = xcat_node_status(node("w2"))
    assert st.percent is None and st.text == "noping"


def test_validate_rejects_names_xcat_cannot_take(xcat):
    with pytest.raises(DriverSettingsError, match="xcat_node=NAME"):
        XcatBoot().validate(node("-rf"))
    XcatPower().validate(node("lab001"))


def test_output_parser_reads_every_documented_line_form():
    """Client.pm forms: data, node error with/without [server], general errors."""
    from imgfarm.drivers.xcat.commands import CommandResult, per_node

    res = CommandResult(
        ("/opt/xcat/bin/nodeset", "a,b,c,d,e", "stat"), 1,
        "a: boot\nb: [sn01]: netboot rocky9-x86_64-imgfarm\ne   sshd\n",
        "c: Error: nodetype.os not defined for c.\nd: [sn01]: Error: no tftpserver\n"
        "Error: [xcatmn]: something general\n",
    )
    got = per_node(res, ["a", "b", "c", "d", "e", "f"])
    assert got["a"].ok and got["a"].text == "boot"
    assert got["b"].ok and got["b"].text == "netboot rocky9-x86_64-imgfarm"
    assert not got["c"].ok and got["c"].text == "nodetype.os not defined for c."
    assert not got["d"].ok and got["d"].text == "no tftpserver"
    assert got["e"].ok and got["e"].text == "sshd"  # nodestat's man-page form
    assert got["f"] is None
    assert res.general_errors() == ["something general"]
    assert res.name == "nodeset"
