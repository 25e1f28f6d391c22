"""Fixtures of the VM tests: the tools check, the boot files, an NFS export.

Every test under tests/vm carries the `vm` marker (so `-m vm` runs only these,
`-m "not vm"` none), runs in one xdist worker (one VM at a time, however many
workers `make test` starts), and is skipped, saying which package is missing, where
QEMU, nfs-ganesha, ipmi_sim or their firmware files are not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import vmlib

WHY_NOT = vmlib.missing_tools()

# The whole-job VM tests (a capture and two restores, the store dying, the legacy image, the
# pxelinux and GRUB/UEFI boots): `-m "not vm_long"` leaves them out of a quicker local run.
LONG = {"test_vm_jobs.py", "test_vm_pxe_boot.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
            # A TCG boot on 2 shared cores takes minutes; module fixtures boot too.
            item.add_marker(pytest.mark.timeout(1200))
            item.add_marker(pytest.mark.xdist_group("vm"))  # one VM at a time under xdist
            if Path(str(item.fspath)).name in LONG:
                item.add_marker(pytest.mark.vm_long)
            if WHY_NOT:
                item.add_marker(pytest.mark.skip(reason=f"VM tests need: {WHY_NOT}"))


@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tftp"
    vmlib.write_boot_scripts(root)
    return root


@pytest.fixture
def nfs_export(tmp_path: Path) -> Iterator[vmlib.Ganesha]:
    export = tmp_path / "store"
    export.mkdir()
    with vmlib.ganesha(tmp_path / "ganesha", export) as server:
        yield server


@pytest.fixture(scope="session")
def boot_image() -> object:
    """The farm's boot image (imgfarm.bootimage.build.Image), built once from this host's
    packages, or taken from the build cache (~/.cache/imgfarm/bootimage) when its inputs
    have not changed since an earlier session."""
    if WHY_NOT:
        pytest.skip(f"VM tests need: {WHY_NOT}")
    try:
        vmlib.host_kernel()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # lazy: the builder loads only for the tests that boot the farm's image
    from imgfarm.bootimage.build import build

    return build()
