"""The repository holds the product: no working notes in code folders, no broker state.

What a maintainer needs goes into docs/ or the README. Celery's file-system
broker (the demo's no-Redis path) writes its exchange table, queues and
results under the farm's data directory, never into the directory a worker
was started from, where they would end up committed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from imgfarm.config.celery import celery_config
from imgfarm.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOT_CODE = {"docs", ".git", ".venv", ".imgfarm-demo", ".imgfarm-demo-vm", ".cache", ".pytest_cache",
            ".ruff_cache", ".mypy_cache"}
NOTE_NAME = re.compile(r"STATUS|TODO", re.IGNORECASE)
BROKER_STATE = re.compile(r"^(control|data_in|data_out|processed|broker)/|\.exchange$|(^|/)celerybeat-schedule")


def _code_files() -> list[Path]:
    out = []
    for top in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_CODE):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
            out.extend(Path(dirpath) / f for f in filenames)
    return out


def test_no_status_or_todo_files_in_code_folders() -> None:
    files = _code_files()
    assert any(f.name == "lifecycle.py" for f in files)  # the walk sees the code
    notes = [str(f.relative_to(ROOT)) for f in files if NOTE_NAME.search(f.name) and f.suffix != ".py"]
    assert not notes, f"working notes in code folders (put what is true into docs/): {notes}"


def test_no_broker_state_is_tracked() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert "tasks/lifecycle.py" in tracked
    state = [p for p in tracked if BROKER_STATE.search(p)]
    assert not state, f"Celery broker state is tracked (git rm it): {state}"


def test_file_system_broker_writes_only_under_the_data_dir(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A real kombu file-system transport, configured as the farm configures it."""
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    settings = Settings(data_dir=data, broker_url="filesystem://", result_backend="filesystem://")
    conf = celery_config(settings)
    exchange = Exchange("imgfarm.test", type="direct")
    queue = Queue("imgfarm.test", exchange, routing_key="imgfarm.test")
    with Connection(conf["broker_url"], transport_options=conf["broker_transport_options"]) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish({"job": 1}, exchange=exchange, routing_key="imgfarm.test", declare=[queue])
        got = []
        with conn.Consumer(queue, callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            conn.drain_events(timeout=5)
    assert got == [{"job": 1}]
    assert list(cwd.iterdir()) == []
    assert (data / "broker" / "control" / "imgfarm.test.exchange").is_file()
    assert conf["result_backend"] == f"file://{data / 'results'}"
