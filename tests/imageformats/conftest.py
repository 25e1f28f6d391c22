"""Fixtures for the image-format tests (helpers live in pi_helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parents[1]):  # pi_helpers, and the repo root for tests.support
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture()
def dest(tmp_path: Path) -> Iterator[Path]:
    """An empty image store directory."""
    d = tmp_path / "store"
    d.mkdir()
    yield d
