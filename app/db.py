"""Engine and session lifecycle, shared by the API, the workers and the CLI.

Callers own the session: views get one per request, tasks one per task, and the
functions that touch data take it as an argument.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from config import get_settings

_engine: Engine | None = None
_engine_pid: int | None = None
_session_factory: sessionmaker[Session] | None = None


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # Several processes share the file: WAL lets readers run beside the one
    # writer, and the busy timeout turns lock contention into waiting.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Build an engine for ``url`` with the settings each backend needs.

    Both hide statement parameters from SQL echo and from error messages: they
    carry job parameters (a PDF password) and content that must not reach logs.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "isolation_level": None},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)

        # pysqlite's own transaction handling defers BEGIN until the first write,
        # which lets two writers deadlock on upgrade; take the write lock up front.
        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
        hide_parameters=True,
    )


def get_engine() -> Engine:
    """The process's engine; a forked child gets a fresh pool, never the parent's."""
    global _engine, _engine_pid, _session_factory
    pid = os.getpid()
    if _engine is not None and _engine_pid != pid:
        # Inherited across a fork: drop the parent's connections without closing
        # them (they belong to the parent) and start a new pool.
        _engine.dispose(close=False)
        _engine = None
    if _engine is None:
        _engine = make_engine(get_settings().database_url)
        _engine_pid = pid
        _session_factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def reset_engine() -> None:
    """Forget the engine (after a fork or when the settings changed)."""
    global _engine, _session_factory
    if _engine is not None:
        _engine.dispose(close=_engine_pid == os.getpid())
    _engine = None
    _session_factory = None


def new_session() -> Session:
    get_engine()
    assert _session_factory is not None
    return _session_factory()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and always closes."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
