"""The boot image boots under QEMU and holds what the agent needs.

Booted straight from -kernel/-initrd (the PXE paths are the node tests'):
with `imgfarm.selfcheck=1` /init runs `imgfarm-agent --self-check`, which
names every tool with its version; with `imgfarm.api=` pointing at a
listener on the host the agent's first call arrives with the job's token,
and a farm that does not answer ends in /init's one-line reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from imgfarm.agent.selfcheck import REQUIRED
from tests.vm.vmlib import FirstCallListener, Qemu, direct_boot_args

# one VM at a time: the tests of tests/vm share one pytest-xdist worker (a mark added by
# conftest.py at collection comes too late for xdist's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("vm")


def test_self_check_on_the_console_names_every_tool(boot_image: Any, tmp_path: Path) -> None:
    args = direct_boot_args(boot_image.vmlinuz, boot_image.initrd, "imgfarm.selfcheck=1")
    with Qemu(args, tmp_path / "console.log") as vm:
        vm.console.wait_for(r"^self-check: (ok|FAILED).*$", timeout=300, what="the self-check's verdict")
        vm.console.wait_for(r"reboot: Power down", timeout=60, what="power-off after the self-check")
        assert vm.wait_exit(30) == 0
        out = vm.console.text()
    assert re.search(r"^self-check: ok, \d+ tools$", out, re.M), out[-3000:]
    assert re.search(r"^  python 3\.11\.\d+ \(/usr/bin/python3\.11\)$", out, re.M)
    for tool in REQUIRED:
        assert re.search(rf"^  {re.escape(tool)}: /usr/s?bin/", out, re.M), f"{tool} not found:\n{out[-3000:]}"
    assert re.search(r"^  partimage: \S+ Partition Image version 0\.6\.9", out, re.M)
    assert re.search(r"^  partclone\.restore: \S+ Partclone : v0\.3", out, re.M)
    assert re.search(r"^  zstd: \S+ Zstandard CLI", out, re.M)
    assert re.search(r"^imgfarm-init: modules loaded \(\d+\)", out, re.M)
    assert "MISSING" not in out


def test_the_agent_calls_the_api_with_its_orders(boot_image: Any, tmp_path: Path) -> None:
    with FirstCallListener() as api:
        append = f"imgfarm.api=http://10.0.2.2:{api.port} imgfarm.job=7 imgfarm.token=tok-123 imgfarm.after=poweroff"
        append += " imgfarm.failwait=0"  # powers off as soon as it said why, not 10 s later
        args = direct_boot_args(boot_image.vmlinuz, boot_image.initrd, append, nic="e1000")
        with Qemu(args, tmp_path / "console.log") as vm:
            first = api.wait_first(timeout=300, vm=vm)
            boot_seconds = first.at - vm.started
            line = vm.console.wait_for(r"^imgfarm-init: FAILED: .*$", timeout=180,
                                       what="the one-line reason after the farm answered 404").group()
            vm.console.wait_for(r"reboot: Power down", timeout=60, what="power-off (imgfarm.after=poweroff)")
            out = vm.console.text()
    print(f"power-on to the agent's first API call: {boot_seconds:.1f} s (TCG)")
    assert first.method == "GET" and first.path == "/agent/v1/jobs/7", first
    assert first.headers.get("Authorization") == "Bearer tok-123"
    assert "could not talk to the farm at http://10.0.2.2" in line, line
    assert re.search(r"^imgfarm-init: boot NIC eth0 \(52:54:00:12:34:56\)", out, re.M), out[-2000:]
    assert re.search(r"^imgfarm-init: DHCP lease on eth0 10\.0\.2\.15 ", out, re.M), out[-2000:]
