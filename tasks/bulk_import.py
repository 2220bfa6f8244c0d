"""bulk_import: fetch a source over HTTP(S) and turn it into documents and memories.

Each document is all or nothing: its row is written as ``importing``, its
memories in batches, and it becomes ``ready`` only when the last batch is in. A
failed or cancelled import removes the document it was writing. Ids are derived
from the job id and the position in the source, so a redelivered attempt skips
the documents that are ready and rewrites the one that was interrupted, and no
memory is ever written twice.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.models import Collection, Document, IndexEntry, Memory, utcnow
from app.store import insert_memories
from config import get_settings
from tasks.context import JobContext, JobFailed
from tasks.formats import (
    FormatError,
    Item,
    Limits,
    Skip,
    SourceDocument,
    detect_format,
    iter_documents,
)
from tasks.sources import SourceError, fetch_to_file, parse_allowed_hosts

BATCH_SIZE = 500
MAX_SKIP_REASONS = 100
# Share of the progress bar given to the download; parsing takes the rest.
DOWNLOAD_SHARE = 30.0


def _derived_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


def _remove_document(session: Session, document_id: str) -> None:
    memory_ids = select(Memory.id).where(Memory.document_id == document_id)
    session.execute(delete(IndexEntry).where(IndexEntry.memory_id.in_(memory_ids)))
    session.execute(delete(Memory).where(Memory.document_id == document_id))
    session.execute(delete(Document).where(Document.id == document_id))


class _Importer:
    def __init__(self, ctx: JobContext, session: Session) -> None:
        self.ctx = ctx
        self.session = session
        params = ctx.parameters
        self.collection_id: str = params["collection_id"]
        self.source_url: str = params["source_url"]
        stats = ctx.saved.get("stats") or {}
        ctx.stats.update(
            documents_created=stats.get("documents_created", 0),
            memories_created=stats.get("memories_created", 0),
            pages_processed=stats.get("pages_processed", 0),
            bytes_read=0,
        )
        self.skipped: list[dict[str, str]] = list(ctx.saved.get("skipped") or [])
        self.skipped_count: int = ctx.saved.get("skipped_count", len(self.skipped))
        self.documents_done: int = ctx.saved.get("documents_done", 0)

    def skip(self, skip: Skip) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_SKIP_REASONS:
            self.skipped.append({"reason": skip.reason, "where": skip.where})

    def _save(self) -> None:
        self.ctx.checkpoint(
            {
                "documents_done": self.documents_done,
                "skipped": self.skipped,
                "skipped_count": self.skipped_count,
                "stats": {
                    k: self.ctx.stats[k]
                    for k in ("documents_created", "memories_created", "pages_processed")
                },
            }
        )

    def import_document(self, ordinal: int, source: SourceDocument) -> None:
        session = self.session
        document_id = _derived_id("doc", self.ctx.job_id, ordinal)
        # Left over from an attempt that died mid-document: start it again.
        _remove_document(session, document_id)
        session.add(
            Document(
                id=document_id,
                account_id=self.ctx.account_id,
                collection_id=self.collection_id,
                job_id=self.ctx.job_id,
                source_url=self.source_url,
                name=source.name,
                title=source.title,
                content_type=source.content_type,
                bytes=source.bytes,
                sha256=source.sha256,
                pages=source.pages,
                status="importing",
                created_at=utcnow(),
            )
        )
        session.commit()
        batch: list[dict[str, Any]] = []
        written = 0
        try:
            for position, item in enumerate(source.items):
                if isinstance(item, Skip):
                    self.skip(item)
                    continue
                batch.append(self._row(document_id, ordinal, position, item))
                if len(batch) >= BATCH_SIZE:
                    written += self._flush(batch)
            written += self._flush(batch)
            session.execute(
                update(Document).where(Document.id == document_id).values(status="ready")
            )
            session.commit()
        except BaseException:
            session.rollback()
            _remove_document(session, document_id)
            session.commit()
            raise
        self.documents_done = ordinal + 1
        self.ctx.stats["documents_created"] += 1
        self.ctx.stats["memories_created"] += written
        self.ctx.stats["pages_processed"] += source.pages or 0
        self._save()

    def _row(self, document_id: str, ordinal: int, position: int, item: Item) -> dict[str, Any]:
        metadata = dict(item.metadata)
        if item.page is not None:
            metadata.setdefault("page", item.page)
        row: dict[str, Any] = {
            "id": _derived_id("mem", self.ctx.job_id, ordinal, position),
            "account_id": self.ctx.account_id,
            "collection_id": self.collection_id,
            "document_id": document_id,
            "content": item.content,
            "metadata": metadata,
            "created_at": item.created_at,
        }
        if item.importance is not None:
            row["importance"] = item.importance
        return row

    def _flush(self, batch: list[dict[str, Any]]) -> int:
        count = insert_memories(self.session, batch)
        self.session.commit()
        batch.clear()
        # After the commit: on SQLite a progress write waits for open writers.
        self.ctx.checkpoint()
        return count


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    settings = get_settings()
    params = ctx.parameters
    collection = session.get(Collection, params["collection_id"])
    session.commit()
    if collection is None or collection.account_id != ctx.account_id:
        raise JobFailed("collection_not_found", "The collection of this import no longer exists.")
    importer = _Importer(ctx, session)

    with tempfile.TemporaryDirectory(prefix="hebbrix-import-") as workdir:
        path = os.path.join(workdir, "source")
        ctx.stage = "download"

        def on_bytes(done: int, total: int | None) -> None:
            ctx.stats["bytes_read"] = done
            share = done / total if total else min(0.95, done / settings.import_max_bytes)
            ctx.progress(DOWNLOAD_SHARE * share, "downloading")
            ctx.checkpoint()

        try:
            with open(path, "wb") as spool:
                fetched = fetch_to_file(
                    params["source_url"],
                    spool,
                    max_bytes=settings.import_max_bytes,
                    allowed_hosts=parse_allowed_hosts(settings.import_allowed_hosts),
                    allow_private=settings.import_allow_private,
                    timeout=settings.import_timeout,
                    on_bytes=on_bytes,
                )
        except SourceError as exc:
            raise JobFailed(exc.code, exc.message) from None
        ctx.stats["bytes_read"] = fetched.bytes_read
        ctx.progress(DOWNLOAD_SHARE, "parsing")
        name = fetched.filename or "source"

        ctx.stage = "parse"
        try:
            fmt = detect_format(
                path,
                declared=params.get("format"),
                content_type=fetched.content_type,
                filename=fetched.filename,
            )

            def on_progress(fraction: float) -> None:
                ctx.progress(DOWNLOAD_SHARE + (100 - DOWNLOAD_SHARE) * fraction, "importing")

            documents = iter_documents(
                path,
                fmt,
                name=name,
                chunk_size=params.get("chunk_size", 1000),
                chunk_overlap=params.get("chunk_overlap", 100),
                password=params.get("password"),
                limits=Limits(),
                on_progress=on_progress,
            )
            for ordinal, source in enumerate(documents):
                if ordinal < importer.documents_done:
                    # Ready from an earlier attempt; drain it without writing.
                    for _ in source.items:
                        pass
                    continue
                importer.import_document(ordinal, source)
            # Archive members passed over (nested archives, unreadable files).
            for skip in documents.skipped:
                importer.skip(skip)
        except FormatError as exc:
            raise JobFailed(exc.code, exc.message) from None

    if ctx.stats["memories_created"] == 0 and importer.skipped_count:
        # Everything was passed over: that is a failed import, not an empty one.
        for ordinal in range(importer.documents_done):
            _remove_document(session, _derived_id("doc", ctx.job_id, ordinal))
        session.commit()
        ctx.stats["documents_created"] = 0
        first = importer.skipped[0]
        raise JobFailed(
            "nothing_imported",
            f"Nothing could be imported: {importer.skipped_count} item(s) were skipped, "
            f"the first ({first['where']}) because: {first['reason']}.",
            skipped={"count": importer.skipped_count, "reasons": importer.skipped[:10]},
        )
    return {
        "documents_created": ctx.stats["documents_created"],
        "memories_created": ctx.stats["memories_created"],
        "pages_processed": ctx.stats["pages_processed"],
        "bytes_read": ctx.stats["bytes_read"],
        "format": fmt,
        "skipped": {"count": importer.skipped_count, "reasons": importer.skipped},
    }
