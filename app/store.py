"""Writing and reading the memory store; shared by the API and the job handlers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.models import IndexEntry, Memory, MemoryFeedback, Policy, utcnow
from app.search import (
    Candidate,
    Hit,
    bm25,
    index_row,
    policy_order,
    ranking_features,
    weight_vector,
)
from config import get_settings


def insert_ignoring_duplicates(session: Session, table: Table, key: str) -> Insert:
    """INSERT that skips rows whose key exists: what makes a repeated batch harmless."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])


def insert_memories(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert memories and their index entries in two batched statements.

    Each row has ``id, account_id, collection_id, content`` and optionally
    ``document_id, importance, metadata, created_at``. Rows whose id already
    exists are skipped, so a handler that gives deterministic ids can repeat a
    batch safely. Returns how many rows were given.
    """
    if not rows:
        return 0
    now = utcnow()
    memories = []
    entries = []
    for row in rows:
        created_at: datetime = row.get("created_at") or now
        memories.append(
            {
                "id": row["id"],
                "account_id": row["account_id"],
                "collection_id": row["collection_id"],
                "document_id": row.get("document_id"),
                "content": row["content"],
                "importance": row.get("importance", 0.5),
                "metadata": row.get("metadata") or {},
                "created_at": created_at,
                "access_count": 0,
            }
        )
        entry = index_row(row["content"])
        entries.append(
            {
                "memory_id": row["id"],
                "account_id": row["account_id"],
                "collection_id": row["collection_id"],
                "terms": entry.terms,
                "vector": entry.vector,
                "created_at": now,
            }
        )
    # Through the tables, so rows use column names ("metadata", not "metadata_").
    session.execute(insert_ignoring_duplicates(session, Memory.__table__, "id"), memories)
    session.execute(insert_ignoring_duplicates(session, IndexEntry.__table__, "memory_id"), entries)
    return len(rows)


def search_memories(
    session: Session,
    account_id: str,
    query: str,
    *,
    collection_id: str | None = None,
    limit: int = 10,
    candidates: int | None = None,
) -> list[tuple[Memory, Hit]]:
    """BM25 search over the live memories of an account (optionally one collection)."""
    stmt = (
        select(IndexEntry.memory_id, IndexEntry.terms, IndexEntry.vector)
        .join(Memory, Memory.id == IndexEntry.memory_id)
        .where(IndexEntry.account_id == account_id, Memory.deleted_at.is_(None))
    )
    if collection_id is not None:
        stmt = stmt.where(IndexEntry.collection_id == collection_id)
    hits = bm25(query, session.execute(stmt), limit=candidates or limit)
    if not hits:
        return []
    by_id = {
        m.id: m
        for m in session.scalars(select(Memory).where(Memory.id.in_([h.memory_id for h in hits])))
    }
    return [(by_id[h.memory_id], h) for h in hits if h.memory_id in by_id]


def consolidation_sources(
    session: Session, account_id: str, memory_ids: Sequence[str]
) -> dict[str, list[Memory]]:
    """The memories that consolidation merged into each of ``memory_ids``, oldest first."""
    if not memory_ids:
        return {}
    found: dict[str, list[Memory]] = {}
    rows = session.scalars(
        select(Memory)
        .where(Memory.account_id == account_id, Memory.consolidated_into.in_(memory_ids))
        .order_by(Memory.created_at, Memory.id)
    )
    for memory in rows:
        found.setdefault(memory.consolidated_into or "", []).append(memory)
    return found


def memory_candidate(memory: Memory, hit: Hit | None = None, rank: int | None = None) -> Candidate:
    """What the ranking features of ``memory`` are computed from."""
    return Candidate(
        memory_id=memory.id,
        content=memory.content,
        created_at=memory.created_at.timestamp(),
        importance=memory.importance,
        access_count=memory.access_count or 0,
        bm25=None if hit is None else hit.score,
        bm25_rank=rank,
    )


def latest_policy(session: Session, account_id: str) -> Policy | None:
    """The account's newest trained ranking policy, if it has one."""
    return session.scalars(
        select(Policy).where(Policy.account_id == account_id).order_by(Policy.version.desc())
    ).first()


def rerank_hits(
    policy: Policy, query: str, hits: Sequence[tuple[Memory, Hit]]
) -> list[tuple[Memory, Hit, float]]:
    """Re-order BM25 ``hits`` (best first) by ``policy``; each with its policy score."""
    candidates = [memory_candidate(m, h, rank) for rank, (m, h) in enumerate(hits)]
    order, scores = policy_order(ranking_features(query, candidates), weight_vector(policy.weights))
    return [(hits[i][0], hits[i][1], round(float(scores[i]), 6)) for i in order]


def feedback_shortfall(session: Session, account_id: str) -> str | None:
    """Why the account has too little feedback for rl_training to learn from, or None."""
    settings = get_settings()
    rows, queries = session.execute(
        select(func.count(), func.count(func.distinct(MemoryFeedback.query))).where(
            MemoryFeedback.account_id == account_id
        )
    ).one()
    need_rows, need_queries = settings.rl_min_feedback_rows, settings.rl_min_feedback_queries
    if rows >= need_rows and queries >= need_queries:
        return None
    return (
        f"rl_training needs at least {need_rows} feedback ratings over at least "
        f"{need_queries} distinct queries to learn from; this account has {rows} over "
        f"{queries}. Rate search results with POST /v1/memories/{{id}}/feedback first."
    )
