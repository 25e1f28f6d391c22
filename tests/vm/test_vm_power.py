"""A node whose BMC does not answer: the job fails at power-on with the ipmi driver's error.

The node is a pxe + ipmi node of a real farm (API, worker, ipmitool) whose
BMC port has no ipmi_sim behind it; no boot image is needed, since the job
must end before anything boots.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from imgfarm.drivers.base import BootTarget
from tests.vm.site import VmSite, vm_site

# one VM at a time: the tests of tests/vm share one pytest-xdist worker (a mark added by
# conftest.py at collection comes too late for xdist's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("vm")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmSite]:
    # IMGFARM_IPMI__TIMEOUT=10: each ipmitool run retransmits for 1 s (not 3), so the
    # driver's two attempts at a BMC that never answers take about 4 s, not 12.
    with vm_site(tmp_path_factory.mktemp("vmpower"), user="power", IMGFARM_IPMI__TIMEOUT="10") as s:
        yield s


def _states(job: dict[str, Any]) -> list[str]:
    return [e["state"] for e in job["events"] if e["kind"] == "state"]


def test_a_dead_bmc_fails_at_power_on_with_the_drivers_error(site: VmSite) -> None:
    vm = site.add_node("vmdead", 0x41, table=None, size_mib=16, bmc=False)
    [job_id] = site.farm.cli_json("capture", "vmdead", "--image", "never")["job_ids"]
    [job] = site.wait_final([job_id], 180)
    assert job["state"] == "failed"
    assert "ipmitool" in job["error"] and f"BMC 127.0.0.1:{vm.bmc_port}" in job["error"], job["error"]
    assert job["error"].startswith("could not boot vmdead: ipmitool chassis bootdev pxe for vmdead")
    assert "failed after 2 attempt(s)" in job["error"]
    assert _states(job)[-1] == "failed" and "running" not in _states(job)
    assert site.farm.cli_json("jobs", "--state", "booting") == []
    assert site.boot_target("vmdead") is BootTarget.LOCAL
    assert not vm.running() and not vm.console.exists()
