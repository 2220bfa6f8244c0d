"""Real data for the export and backup tests, and a way to hold a job at one table.

Memories are the turns of LoCoMo conversation 26 (``tests/data/locomo-26.json``),
each with its speaker, turn id and session time. ``locked_table`` takes a
PostgreSQL ACCESS EXCLUSIVE lock, so a job that reads that table waits there,
mid-run, for as long as a test needs (to cancel it or kill its worker).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from app.models import new_id
from tests.helpers import DATA

_TIME_FORMAT = "%I:%M %p on %d %B, %Y"


def locomo_memories(
    account_id: str, collection_id: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """Rows for ``app.store.insert_memories``: one per conversation turn."""
    conversation = json.loads((DATA / "locomo-26.json").read_text())
    rows: list[dict[str, Any]] = []
    session = 1
    while f"session_{session}_date_time" in conversation:
        turns = conversation.get(f"session_{session}") or []
        start = datetime.strptime(
            conversation[f"session_{session}_date_time"], _TIME_FORMAT
        ).replace(tzinfo=UTC)
        for position, turn in enumerate(turns):
            rows.append(
                {
                    "id": new_id("mem"),
                    "account_id": account_id,
                    "collection_id": collection_id,
                    "content": turn["text"],
                    "importance": (len(rows) * 7 % 11) / 10,
                    "metadata": {
                        "speaker": turn["speaker"],
                        "dia_id": turn["dia_id"],
                        "session": session,
                    },
                    "created_at": start + timedelta(seconds=30 * position),
                }
            )
            if limit is not None and len(rows) >= limit:
                return rows
        session += 1
    return rows


def _database_url() -> str:
    return os.environ["DATABASE_URL"]


@contextmanager
def locked_table(table: str) -> Iterator[psycopg.Connection[Any]]:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` until the block ends."""
    conn = psycopg.connect(_database_url())
    try:
        conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        yield conn
    finally:
        conn.rollback()
        conn.close()


def wait_for_lock_waiter(table: str, timeout: float = 30) -> None:
    """Wait until some session is blocked on a lock of ``table``."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(_database_url(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                (table,),
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.05)
    raise TimeoutError(f"nothing waited on {table} within {timeout} s")
