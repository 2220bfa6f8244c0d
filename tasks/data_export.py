"""data_export: an account's collections, documents and memories as a downloadable archive.

All rows are read in one snapshot (see :mod:`app.snapshot`) and streamed in
batches into one JSON-lines member per kind, then packed with a
``manifest.json`` (counts, SHA-256 per member) written last. bulk_import
recognises the manifest and imports the ``memories.jsonl`` of such an archive,
which is the round trip.

The archive is built under a temporary name and published by a rename only
after the last checkpoint, so a cancelled or failed export leaves neither a
file nor a row. The artifact id is derived from the job id: a redelivered
export rebuilds the file under the same key, and one whose artifact is already
complete just returns it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, Select, func, select
from sqlalchemy.orm import Session

from app.archives import (
    COMPRESSIONS,
    MANIFEST,
    ArchiveError,
    JsonlSpool,
    file_digest,
    open_members,
    write_archive,
)
from app.artifacts import artifact_store, download_url
from app.models import Artifact, Collection, Document, Memory, utcnow
from app.snapshot import snapshot_connection, stream_rows
from config import get_settings
from tasks.context import JobContext, JobFailed

KINDS = ("collections", "documents", "memories")
EXPORT_FORMAT = "hebbrix-export"
SCHEMA_VERSION = 1
# Share of the progress bar for reading rows; packing the archive takes the rest.
READ_SHARE = 95.0


def artifact_id_for(job_id: str) -> str:
    """The export's artifact id: the same for every attempt of one job."""
    return "art_" + hashlib.sha256(f"data_export:{job_id}".encode()).hexdigest()[:24]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _collection_line(row: Row[Any]) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "created_at": _iso(row.created_at)}


def _document_line(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "collection_id": row.collection_id,
        "source_url": row.source_url,
        "name": row.name,
        "title": row.title,
        "content_type": row.content_type,
        "bytes": row.bytes,
        "sha256": row.sha256,
        "pages": row.pages,
        "status": row.status,
        "created_at": _iso(row.created_at),
    }


def _memory_line(row: Row[Any]) -> dict[str, Any]:
    # The keys bulk_import reads back are content, importance, metadata, created_at.
    return {
        "id": row.id,
        "collection_id": row.collection_id,
        "document_id": row.document_id,
        "content": row.content,
        "importance": row.importance,
        "metadata": row.metadata or {},
        "created_at": _iso(row.created_at),
        "deleted_at": _iso(row.deleted_at),
    }


def _queries(
    account_id: str, collection_ids: list[str] | None, include_deleted: bool
) -> dict[str, tuple[Select[Any], Callable[[Row[Any]], dict[str, Any]]]]:
    c, d, m = Collection.__table__.c, Document.__table__.c, Memory.__table__.c
    collections = select(c.id, c.name, c.created_at).where(c.account_id == account_id)
    documents = select(
        d.id, d.collection_id, d.source_url, d.name, d.title, d.content_type, d.bytes,
        d.sha256, d.pages, d.status, d.created_at,
    ).where(d.account_id == account_id)
    memories = select(
        m.id, m.collection_id, m.document_id, m.content, m.importance, m.metadata,
        m.created_at, m.deleted_at,
    ).where(m.account_id == account_id)
    if collection_ids:
        collections = collections.where(c.id.in_(collection_ids))
        documents = documents.where(d.collection_id.in_(collection_ids))
        memories = memories.where(m.collection_id.in_(collection_ids))
    if not include_deleted:
        memories = memories.where(m.deleted_at.is_(None))
    # Oldest first, along the (account_id, created_at, id) indexes.
    return {
        "collections": (collections.order_by(c.created_at, c.id), _collection_line),
        "documents": (documents.order_by(d.created_at, d.id), _document_line),
        "memories": (memories.order_by(m.created_at, m.id), _memory_line),
    }


def _count(conn: Connection, stmt: Select[Any]) -> int:
    return int(conn.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)


