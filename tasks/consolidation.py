"""consolidation: merge groups of old, similar, unimportant memories into one each.

Per collection, the live memories older than ``older_than_days`` and no more
important than ``keep_importance_above`` are read oldest first in windows of
``WINDOW_SIZE`` (so memory use does not grow with the collection). Within a
window, memories whose index vectors are all pairwise at least
``similarity_threshold`` alike form a group of at most ``max_group_size``. Each
group becomes one new memory holding every distinct sentence of its sources
once; the sources are soft-deleted with ``consolidated_into`` pointing at it,
so search can still resolve a hit to them and cleanup keeps them.

Each group is one transaction (the new memory and the soft-deletes together),
so a cancel or a crash never leaves half a group. The new memory's id is derived
from the job id and the group's members, and a redelivered attempt resumes at
the window it was in: merged sources are no longer candidates, so nothing is
merged twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Collection, IndexEntry, Memory, utcnow
from app.search import terms, vector_from_bytes
from app.store import insert_memories
from tasks.context import JobContext, JobFailed

# The defaults are what the daily scheduled run (empty parameters) uses, so they
# are conservative: on LoCoMo conversations they merge only near-restatements
# and leave search recall@10 as it was (deploy/bench_consolidation.py measures it;
# from 0.6 down, recall counted in retrieved turns starts to slip).
DEFAULT_OLDER_THAN_DAYS = 30
DEFAULT_SIMILARITY_THRESHOLD = 0.65
DEFAULT_KEEP_IMPORTANCE_ABOVE = 0.7
DEFAULT_MAX_GROUP_SIZE = 10

# Memories compared at a time; the similarity matrix is WINDOW_SIZE squared.
WINDOW_SIZE = 1000
# A dry run lists at most this many groups (the counts cover all of them).
MAX_LISTED_GROUPS = 500
# Two sentences with this share of their terms in common say the same thing.
NEAR_DUPLICATE_OVERLAP = 0.8

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# "Speaker: text", the usual shape of a conversational memory: the label is kept
# in front of the line and not counted as part of the sentences.
_LABEL = re.compile(r"^([A-Z][\w.' -]{0,38}):\s+")
_WORDS = re.compile(r"[a-z0-9']+")
# Stopwords to the index (but "never"), yet dropping them would merge a sentence
# with its negation.
_NEGATIONS = frozenset({"no", "not", "nor", "never"})


@dataclass(frozen=True)
class _Source:
    id: str
    content: str
    importance: float
    metadata: dict[str, Any]
    created_at: datetime
    document_id: str | None
    vector: np.ndarray


def _derived_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


def _signature(sentence: str) -> frozenset[str]:
    words = _WORDS.findall(sentence.lower())
    return frozenset(terms(sentence)) | _NEGATIONS.intersection(words)


def _negations(sig: frozenset[str]) -> frozenset[str]:
    return frozenset(w for w in sig if w in _NEGATIONS or w.endswith("n't"))


def _is_repeat(sig: frozenset[str], text: str, kept: list[tuple[frozenset[str], str]]) -> bool:
    negations = _negations(sig)
    for kept_sig, kept_text in kept:
        if _negations(kept_sig) != negations:
            continue  # "did" and "did not" are two facts, however alike
        if not sig or not kept_sig:
            # Nothing but stopwords ("Me too!"): only the very same words repeat it.
            if _WORDS.findall(text.lower()) == _WORDS.findall(kept_text.lower()):
                return True
            continue
        if sig == kept_sig or (sig < kept_sig and len(sig) >= 2):
            return True
        if len(sig & kept_sig) / len(sig | kept_sig) >= NEAR_DUPLICATE_OVERLAP:
            return True
    return False


def merge_contents(contents: Sequence[str]) -> str:
    """One text with every distinct sentence of ``contents`` once, in their order.

    A sentence is dropped when an earlier one with the same line label says the
    same: the same normalised terms, a strict subset of them, or an overlap of
    at least ``NEAR_DUPLICATE_OVERLAP``. Lines keep their label ("Speaker:").
    """
    kept: dict[str, list[tuple[frozenset[str], str]]] = {}
    lines: list[str] = []
    for content in contents:
        for line in content.splitlines():
            line = line.strip()
            if not line:
                continue
            match = _LABEL.match(line)
            label = match.group(1) if match else ""
            body = line[match.end() :] if match else line
            seen = kept.setdefault(label, [])
            fresh = []
            for sentence in _SENTENCE_BREAK.split(body):
                sentence = sentence.strip()
                if not sentence:
                    continue
                sig = _signature(sentence)
                if _is_repeat(sig, sentence, seen):
                    continue
                seen.append((sig, sentence))
                fresh.append(sentence)
            if fresh:
                lines.append((f"{label}: " if label else "") + " ".join(fresh))
    return "\n".join(lines)


def group_similar(vectors: np.ndarray, threshold: float, max_size: int) -> list[list[int]]:
    """Greedy complete-link groups: every pair in a group is ``threshold`` alike.

    Seeds are taken in the given order; each takes its most similar unassigned
    neighbours that are alike to every member so far. Deterministic.
    """
    n = len(vectors)
    if n < 2:
        return []
    sims = vectors @ vectors.T
    assigned = np.zeros(n, dtype=bool)
    groups: list[list[int]] = []
    for seed in range(n):
        if assigned[seed]:
            continue
        near = np.flatnonzero((sims[seed] >= threshold) & ~assigned)
        near = near[near != seed]
        if not len(near):
            continue
        members = [seed]
        for j in near[np.argsort(-sims[seed, near], kind="stable")]:
            if len(members) >= max_size:
                break
            if float(sims[j, members].min()) >= threshold:
                members.append(int(j))
        if len(members) > 1:
            assigned[members] = True
            groups.append(members)
    return groups


class _Consolidator:
    def __init__(self, ctx: JobContext, session: Session) -> None:
        params = ctx.parameters
        self.ctx = ctx
        self.session = session
        self.older_than_days: int = params.get("older_than_days", DEFAULT_OLDER_THAN_DAYS)
        self.threshold: float = params.get("similarity_threshold", DEFAULT_SIMILARITY_THRESHOLD)
        self.keep_above: float = params.get("keep_importance_above", DEFAULT_KEEP_IMPORTANCE_ABOVE)
        self.max_group_size: int = params.get("max_group_size", DEFAULT_MAX_GROUP_SIZE)
        self.dry_run = bool(params.get("dry_run", False))
        self.cutoff = utcnow() - timedelta(days=self.older_than_days)
        # A dry run writes nothing, so a redelivered one simply starts over.
        saved = {} if self.dry_run else ctx.saved
        ctx.stats.update(
            {
                "memories_scanned": 0,
                "groups": 0,
                "memories_merged": 0,
                "memories_created": 0,
                "bytes_before": 0,
                "bytes_after": 0,
                "groups_skipped": 0,
                **saved.get("stats", {}),
            }
        )
        self.resume_collection: str | None = saved.get("collection")
        self.resume_cursor: list[str] | None = saved.get("cursor")
        # Memories merged in the window being worked on, counted as scanned at its end.
        self.window_merged: int = saved.get("window_merged", 0)
        self.planned: list[list[str]] = []
        pending = saved.get("pending")
        if pending and session.get(Memory, pending["id"]) is not None:
            # The attempt died between committing this group and saying so.
            self._count(pending["sources"], pending["bytes_before"], pending["bytes_after"])
        session.commit()

    def _count(self, merged: int, bytes_before: int, bytes_after: int) -> None:
        stats = self.ctx.stats
        stats["groups"] += 1
        stats["memories_merged"] += merged
        stats["memories_created"] += 0 if self.dry_run else 1
        stats["bytes_before"] += bytes_before
        stats["bytes_after"] += bytes_after
        self.window_merged += merged

    def _candidates(self, collection_ids: list[str]) -> Any:
        stmt = (
            select(
                Memory.id,
                Memory.content,
                Memory.importance,
                Memory.metadata_,
                Memory.created_at,
                Memory.document_id,
                IndexEntry.vector,
            )
            .join(IndexEntry, IndexEntry.memory_id == Memory.id)
            .where(
                Memory.account_id == self.ctx.account_id,
                Memory.deleted_at.is_(None),
                Memory.consolidated_into.is_(None),
                Memory.importance <= self.keep_above,
                Memory.created_at < self.cutoff,
            )
        )
        if len(collection_ids) == 1:
            return stmt.where(Memory.collection_id == collection_ids[0])
        return stmt.where(Memory.collection_id.in_(collection_ids))

    def _save(self, collection_id: str, cursor: list[str] | None, pending: Any = None) -> None:
        if self.dry_run:
            self.ctx.checkpoint()
            return
        self.ctx.checkpoint(
            {
                "collection": collection_id,
                "cursor": cursor,
                "window_merged": self.window_merged,
                "stats": dict(self.ctx.stats),
                "pending": pending,
            }
        )

    def run(self, collection_ids: list[str]) -> None:
        total = max(
            1,
            int(
                self.session.scalar(
                    select(func.count()).select_from(self._candidates(collection_ids).subquery())
                )
                or 0
            ),
        )
        self.session.commit()
        for collection_id in collection_ids:
            if self.resume_collection is not None and collection_id < self.resume_collection:
                continue  # finished by an earlier attempt
            cursor = self.resume_cursor if collection_id == self.resume_collection else None
            self.ctx.stage = f"collection {collection_id}"
            self._run_collection(collection_id, cursor, total)

    def _run_collection(self, collection_id: str, cursor: list[str] | None, total: int) -> None:
        base = self._candidates([collection_id]).order_by(Memory.created_at, Memory.id)
        while True:
            stmt = base
            if cursor is not None:
                after, after_id = datetime.fromisoformat(cursor[0]), cursor[1]
                stmt = stmt.where(
                    or_(
                        Memory.created_at > after,
                        and_(Memory.created_at == after, Memory.id > after_id),
                    )
                )
            # Merged by an earlier attempt in this window: gone from the rows, yet scanned.
            carried = self.window_merged
            rows = self.session.execute(stmt.limit(WINDOW_SIZE)).all()
            # End the read before the checkpoints below write (SQLite has one writer).
            self.session.commit()
            if not rows:
                return
            sources = [
                _Source(
                    id=row.id,
                    content=row.content,
                    importance=row.importance,
                    metadata=row.metadata_ or {},
                    created_at=row.created_at,
                    document_id=row.document_id,
                    vector=vector_from_bytes(row.vector),
                )
                for row in rows
                # An earlier consolidation is not merged again, so a memory's
                # content never grows past one group's worth.
                if "consolidated_from" not in (row.metadata_ or {})
            ]
            if sources:
                groups = group_similar(
                    np.stack([s.vector for s in sources]), self.threshold, self.max_group_size
                )
                for members in groups:
                    self._merge(collection_id, cursor, [sources[i] for i in members])
            self.ctx.stats["memories_scanned"] += len(sources) + carried
            self.window_merged = 0
            last = rows[-1]
            cursor = [last.created_at.isoformat(), last.id]
            self._save(collection_id, cursor)
            self.ctx.progress(
                min(99.0, 100.0 * self.ctx.stats["memories_scanned"] / total), "consolidating"
            )
            if len(rows) < WINDOW_SIZE:
                return

    def _merge(self, collection_id: str, cursor: list[str] | None, group: list[_Source]) -> None:
        group.sort(key=lambda s: (s.created_at, s.id))
        ids = [s.id for s in group]
        key = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
        new_id = _derived_id("mem", self.ctx.job_id, key)
        content = merge_contents([s.content for s in group])
        bytes_before = sum(len(s.content.encode()) for s in group)
        bytes_after = len(content.encode())
        if self.dry_run:
            if len(self.planned) < MAX_LISTED_GROUPS:
                self.planned.append(ids)
            self._count(len(ids), bytes_before, bytes_after)
            self.ctx.checkpoint()
            return
        # Said before the group is written, so a successor attempt can tell
        # whether it was (and count it); also where a cancel stops the run.
        self._save(
            collection_id,
            cursor,
            pending={
                "id": new_id,
                "sources": len(ids),
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
            },
        )
        documents = {s.document_id for s in group}
        insert_memories(
            self.session,
            [
                {
                    "id": new_id,
                    "account_id": self.ctx.account_id,
                    "collection_id": collection_id,
                    "document_id": documents.pop() if len(documents) == 1 else None,
                    "content": content,
                    "importance": max(s.importance for s in group),
                    "created_at": group[-1].created_at,
                    "metadata": {
                        "consolidated_from": ids,
                        "source_metadata": [s.metadata for s in group],
                        # When each source was made: the merged memory has one date only.
                        "source_created_at": [s.created_at.isoformat() for s in group],
                        "consolidation_job_id": self.ctx.job_id,
                    },
                }
            ],
        )
        merged = self.session.execute(
            update(Memory)
            .where(
                Memory.id.in_(ids),
                Memory.deleted_at.is_(None),
                Memory.consolidated_into.is_(None),
                Memory.importance <= self.keep_above,
            )
            .values(deleted_at=utcnow(), consolidated_into=new_id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if merged != len(ids):
            # A source was deleted or changed since the window was read: leave the
            # whole group alone rather than merge part of it.
            self.session.rollback()
            self.ctx.stats["groups_skipped"] += 1
            return
        self.session.commit()
        self._count(len(ids), bytes_before, bytes_after)

    def result(self) -> dict[str, Any]:
        stats = self.ctx.stats
        result: dict[str, Any] = {
            "dry_run": self.dry_run,
            "older_than_days": self.older_than_days,
            "similarity_threshold": self.threshold,
            "keep_importance_above": self.keep_above,
            "max_group_size": self.max_group_size,
            **{
                key: stats[key]
                for key in (
                    "memories_scanned",
                    "groups",
                    "memories_merged",
                    "memories_created",
                    "bytes_before",
                    "bytes_after",
                    "groups_skipped",
                )
            },
        }
        if self.dry_run:
            result["planned_groups"] = self.planned
            result["planned_groups_truncated"] = stats["groups"] > len(self.planned)
        return result


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    collection_id = ctx.parameters.get("collection_id")
    if collection_id is not None:
        collection = session.get(Collection, collection_id)
        if collection is None or collection.account_id != ctx.account_id:
            raise JobFailed(
                "collection_not_found", "The collection to consolidate no longer exists."
            )
        collection_ids = [collection_id]
    else:
        collection_ids = list(
            session.scalars(
                select(Collection.id)
                .where(Collection.account_id == ctx.account_id)
                .order_by(Collection.id)
            )
        )
    session.commit()
    consolidator = _Consolidator(ctx, session)
    consolidator.run(collection_ids)
    ctx.progress(100.0, "done")
    return consolidator.result()
