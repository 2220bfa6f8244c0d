"""cleanup: purge what soft deletion left behind, in bounded batches.

Memories soft-deleted longer than the grace period go with their index entries;
index entries whose memory no longer exists (orphans) go too, and so do the
account's expired artifacts (export files). Memories merged by consolidation are
kept: search resolves a consolidated memory to them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from app.artifacts import purge_expired_artifacts
from app.models import Artifact, IndexEntry, Memory, utcnow
from config import get_settings
from tasks.context import JobContext


def _purgeable_memories(account_id: str, cutoff: Any) -> Select[Any]:
    return select(Memory.id).where(
        Memory.account_id == account_id,
        Memory.deleted_at.is_not(None),
        Memory.deleted_at < cutoff,
        Memory.consolidated_into.is_(None),
    )


def _orphaned_entries(account_id: str) -> Select[Any]:
    return (
        select(IndexEntry.memory_id)
        .outerjoin(Memory, Memory.id == IndexEntry.memory_id)
        .where(IndexEntry.account_id == account_id, Memory.id.is_(None))
    )


def _entry_bytes(session: Session, ids: list[str]) -> int:
    return int(
        session.scalar(
            select(
                func.coalesce(
                    func.sum(func.length(IndexEntry.terms) + func.length(IndexEntry.vector)), 0
                )
            ).where(IndexEntry.memory_id.in_(ids))
        )
        or 0
    )


def _count(session: Session, stmt: Select[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    settings = get_settings()
    params = ctx.parameters
    days = params.get("older_than_days", settings.cleanup_grace_days)
    dry_run = bool(params.get("dry_run", False))
    batch_size = settings.cleanup_batch_size
    cutoff = utcnow() - timedelta(days=days)

    memories_q = _purgeable_memories(ctx.account_id, cutoff)
    orphans_q = _orphaned_entries(ctx.account_id)
    artifacts_q = select(Artifact.id).where(
        Artifact.account_id == ctx.account_id, Artifact.expires_at <= utcnow()
    )
    memories_total = _count(session, memories_q)
    orphans_total = _count(session, orphans_q)
    artifacts_total = _count(session, artifacts_q)
    session.commit()
    if dry_run:
        return {
            "dry_run": True,
            "older_than_days": days,
            "memories_purged": memories_total,
            "orphaned_index_entries_purged": orphans_total,
            "index_entries_purged": memories_total + orphans_total,
            "artifacts_purged": artifacts_total,
            "bytes_freed": 0,
        }

    stats = ctx.stats
    stats.update(
        memories_purged=0,
        index_entries_purged=0,
        orphaned_index_entries_purged=0,
        artifacts_purged=0,
        bytes_freed=0,
    )
    total = max(1, memories_total + orphans_total + artifacts_total)

    ctx.stage = "memories"
    while True:
        ids = list(session.scalars(memories_q.limit(batch_size)))
        if not ids:
            break
        content_bytes = session.scalar(
            select(func.coalesce(func.sum(func.length(Memory.content)), 0)).where(
                Memory.id.in_(ids)
            )
        )
        entry_bytes = _entry_bytes(session, ids)
        entries = session.execute(delete(IndexEntry).where(IndexEntry.memory_id.in_(ids))).rowcount
        session.execute(delete(Memory).where(Memory.id.in_(ids)))
        session.commit()
        stats["memories_purged"] += len(ids)
        stats["index_entries_purged"] += entries
        stats["bytes_freed"] += int(content_bytes or 0) + entry_bytes
        ctx.progress(100.0 * stats["memories_purged"] / total, "purging deleted memories")
        ctx.checkpoint()

    ctx.stage = "orphans"
    while True:
        ids = list(session.scalars(orphans_q.limit(batch_size)))
        if not ids:
            break
        entry_bytes = _entry_bytes(session, ids)
        session.execute(delete(IndexEntry).where(IndexEntry.memory_id.in_(ids)))
        session.commit()
        stats["orphaned_index_entries_purged"] += len(ids)
        stats["index_entries_purged"] += len(ids)
        stats["bytes_freed"] += entry_bytes
        done = stats["memories_purged"] + stats["orphaned_index_entries_purged"]
        ctx.progress(100.0 * done / total, "purging orphaned index entries")
        ctx.checkpoint()

    ctx.stage = "artifacts"
    while True:
        purged, freed = purge_expired_artifacts(
            session, account_id=ctx.account_id, limit=batch_size
        )
        if not purged:
            break
        stats["artifacts_purged"] += purged
        stats["bytes_freed"] += freed
        done = (
            stats["memories_purged"]
            + stats["orphaned_index_entries_purged"]
            + stats["artifacts_purged"]
        )
        ctx.progress(100.0 * done / total, "purging expired artifacts")
        ctx.checkpoint()

    return {"dry_run": False, "older_than_days": days, **stats}
