"""Fixtures for the window tests: an in-process farm database, and whole farms with beat.

In-process tests (the runner's logic) use the shared `settings_env` database
fixture (SQLite and PostgreSQL) with Redis DB 9 (under a key prefix of this test process's own);
their jobs are enqueued on an in-memory broker and moved by hand. The farm
tests start real API, worker and beat processes through `tests.farm.Farm` on
Redis DB 9.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, utcnow
from imgfarm.tasks.nodes import add_node
from tests.farm import Farm, running_farm
from tests.support import PROCESS_PREFIX, forget_redis_keys, use_redis_db

REDIS_DB = 9


@pytest.fixture
def win_db(settings_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """settings_env plus: broker and wake-ups on Redis DB 9 (no worker reads it),
    six sim nodes n1-n6 in group lab1, and an image `base`."""
    from imgfarm.config.settings import get_settings

    use_redis_db(monkeypatch, REDIS_DB, PROCESS_PREFIX)  # keys of this process's own
    with session_scope() as s:
        for i in range(1, 7):
            disk = tmp_path / f"n{i}.img"
            disk.write_bytes(b"")
            add_node(s, f"n{i}", disk=str(disk), groups=["lab1"])
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
    yield settings_env
    forget_redis_keys(REDIS_DB, PROCESS_PREFIX)
    get_settings.cache_clear()


def finish_job(job_id: int, state: str = states.SUCCEEDED, error: str = "",
               started: datetime | None = None) -> None:
    """Play a worker: end a job (as its task would) without a node."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.error = state, error
        job.started_at = started or job.started_at or utcnow()
        job.finished_at = utcnow()


def start_job(job_id: int) -> None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.started_at = states.RUNNING, utcnow()


@pytest.fixture
def win_farm(tmp_path: Path) -> Iterator[Farm]:
    """A whole farm on SQLite with Redis DB 9 and a 1 s window tick."""
    url = f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}"
    with running_farm(tmp_path, url, REDIS_DB, IMGFARM_WINDOW_TICK_INTERVAL="1",
                      IMGFARM_RECONCILE_INTERVAL="5") as f:
        yield f
