"""backup: a point-in-time snapshot of everything an account owns, in durable storage.

Every table is read in one snapshot transaction (:mod:`app.snapshot`), so the
backup is consistent even while the account keeps changing. Rows are streamed
in batches to JSON-lines members, packed with a manifest of checksums, and
stored atomically (:mod:`app.backups`): the archive appears only once complete,
and a cancelled or failed backup leaves nothing. The backup id is derived from
the job id, so a redelivered job rebuilds the same backup, or returns it when
it is already stored. After a success, backups beyond ``HEBBRIX_BACKUP_KEEP``
are pruned. ``hebbrix-jobs backups restore`` brings one back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from app.archives import COMPRESSIONS, JsonlSpool, file_digest, write_archive
from app.artifacts import LocalStore
from app.backups import (
    BACKUP_FORMAT,
    PARTS,
    SCHEMA_VERSION,
    configured_storage,
    encode_row,
    prune_backups,
    storage_for,
)
from app.models import Account, Backup, utcnow
from app.snapshot import snapshot_connection, stream_rows
from config import get_settings
from tasks.context import JobContext, JobFailed

# Share of the progress bar for reading rows; packing and storing take the rest.
READ_SHARE = 90.0


def backup_id_for(job_id: str) -> str:
    """The backup's id: the same for every attempt of one job."""
    return "bak_" + hashlib.sha256(f"backup:{job_id}".encode()).hexdigest()[:24]


def _result(backup: Backup, pruned: list[str]) -> dict[str, Any]:
    return {
        "backup_id": backup.id,
        "location": backup.location,
        "bytes": backup.bytes,
        "sha256": backup.sha256,
        "counts": backup.counts,
        "created_at": backup.created_at.isoformat(),
        "pruned": pruned,
    }


def _read(
    ctx: JobContext, conn: Connection, scratch: Path, batch_size: int
) -> tuple[list[JsonlSpool], int]:
    """Spool every table of the account; returns the spools and the deleted memories."""
    account_id = ctx.account_id
    totals = {
        part.name: int(
            conn.scalar(
                select(func.count()).select_from(part.table).where(
                    part.table.c.account_id == account_id
                )
            )
            or 0
        )
        for part in PARTS
    }
    grand_total = max(1, sum(totals.values()))
    done = 0
    deleted = 0
    spools: list[JsonlSpool] = []
    for part in PARTS:
        table = part.table
        ctx.stage = part.name
        ctx.progress(READ_SHARE * done / grand_total, f"reading {part.name}")
        spool = JsonlSpool(f"{part.name}.jsonl", scratch)
        spools.append(spool)
        stmt = select(table).where(table.c.account_id == account_id).order_by(
            table.c[part.order_by]
        )
        try:
            for batch in stream_rows(conn, stmt, batch_size):
                for row in batch:
                    spool.write(encode_row(table, row))
                    if part.name == "memories" and row.deleted_at is not None:
                        deleted += 1
                done += len(batch)
                ctx.stats[part.name] = spool.rows
                ctx.progress(READ_SHARE * done / grand_total, f"reading {part.name}")
                ctx.checkpoint()
        finally:
            spool.close()
    return spools, deleted


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    settings = get_settings()
    compression = ctx.parameters.get("compression", "tar.gz")
    backup_id = backup_id_for(ctx.job_id)
    existing = session.get(Backup, backup_id)
    if existing is not None and storage_for(existing.location).exists(existing.location):
        # An earlier attempt stored it and died before reporting it.
        session.commit()
        return _result(existing, [])
    account = session.get(Account, ctx.account_id)
    if account is None:
        raise JobFailed("account_not_found", "The account of this backup no longer exists.")
    account_info = {
        "id": account.id,
        "name": account.name,
        "created_at": account.created_at.isoformat(),
    }
    session.commit()

    storage = configured_storage()
    suffix = COMPRESSIONS[compression][0]
    with (
        LocalStore(settings.backup_dir).scratch() as scratch,
        storage.writer(ctx.account_id, backup_id, suffix) as (out, location),
    ):
        with snapshot_connection() as conn:
            # The moment the snapshot shows: its first read comes right after.
            created_at = utcnow()
            spools, deleted = _read(ctx, conn, scratch, settings.backup_batch_size)
        counts: dict[str, int] = {spool.name.removesuffix(".jsonl"): spool.rows for spool in spools}
        counts["memories_deleted"] = deleted
        manifest = {
            "format": BACKUP_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "backup_id": backup_id,
            "job_id": ctx.job_id,
            "account": account_info,
            "created_at": created_at.isoformat(),
            "counts": counts,
            "files": {spool.name: spool.entry() for spool in spools},
        }
        ctx.stage = "archive"
        ctx.progress(READ_SHARE, "writing the archive")
        write_archive(out, compression, spools, manifest)
        sha256, size = file_digest(out)
        # The last place to stop: past it the archive is stored.
        ctx.checkpoint({"stage": "store"})
        ctx.stage = "store"

    try:
        backup = session.merge(
            Backup(
                id=backup_id,
                account_id=ctx.account_id,
                job_id=ctx.job_id,
                location=location,
                bytes=size,
                sha256=sha256,
                counts=counts,
                created_at=created_at,
            )
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(location)
        raise
    ctx.stage = "prune"
    pruned = prune_backups(session, ctx.account_id, settings.backup_keep)
    return _result(backup, pruned)
