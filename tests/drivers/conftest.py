"""Fixtures for the driver tests: settings from the environment, xCAT stand-ins.

Settings are read through `get_settings()` (cached); every fixture that
changes an `IMGFARM_...` variable clears the cache before and after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgfarm.config.settings import get_settings
from imgfarm.drivers import registry

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "xcat"


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Point the farm's data dir at tmp_path; set more IMGFARM_ vars through the result."""
    monkeypatch.delenv("IMGFARM_CONFIG", raising=False)
    monkeypatch.setenv("IMGFARM_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    registry.reset_cache()

    class _Env:
        def set(self, name: str, value: object) -> None:
            monkeypatch.setenv(name, str(value))
            get_settings.cache_clear()

    yield _Env()  # type: ignore[misc]
    get_settings.cache_clear()
    registry.reset_cache()


class XcatFake:
    """The state directory of the xCAT stand-ins, and what they were asked."""

    def __init__(self, state: Path) -> None:
        self.state = state

    def _read(self, name: str, default: Any) -> Any:
        path = self.state / name
        return json.loads(path.read_text()) if path.exists() else default

    def nodes(self) -> dict[str, dict[str, Any]]:
        return self._read("nodes.json", {})

    def define(self, *names: str, **attrs: Any) -> None:
        nodes = self.nodes()
        for n in names:
            nodes[n] = {"os": "rocky9", "arch": "x86_64", "profile": "imgfarm",
                        "currstate": "boot", "power": "off", "status": "sshd", **attrs}
        (self.state / "nodes.json").write_text(json.dumps(nodes))

    def configure(self, **changes: Any) -> None:
        cfg = self._read("config.json", {})
        cfg.update(changes)
        (self.state / "config.json").write_text(json.dumps(cfg))

    def calls(self, cmd: str | None = None) -> list[dict[str, Any]]:
        path = self.state / "calls.log"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [c for c in out if cmd is None or c["cmd"] == cmd]


@pytest.fixture
def xcat(settings_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> XcatFake:
    """xCAT stand-ins found through settings.xcat.bin_dir, state under tmp_path."""
    from imgfarm.drivers.xcat import site

    state = tmp_path / "xcat-state"
    state.mkdir()
    monkeypatch.setenv("XCATFAKE_STATE", str(state))
    settings_env.set("IMGFARM_XCAT__BIN_DIR", FAKES)
    settings_env.set("IMGFARM_XCAT__BATCH_WINDOW", "0.05")
    settings_env.set("IMGFARM_XCAT__COMMAND_TIMEOUT", "20")
    fake = XcatFake(state)
    fake.configure(osimages={"imgfarm-agent": {"provmethod": "netboot", "os": "rocky9",
                                               "arch": "x86_64", "profile": "imgfarm"}})
    site._reset_for_tests()
    return fake