def _read(
    ctx: JobContext,
    conn: Connection,
    scratch: Path,
    include: Sequence[str],
    queries: dict[str, tuple[Select[Any], Callable[[Row[Any]], dict[str, Any]]]],
    batch_size: int,
) -> list[JsonlSpool]:
    totals = {kind: _count(conn, queries[kind][0]) for kind in include}
    grand_total = max(1, sum(totals.values()))
    done = 0
    spools: list[JsonlSpool] = []
    for kind in include:
        stmt, line = queries[kind]
        ctx.stage = kind
        ctx.progress(READ_SHARE * done / grand_total, f"exporting {kind}")
        spool = JsonlSpool(f"{kind}.jsonl", scratch)
        spools.append(spool)
        try:
            for batch in stream_rows(conn, stmt, batch_size):
                for row in batch:
                    spool.write(line(row))
                done += len(batch)
                ctx.stats[kind] = spool.rows
                ctx.progress(READ_SHARE * done / grand_total, f"exporting {kind}")
                ctx.checkpoint()
        finally:
            spool.close()
    return spools


def _manifest_counts(path: Path) -> dict[str, int]:
    """The counts recorded in a finished export's manifest."""
    try:
        with open_members(path) as members:
            for name, stream in members:
                if name == MANIFEST:
                    return dict(json.load(stream)["counts"])
    except (ArchiveError, KeyError, ValueError):
        pass
    return {}


def _result(artifact: Artifact, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "artifact_id": artifact.id,
        "download_url": download_url(artifact.id),
        "filename": artifact.filename,
        "content_type": artifact.content_type,
        "bytes": artifact.bytes,
        "sha256": artifact.sha256,
        "counts": counts,
        "expires_at": _iso(artifact.expires_at),
    }


def _check_collections(session: Session, account_id: str, collection_ids: list[str]) -> None:
    found = set(
        session.scalars(
            select(Collection.id).where(
                Collection.account_id == account_id, Collection.id.in_(collection_ids)
            )
        )
    )
    missing = [cid for cid in collection_ids if cid not in found]
    if missing:
        raise JobFailed(
            "collection_not_found",
            f"The account has no collection {missing[0]}.",
            missing=missing[:20],
        )


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    settings = get_settings()
    params = ctx.parameters
    requested = params.get("include") or KINDS
    include = [kind for kind in KINDS if kind in requested]
    compression = params.get("compression", "zip")
    include_deleted = bool(params.get("include_deleted", False))
    collection_ids: list[str] | None = params.get("collection_ids") or None
    store = artifact_store()
    artifact_id = artifact_id_for(ctx.job_id)
    suffix, content_type = COMPRESSIONS[compression]
    filename = f"hebbrix-export-{artifact_id}{suffix}"
    key = f"exports/{ctx.account_id}/{artifact_id}{suffix}"

    existing = session.get(Artifact, artifact_id)
    if existing is not None and store.size(existing.location) == existing.bytes:
        # An earlier attempt finished the artifact and died before reporting it.
        counts = ctx.saved.get("counts") or _manifest_counts(store.path(existing.location))
        session.commit()
        return _result(existing, counts)
    if collection_ids:
        _check_collections(session, ctx.account_id, collection_ids)
    session.commit()

    created_at = utcnow()
    with store.scratch() as scratch, store.writer(key) as out:
        with snapshot_connection() as conn:
            spools = _read(
                ctx,
                conn,
                scratch,
                include,
                _queries(ctx.account_id, collection_ids, include_deleted),
                settings.export_batch_size,
            )
        counts = {spool.name.removesuffix(".jsonl"): spool.rows for spool in spools}
        manifest = {
            "format": EXPORT_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "account_id": ctx.account_id,
            "job_id": ctx.job_id,
            "created_at": created_at.isoformat(),
            "parameters": {
                "include": include,
                "collection_ids": collection_ids,
                "include_deleted": include_deleted,
            },
            "counts": counts,
            "files": {spool.name: spool.entry() for spool in spools},
        }
        ctx.stage = "archive"
        ctx.progress(READ_SHARE, "writing the archive")
        write_archive(out, compression, spools, manifest)
        sha256, size = file_digest(out)
        # The last place to stop: past it the file is published under its key.
        ctx.checkpoint({"counts": counts, "sha256": sha256, "bytes": size})

    try:
        artifact = session.merge(
            Artifact(
                id=artifact_id,
                account_id=ctx.account_id,
                job_id=ctx.job_id,
                kind="data_export",
                location=key,
                filename=filename,
                content_type=content_type,
                bytes=size,
                sha256=sha256,
                created_at=created_at,
                expires_at=created_at + timedelta(days=settings.artifact_retention_days),
            )
        )
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    return _result(artifact, counts)
