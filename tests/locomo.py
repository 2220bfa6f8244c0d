"""LoCoMo conversation 26 as the consolidation and rl_training tests use it.

One memory per turn, ``"Speaker: text"``, importance 0.5, the session's date
(long past any age threshold), ``dia_id`` in metadata; and the questions with
the ``dia_id``s of the turns that answer them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from app.db import session_scope
from app.models import new_id
from app.store import insert_memories
from tests.helpers import DATA

_TIME_FORMAT = "%I:%M %p on %d %B, %Y"


@dataclass(frozen=True)
class Question:
    text: str
    evidence: frozenset[str]


def _conversation() -> dict[str, Any]:
    path = DATA / "locomo-26.json"
    if not path.exists():
        path = DATA / "26.json"
    return json.loads(path.read_text())


def turns() -> list[tuple[str, str, datetime]]:
    """``(dia_id, content, created_at)`` of every turn, in order."""
    conversation = _conversation()
    found = []
    session = 1
    while f"session_{session}_date_time" in conversation:
        when = datetime.strptime(conversation[f"session_{session}_date_time"], _TIME_FORMAT)
        for position, turn in enumerate(conversation.get(f"session_{session}") or []):
            found.append(
                (
                    turn["dia_id"],
                    f"{turn['speaker']}: {turn['text']}",
                    when.replace(tzinfo=UTC) + timedelta(seconds=position),
                )
            )
        session += 1
    return found


def questions() -> list[Question]:
    known = {dia for dia, _, _ in turns()}
    found = []
    for qa in _conversation()["qa"]:
        # A few evidence entries hold two ids in one string ("D8:6; D9:17").
        evidence = {e for item in qa.get("evidence", []) for e in re.split(r"[;,\s]+", item)}
        if evidence & known:
            found.append(Question(qa["question"], frozenset(evidence & known)))
    return found


def import_turns(
    account_id: str, collection_id: str, copies: int = 1, importance: float = 0.5
) -> dict[str, list[str]]:
    """Insert the turns (each ``copies`` times); returns dia_id -> memory ids."""
    ids: dict[str, list[str]] = {}
    rows = []
    for dia, content, created_at in turns():
        for _ in range(copies):
            memory_id = new_id("mem")
            ids.setdefault(dia, []).append(memory_id)
            rows.append(
                {
                    "id": memory_id,
                    "account_id": account_id,
                    "collection_id": collection_id,
                    "content": content,
                    "importance": importance,
                    "metadata": {"dia_id": dia},
                    "created_at": created_at,
                }
            )
    with session_scope() as session:
        for start in range(0, len(rows), 1000):
            insert_memories(session, rows[start : start + 1000])
    return ids
