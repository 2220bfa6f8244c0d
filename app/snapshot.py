"""One consistent, read-only view of the database, for data_export and backup.

Every read of an export or a backup goes through one transaction, so the
archive shows the account at a single moment even while imports and deletes go
on. On PostgreSQL that is a REPEATABLE READ READ ONLY transaction; on SQLite a
deferred transaction on its own connection (the shared engine takes the write
lock at BEGIN, which would stall every writer for the length of the job).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Row, Select, create_engine, event
from sqlalchemy.pool import NullPool

from app.db import get_engine
from config import get_settings


@contextmanager
def snapshot_connection() -> Iterator[Connection]:
    """A connection inside a read-only snapshot transaction, rolled back at the end."""
    settings = get_settings()
    if settings.is_sqlite:
        engine = create_engine(
            settings.database_url,
            poolclass=NullPool,
            connect_args={"timeout": 30, "isolation_level": None},
        )

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Deferred: the snapshot starts at the first read and takes no write lock.
            conn.exec_driver_sql("BEGIN DEFERRED")

        try:
            with engine.connect() as conn:
                trans = conn.begin()
                try:
                    yield conn
                finally:
                    trans.rollback()
        finally:
            engine.dispose()
        return
    with get_engine().connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        trans = conn.begin()
        try:
            yield conn
        finally:
            trans.rollback()


def stream_rows(
    conn: Connection, stmt: Select[Any], batch_size: int
) -> Iterator[Sequence[Row[Any]]]:
    """The rows of ``stmt`` in batches, through a server-side cursor where there is one."""
    result = conn.execute(stmt.execution_options(stream_results=True, yield_per=batch_size))
    try:
        yield from result.partitions()
    finally:
        result.close()
