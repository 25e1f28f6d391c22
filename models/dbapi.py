"""The job database seen through the DB-API: plain reads, and the errors an operator can fix.

Why this exists beside the SQLAlchemy engine (models/db.py): the CLI is run
by scripts in loops and by cron, and importing SQLAlchemy costs more than
twice the CLI's whole start-up. A command that only reads (`imgfarm jobs`,
`imgfarm job N`) on the default SQLite database therefore reads through the
stdlib `sqlite3` module. Everything else, and every server database, goes
through SQLAlchemy as before; the SQL text is the same either way, with
`:name` parameters, which both `sqlite3` and SQLAlchemy's text() take.

Writes never come here: every change goes through models/ on SQLAlchemy,
where the transition table and the locks live.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgfarm.errors import ServiceUnavailable

_SQLITE_PREFIXES = ("sqlite:///", "sqlite+pysqlite:///")


def _database_url() -> str:
    # lazy: the settings (pydantic) load only when a command opens the database
    from imgfarm.config.settings import get_settings

    return get_settings().database_url


def sqlite_path(url: str) -> str | None:
    """The file a SQLite URL names (`sqlite:///rel.db`, `sqlite:////abs.db`); None for
    anything else, an in-memory database or a URL with query options."""
    for prefix in _SQLITE_PREFIXES:
        if url.startswith(prefix):
            path = url[len(prefix):]
            return path if path and path != ":memory:" and "?" not in path else None
    return None


class Reader:
    """Runs read-only SQL on one connection and returns rows as dicts."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        return list(self._run(sql, params))


def private_sqlite_file(path: str) -> None:
    """Create the SQLite file mode 0600 (or make an existing one of ours 0600).

    Why: the job database holds node settings and job history; other local
    users have no business reading it, whatever the umask. SQLite gives its
    -wal and -shm files the database file's mode.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@contextmanager
def reader(url: str | None = None, *, bare_sqlite: bool = False) -> Iterator[Reader]:
    """One consistent read of the job database (a single transaction).

    bare_sqlite: on a SQLite file, use the stdlib sqlite3 module instead of the
    pooled SQLAlchemy engine -- for a short-lived CLI process. Long-lived
    processes (the API, workers) keep their pool.
    """
    url = url or _database_url()
    path = sqlite_path(url) if bare_sqlite else None
    if path is not None:
        private_sqlite_file(path)
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("BEGIN")  # one snapshot for every statement of this read
            yield Reader(lambda sql, params: (dict(r) for r in conn.execute(sql, params)))
        finally:
            conn.close()  # a read-only transaction: closing rolls it back
        return
    # lazy: SQLAlchemy loads only off the bare SQLite path
    from sqlalchemy import text

    # lazy: SQLAlchemy loads only off the bare SQLite path
    from imgfarm.models.db import get_engine

    with get_engine(url).connect() as sa_conn:
        yield Reader(lambda sql, params: (dict(r._mapping) for r in sa_conn.execute(text(sql), params)))


def _shown_url(url: str) -> str:
    if url.startswith("sqlite"):
        return url
    from sqlalchemy import make_url  # lazy: a server URL came through SQLAlchemy already

    return make_url(url).render_as_string(hide_password=True)


def explain_db_error(error: BaseException, url: str | None = None) -> ServiceUnavailable | None:
    """A database failure an operator can fix, as a farm error (None for anything else).

    Why: a fresh or older database and an unreachable server are the two
    failures people meet first; a SQLAlchemy traceback names neither the
    setting nor the command that fixes them. Takes SQLAlchemy's DBAPIError
    and, from the bare SQLite reads above, sqlite3's own errors.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(error, sa_exc.DBAPIError):
        orig: BaseException = error.orig or error
        operational = isinstance(error, sa_exc.OperationalError) and not error.connection_invalidated
    elif isinstance(error, sqlite3.Error):
        orig, operational = error, isinstance(error, sqlite3.OperationalError)
    else:
        return None
    shown = _shown_url(url or _database_url())
    detail = str(orig).strip()
    text = detail.lower()
    missing_table = (  # SQLite's message; PostgreSQL's SQLSTATE 42P01 undefined_table
        "no such table" in text or getattr(orig, "sqlstate", None) == "42P01")
    if missing_table:
        return ServiceUnavailable(
            f"the job database {shown} has no imgfarm tables, or older ones",
            hint="run `imgfarm db upgrade` (creates or migrates the schema; data is kept)")
    if operational:
        if "locked" in text:
            return None
        first = detail.splitlines()[0] if detail else ""
        return ServiceUnavailable(
            f"cannot use the job database {shown}: {first}",
            hint="check IMGFARM_DATABASE_URL, and that the database server runs and "
                 "accepts this user")
    return None
