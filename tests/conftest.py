"""Shared fixtures: databases (SQLite and PostgreSQL), settings, farms.

PostgreSQL tests use a fresh database per test session, created on the
server at IMGFARM_TEST_PG (default postgres@127.0.0.1:5432) and dropped at
the end. They fail, not skip, when PostgreSQL is not reachable, unless
IMGFARM_TEST_SKIP_PG=1.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# pytest-xdist workers get COLUMNS=80 from execnet, and Rich fixes a console's width at
# import when COLUMNS is set: the CLI tests would wrap at 80 whatever they pass.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
from imgfarm.cli import output as _cli_output  # noqa: E402

_ = _cli_output.console.size, _cli_output.err_console.size  # made now (they are lazy), without COLUMNS

from tests.farm import Farm, running_farm  # noqa: E402
from tests.support import PROCESS_PREFIX  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The VM machines first: pytest-xdist hands tests out in this order, and their group (one
    worker, minutes of CPU emulation) would otherwise start last and run on alone. The rest
    keep the files' order."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("vm") else 1)  # stable


PG_CANDIDATES = [
    os.environ.get("IMGFARM_TEST_PG", ""),
    "postgresql+psycopg://postgres@127.0.0.1:5432",
    "postgresql+psycopg://postgres:imgfarm@127.0.0.1:5432",
]


def _pg_server() -> str | None:
    import sqlalchemy as sa

    for base in filter(None, PG_CANDIDATES):
        try:
            eng = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
            with eng.connect() as conn:
                conn.execute(sa.text("select 1"))
            eng.dispose()
            return base
        except Exception:  # noqa: BLE001 - try the next candidate
            continue
    return None


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    import sqlalchemy as sa

    base = _pg_server()
    if base is None:
        if os.environ.get("IMGFARM_TEST_SKIP_PG") == "1":
            pytest.skip("PostgreSQL not reachable and IMGFARM_TEST_SKIP_PG=1")
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (run `make services`)")
    name = f"imgfarm_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{base}/{name}"
    finally:
        from imgfarm.models.db import dispose_all

        dispose_all()
        with admin.connect() as conn:
            conn.execute(sa.text(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty job database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = request.getfixturevalue("pg_url")
    from imgfarm.models.db import dispose_all

    dispose_all()
    _reset_pg(url)
    return url


@pytest.fixture
def settings_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process's settings point at a fresh database and data dir."""
    from imgfarm.config.settings import get_settings
    from imgfarm.models.db import dispose_all
    from imgfarm.models.migrate import upgrade

    monkeypatch.setenv("IMGFARM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMGFARM_DATABASE_URL", db_url)
    monkeypatch.setenv("IMGFARM_BROKER_URL", "memory://")
    monkeypatch.setenv("IMGFARM_REDIS_URL", "redis://127.0.0.1:6379/2")
    # wake-up channels of this process's own: pub/sub is not per Redis DB, and job ids
    # repeat across the tests running at the same time
    monkeypatch.setenv("IMGFARM_BROKER_PREFIX", PROCESS_PREFIX)
    get_settings.cache_clear()
    dispose_all()
    upgrade(db_url)
    yield db_url
    dispose_all()
    get_settings.cache_clear()




@pytest.fixture
def farm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Farm]:
    """A farm on SQLite (or PostgreSQL with @pytest.mark.parametrize('farm_db', ['postgresql']))."""

    backend = getattr(request, "param", None) or "sqlite"
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        _reset_pg(url)
    else:
        url = f"sqlite:///{tmp_path / 'data' / 'imgfarm.db'}"
    with running_farm(tmp_path, url, redis_db=3) as f:
        yield f
