"""Engines and sessions for the job database (SQLite by default, PostgreSQL in production).

SQLite is used from many threads (one per waiting job) and from the API
process at once, so it runs in WAL mode with a long busy timeout, and every
transaction starts with BEGIN IMMEDIATE: a deferred transaction that reads
and then writes can fail at once with "database is locked" instead of
waiting, which would turn load into spurious job failures. Keep
sessions short: no file I/O or driver calls inside one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from imgfarm.config.settings import get_settings
from imgfarm.models.dbapi import private_sqlite_file

_engines: dict[str, Engine] = {}
_makers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()
_local = threading.local()


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    private_sqlite_file(path)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 60, "isolation_level": None},
        pool_size=16,
        max_overflow=64,
        pool_timeout=120,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite"):
                _engines[url] = _sqlite_engine(url)
            else:
                _engines[url] = create_engine(
                    url, pool_size=10, max_overflow=40, pool_timeout=120, pool_pre_ping=True
                )
            _makers[url] = sessionmaker(_engines[url], expire_on_commit=False)
        return _engines[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    url = url or get_settings().database_url
    get_engine(url)
    if getattr(_local, "depth", 0) and url.startswith("sqlite"):
        # With BEGIN IMMEDIATE the outer session holds the write lock: an
        # inner one would wait for it forever. Fail loudly instead.
        raise RuntimeError("nested session_scope() on SQLite would deadlock")
    session = _makers[url]()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        _local.depth -= 1
        session.close()


def dispose_all(close: bool = True) -> None:
    """Drop every pooled connection (in tests; after fork with close=False, so
    the parent's connections are left alone, as SQLAlchemy advises)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        _makers.clear()
