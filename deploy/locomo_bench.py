"""What the LoCoMo benchmarks share: the corpus, a throwaway database, and an
in-process way to run a job handler exactly as a worker would.

Importing this module points the process at a temporary SQLite database before
any project module reads the configuration, so a benchmark never touches a real
deployment.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_WORKDIR = Path(tempfile.mkdtemp(prefix="hebbrix-locomo-bench-"))
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
os.environ["DATABASE_URL"] = f"sqlite:///{_WORKDIR / 'bench.db'}"
os.environ["HEBBRIX_VAR_DIR"] = str(_WORKDIR)
# Progress is written as a worker writes it, but without throttling the figures.
os.environ.setdefault("HEBBRIX_PROGRESS_INTERVAL", "0.5")

from sqlalchemy.orm import Session  # noqa: E402

from app import jobstate, migrate  # noqa: E402
from app.auth import create_account  # noqa: E402
from app.db import new_session, session_scope  # noqa: E402
from app.models import Collection, Memory, new_id  # noqa: E402
from app.store import insert_memories, search_memories  # noqa: E402
from tasks.context import JobContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_LOCOMO = REPO / ".." / "shared" / "corpus" / "locomo"
BUNDLED_LOCOMO = REPO / "tests" / "data" / "locomo-26.json"
_SESSION_KEY = re.compile(r"^session_(\d+)$")


@dataclass(frozen=True)
class Turn:
    dia_id: str
    content: str
    created_at: datetime


@dataclass(frozen=True)
class Question:
    text: str
    evidence: frozenset[str]
    category: int


@dataclass(frozen=True)
class Conversation:
    name: str
    turns: list[Turn]
    questions: list[Question]


def corpus_files() -> list[Path]:
    """The shared LoCoMo conversations, or the one bundled with the tests."""
    shared = sorted(SHARED_LOCOMO.resolve().glob("*.json")) if SHARED_LOCOMO.exists() else []
    return shared or [BUNDLED_LOCOMO]


def load_conversation(path: Path) -> Conversation:
    data = json.loads(path.read_text())
    turns: list[Turn] = []
    sessions = sorted((int(m.group(1)), key) for key in data if (m := _SESSION_KEY.match(key)))
    for _, key in sessions:
        when = datetime.strptime(data[f"{key}_date_time"], "%I:%M %p on %d %B, %Y")
        for i, turn in enumerate(data[key]):
            turns.append(
                Turn(
                    dia_id=turn["dia_id"],
                    content=f"{turn['speaker']}: {turn['text']}",
                    # Turns of a session share its date; seconds keep their order.
                    created_at=when.replace(tzinfo=UTC) + timedelta(seconds=i),
                )
            )
    known = {t.dia_id for t in turns}
    questions = []
    for qa in data["qa"]:
        # A few evidence entries hold two ids in one string ("D8:6; D9:17").
        evidence = {e for item in qa.get("evidence", []) for e in re.split(r"[;,\s]+", item)}
        evidence &= known
        if evidence:
            questions.append(Question(qa["question"], frozenset(evidence), qa.get("category", 0)))
    return Conversation(path.stem, turns, questions)


def fresh_database() -> None:
    migrate.upgrade()


def make_account(name: str) -> str:
    with session_scope() as session:
        account, _key = create_account(session, name)
        return account.id


_imports = 0


def import_conversation(account_id: str, conversation: Conversation) -> tuple[str, dict[str, str]]:
    """One memory per turn in a new collection; returns it and dia_id -> memory id.

    Memory ids follow the turns' order, so BM25 ties (broken by id) fall the same
    way in every import and the figures of two runs compare.
    """
    global _imports
    _imports += 1
    ids: dict[str, str] = {}
    with session_scope() as session:
        collection = Collection(id=new_id("col"), account_id=account_id, name=conversation.name)
        session.add(collection)
        session.flush()
        rows = []
        for position, turn in enumerate(conversation.turns):
            ids[turn.dia_id] = f"mem_bench{_imports:04d}_{position:06d}"
            rows.append(
                {
                    "id": ids[turn.dia_id],
                    "account_id": account_id,
                    "collection_id": collection.id,
                    "content": turn.content,
                    "importance": 0.5,
                    "metadata": {"dia_id": turn.dia_id},
                    "created_at": turn.created_at,
                }
            )
        insert_memories(session, rows)
        return collection.id, ids


def dia_ids(memory: Memory) -> list[str]:
    """The turns a hit stands for: its own, or those of the memories merged into it."""
    meta = memory.metadata_ or {}
    found = [meta["dia_id"]] if "dia_id" in meta else []
    found += [s["dia_id"] for s in meta.get("source_metadata", []) if "dia_id" in s]
    return found


def recall_at_k(
    session: Session,
    account_id: str,
    collection_id: str,
    questions: Iterable[Question],
    k: int = 10,
) -> tuple[float, float]:
    """Mean share of each question's evidence turns found in the top ``k`` of search.

    Two ways: by hits (a consolidated hit retrieves all its sources' turns), and
    by turns (the first ``k`` turns the hits stand for, so a hit merging five
    turns uses five of the ``k`` places: what a reader of the results pays).
    """
    by_hits, by_turns = [], []
    for question in questions:
        hits = search_memories(
            session, account_id, question.text, collection_id=collection_id, limit=k
        )
        turns = [dia for memory, _hit in hits[:k] for dia in dia_ids(memory)]
        share = len(question.evidence)
        by_hits.append(len(question.evidence.intersection(turns)) / share)
        by_turns.append(len(question.evidence.intersection(turns[:k])) / share)
    session.commit()
    n = len(by_hits) or 1
    return sum(by_hits) / n, sum(by_turns) / n


def run_handler(
    handler: Callable[[JobContext, Session], dict[str, Any]],
    job_type: str,
    account_id: str,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Run ``handler`` on a real job row, as the worker's runner does."""
    with session_scope() as session:
        job = jobstate.create_job(
            session, account_id=account_id, job_type=job_type, parameters=parameters
        )
        job_id = job.id
    with session_scope() as session:
        claim = jobstate.claim_attempt(
            session,
            job_id,
            worker="bench",
            max_attempts=1,
            previous_is_dead=lambda _job: True,
            retention_days=1,
        )
    ctx = JobContext(
        job_id=job_id,
        account_id=account_id,
        job_type=job_type,
        parameters=parameters,
        attempt=claim.attempt,
    )
    session = new_session()
    try:
        result = handler(ctx, session)
        session.commit()
    finally:
        session.close()
    with session_scope() as session:
        jobstate.complete(session, job_id, claim.attempt, result, retention_days=1)
    return result
