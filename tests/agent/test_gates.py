"""The agent's gates: files /init writes when a boot step is done (network up, disks settled)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from imgfarm.agent.main import wait_for_file


def test_no_gate_passes_at_once() -> None:
    t0 = time.monotonic()
    assert wait_for_file("", 5)
    assert time.monotonic() - t0 < 0.5


def test_waits_until_the_file_is_there(tmp_path: Path) -> None:
    gate = tmp_path / "disks-settled"
    timer = threading.Timer(0.3, gate.touch)
    timer.start()
    try:
        t0 = time.monotonic()
        assert wait_for_file(str(gate), 10)
        assert 0.25 <= time.monotonic() - t0 < 5
    finally:
        timer.cancel()


def test_gives_up_at_the_deadline(tmp_path: Path) -> None:
    t0 = time.monotonic()
    assert not wait_for_file(str(tmp_path / "never"), 0.3)
    assert 0.3 <= time.monotonic() - t0 < 3
