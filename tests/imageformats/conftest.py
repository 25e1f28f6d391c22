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


@pytest.fixture(scope="module")
def work(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the images a module makes once (module-scoped fixtures)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture()
def dest(tmp_path: Path) -> Iterator[Path]:
    """An empty image store directory."""
    d = tmp_path / "store"
    d.mkdir()
    yield d
