"""Fixtures of the VM tests: the tools check, the boot files, an NFS export.

Every test under tests/vm carries the `vm` marker (so `-m vm` runs only these,
`-m "not vm"` none), and is skipped, saying which package is missing, where
QEMU, nfs-ganesha, ipmi_sim or their firmware files are not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import vmlib

WHY_NOT = vmlib.missing_tools()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
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
