"""`make demo`'s program, on the path a machine without Redis takes.

The demo normally starts a private Redis; here it is told to use Celery's
file-system broker instead (what it does when redis-server is not
installed), so that path is exercised too, end to end: 8 sim nodes, capture,
7 restores checked byte for byte, the legacy sample, local boot everywhere.
It runs from an empty directory, which must stay empty: the broker's state
belongs under the data directory (it was once committed from a demo run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def test_demo_runs_without_redis(tmp_path: Path) -> None:
    env = {**os.environ, "IMGFARM_DEMO_BROKER": "filesystem", "IMGFARM_DEMO_DIR": str(tmp_path / "demo")}
    env.pop("IMGFARM_BROKER_URL", None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run([sys.executable, "-m", "imgfarm.demo"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    assert "file-system broker" in out.stdout
    assert "demo OK" in out.stdout
    assert out.stdout.count("identical, fsck clean") == 7
    assert "matches what partimage restore gives" in out.stdout
    assert "node07 partition sha256" in out.stdout and "of the original gives" in out.stdout
