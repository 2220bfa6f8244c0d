"""Account backups: their format, where they are stored, and how they come back.

A backup is an archive (tar.gz by default) with one JSON-lines member per
table the account owns, every column of every row, and a ``manifest.json``
with the SHA-256, size and row count of each member. The SHA-256 of the whole
archive is kept in the ``backups`` row.

Storage is a local directory (written atomically and fsync'd) or, with
``HEBBRIX_BACKUP_S3_URL``, an S3-compatible bucket. A backup's ``location``
names where it is (a path or an ``s3://`` URL), so a restore finds it whatever
the current configuration says.

A restore verifies the archive's checksum and every member's checksum before it
writes anything, then replaces the account's rows (or fills a new account) in
one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from sqlalchemy import LargeBinary, Table, delete, insert, select
from sqlalchemy.orm import Session

from app.archives import MANIFEST, ArchiveError, iter_jsonl, open_members, path_digest
from app.artifacts import atomic_file
from app.auth import create_account
from app.models import (
    Account,
    Backup,
    Collection,
    Document,
    IndexEntry,
    Memory,
    MemoryFeedback,
    Policy,
    UTCDateTime,
)
from config import get_settings

BACKUP_FORMAT = "hebbrix-backup"
SCHEMA_VERSION = 1
INSERT_BATCH = 500


@dataclass(frozen=True)
class TablePart:
    """One table in a backup: its member name and the column that orders it."""

    name: str
    table: Table
    order_by: str


# In restore order: a row's foreign keys point only at members above it.
PARTS: tuple[TablePart, ...] = (
    TablePart("collections", Collection.__table__, "id"),
    TablePart("documents", Document.__table__, "id"),
    TablePart("memories", Memory.__table__, "id"),
    TablePart("index_entries", IndexEntry.__table__, "memory_id"),
    TablePart("memory_feedback", MemoryFeedback.__table__, "id"),
    TablePart("policies", Policy.__table__, "id"),
)


class BackupError(Exception):
    """A backup that cannot be restored; the message says why, for the operator."""


class BackupNotFound(BackupError):
    pass


class BackupDamaged(BackupError):
    pass


# --- rows <-> JSON lines ------------------------------------------------------


def encode_row(table: Table, row: Any) -> dict[str, Any]:
    """Every column of ``row`` as JSON: times in ISO 8601, bytes in base64."""
    line: dict[str, Any] = {}
    for column in table.columns:
        value = row._mapping[column]
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes | memoryview):
            value = base64.b64encode(bytes(value)).decode()
        line[column.name] = value
    return line


def decode_row(table: Table, line: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column in table.columns:
        if column.name not in line:
            continue
        value = line[column.name]
        if value is not None:
            if isinstance(column.type, UTCDateTime):
                value = datetime.fromisoformat(value)
            elif isinstance(column.type, LargeBinary):
                value = base64.b64decode(value)
        row[column.name] = value
    return row


# --- storage ------------------------------------------------------------------


# What a storage's writer yields: the file to write the archive to, and its location.
Destination = tuple[IO[bytes], str]


class BackupStorage(Protocol):
    def writer(
        self, account_id: str, backup_id: str, suffix: str
    ) -> AbstractContextManager[Destination]: ...

    def fetch(self, location: str) -> AbstractContextManager[Path]: ...

    def exists(self, location: str) -> bool: ...

    def delete(self, location: str) -> None: ...


class LocalBackupStorage:
    """Backups as files under one directory: ``<dir>/<account>/<backup><suffix>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def writer(self, account_id: str, backup_id: str, suffix: str) -> Iterator[Destination]:
        final = self.root / account_id / f"{backup_id}{suffix}"
        with atomic_file(final) as out:
            yield out, str(final)

    @contextmanager
    def fetch(self, location: str) -> Iterator[Path]:
        path = Path(location)
        if not path.is_file():
            raise BackupNotFound(f"The backup file {location} is missing.")
        yield path

    def exists(self, location: str) -> bool:
        return Path(location).is_file()

    def delete(self, location: str) -> None:
        Path(location).unlink(missing_ok=True)


class S3BackupStorage:
    """Backups as objects in an S3-compatible bucket: ``s3://bucket/prefix/...``.

    The archive is built in a local temporary file and uploaded once complete;
    S3 shows an object only when its upload has finished, which is the
    atomicity the local store gets from a rename.
    """

    def __init__(self, url: str, endpoint_url: str = "", region: str = "us-east-1") -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError as exc:  # an optional dependency: say how to get it
                raise BackupError(
                    "S3 backups need boto3: pip install 'hebbrix-jobs[s3]'."
                ) from exc
            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region
            )
        return self._client

    def _split(self, location: str) -> tuple[str, str]:
        parsed = urlparse(location)
        return parsed.netloc, parsed.path.lstrip("/")

    @contextmanager
    def writer(self, account_id: str, backup_id: str, suffix: str) -> Iterator[Destination]:
        key = "/".join(p for p in (self.prefix, account_id, f"{backup_id}{suffix}") if p)
        location = f"s3://{self.bucket}/{key}"
        with tempfile.TemporaryFile(prefix="hebbrix-backup-") as out:
            yield out, location
            out.flush()
            out.seek(0)
            self.client.upload_fileobj(out, self.bucket, key)

    @contextmanager
    def fetch(self, location: str) -> Iterator[Path]:
        bucket, key = self._split(location)
        workdir = Path(tempfile.mkdtemp(prefix="hebbrix-restore-"))
        try:
            path = workdir / "backup"
            try:
                self.client.download_file(bucket, key, str(path))
            except Exception as exc:  # botocore's errors are not importable without it
                raise BackupNotFound(f"The backup object {location} cannot be read: {exc}") from exc
            yield path
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def exists(self, location: str) -> bool:
        bucket, key = self._split(location)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except Exception:
            return False
        return True

    def delete(self, location: str) -> None:
        bucket, key = self._split(location)
        self.client.delete_object(Bucket=bucket, Key=key)


def configured_storage() -> BackupStorage:
    """Where new backups go, from the settings."""
    settings = get_settings()
    if settings.backup_s3_url:
        return S3BackupStorage(
            settings.backup_s3_url, settings.backup_s3_endpoint_url, settings.backup_s3_region
        )
    return LocalBackupStorage(settings.backup_dir)


def storage_for(location: str) -> BackupStorage:
    """The storage that holds an existing backup, whatever new backups use now."""
    settings = get_settings()
    if location.startswith("s3://"):
        return S3BackupStorage(
            location, settings.backup_s3_endpoint_url, settings.backup_s3_region
        )
    return LocalBackupStorage(settings.backup_dir)


# --- listing and pruning -------------------------------------------------------


def list_backups(session: Session, account_id: str) -> list[Backup]:
    """An account's backups, newest first."""
    return list(
        session.scalars(
            select(Backup)
            .where(Backup.account_id == account_id)
            .order_by(Backup.created_at.desc(), Backup.id.desc())
        )
    )


def prune_backups(session: Session, account_id: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest backups of an account; returns their ids.

    Each object is deleted before its row, so a crash leaves a row pointing at
    nothing (which the next prune removes), never an object nobody knows of.
    """
    pruned = []
    # At least one is kept: the backup that was just made.
    for backup in list_backups(session, account_id)[max(keep, 1) :]:
        storage_for(backup.location).delete(backup.location)
        session.delete(backup)
        session.commit()
        pruned.append(backup.id)
    return pruned


# --- restore -----------------------------------------------------------------


@dataclass
class RestoreResult:
    backup_id: str
    account_id: str
    in_place: bool
    counts: dict[str, int] = field(default_factory=dict)
    # Set when the backup went into a new account: its first API key, shown once.
    api_key: str | None = None


def _verify(path: Path, backup: Backup) -> dict[str, Any]:
    """Check the archive and each member against their checksums; return the manifest."""
    sha256, size = path_digest(path)
    if sha256 != backup.sha256 or size != backup.bytes:
        raise BackupDamaged(
            f"Backup {backup.id} is damaged: its checksum does not match the one recorded "
            "when it was made. Nothing was restored."
        )
    seen: dict[str, tuple[str, int]] = {}
    manifest: Any = None
    try:
        with open_members(path) as members:
            for name, stream in members:
                if name == MANIFEST:
                    manifest = json.load(stream)
                    continue
                digest = hashlib.sha256()
                count = 0
                while block := stream.read(1024 * 1024):
                    digest.update(block)
                    count += len(block)
                seen[name] = (digest.hexdigest(), count)
    except (ArchiveError, ValueError) as exc:
        message = f"Backup {backup.id} cannot be read: {exc} Nothing was restored."
        raise BackupDamaged(message) from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != BACKUP_FORMAT
        or manifest.get("schema_version") != SCHEMA_VERSION
        or not isinstance(manifest.get("files"), dict)
    ):
        raise BackupDamaged(f"Backup {backup.id} has no valid manifest. Nothing was restored.")
    account = manifest.get("account")
    if (
        manifest.get("backup_id") != backup.id
        or not isinstance(account, dict)
        or account.get("id") != backup.account_id
    ):
        raise BackupDamaged(
            f"The archive stored for {backup.id} belongs to another backup. Nothing was restored."
        )
    for part in PARTS:
        name = f"{part.name}.jsonl"
        expected = manifest["files"].get(name)
        if not isinstance(expected, dict):
            raise BackupDamaged(f"Backup {backup.id} lacks {name}. Nothing was restored.")
        if seen.get(name) != (expected.get("sha256"), expected.get("bytes")):
            raise BackupDamaged(
                f"Backup {backup.id} is damaged: {name} does not match its checksum in the "
                "manifest. Nothing was restored."
            )
    return manifest


def _fresh_id(account_id: str, old: str) -> str:
    """A new id for ``old`` in ``account_id``: the same every time, so references agree."""
    prefix = old.split("_", 1)[0]
    return f"{prefix}_" + hashlib.sha256(f"{account_id}:{old}".encode()).hexdigest()[:24]


def _remap(part: str, row: dict[str, Any], account_id: str) -> dict[str, Any]:
    """A row of another account rewritten for a new one, every reference consistent."""
    row["account_id"] = account_id

    def fresh(key: str) -> None:
        if row.get(key) is not None:
            row[key] = _fresh_id(account_id, row[key])

    if part in ("collections", "documents", "memories", "policies"):
        fresh("id")
    if part in ("documents", "memories", "index_entries"):
        fresh("collection_id")
    if part == "memories":
        fresh("document_id")
        fresh("consolidated_into")
    if part in ("index_entries", "memory_feedback"):
        fresh("memory_id")
    if part == "memory_feedback":
        row.pop("id", None)  # a new serial number
    if part in ("documents", "policies"):
        row["job_id"] = None  # those jobs belong to the other account
    return row


def _delete_account_rows(session: Session, account_id: str) -> None:
    for part in reversed(PARTS):
        table = part.table
        session.execute(delete(table).where(table.c.account_id == account_id))


def restore_backup(
    session: Session, backup_id: str, *, into_account_name: str | None = None
) -> RestoreResult:
    """Bring backup ``backup_id`` back and commit.

    Without ``into_account_name`` the account's current store rows are replaced
    by the backup's, ids kept. With it, a new account of that name gets the
    backup's rows under fresh ids. Either way it is one transaction, written
    only after every checksum has been verified; :class:`BackupError` says why
    a backup was refused.
    """
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise BackupNotFound(f"There is no backup {backup_id}.")
    session.commit()
    with storage_for(backup.location).fetch(backup.location) as path:
        manifest = _verify(path, backup)
        in_place = into_account_name is None
        api_key = None
        if in_place:
            account_id = backup.account_id
            if session.get(Account, account_id) is None:
                # The account itself was deleted: bring it back under its own id.
                info = manifest.get("account") or {}
                session.add(Account(id=account_id, name=info.get("name") or account_id))
                session.flush()
            _delete_account_rows(session, account_id)
        else:
            account, api_key = create_account(session, into_account_name or "restored")
            account_id = account.id
        counts = {part.name: 0 for part in PARTS}
        by_name = {f"{part.name}.jsonl": part for part in PARTS}
        try:
            with open_members(path) as members:
                for name, stream in members:
                    part = by_name.get(name)
                    if part is None:
                        continue
                    batch: list[dict[str, Any]] = []
                    for line in iter_jsonl(stream):
                        row = decode_row(part.table, line)
                        if not in_place:
                            row = _remap(part.name, row, account_id)
                        batch.append(row)
                        if len(batch) >= INSERT_BATCH:
                            session.execute(insert(part.table), batch)
                            counts[part.name] += len(batch)
                            batch = []
                    if batch:
                        session.execute(insert(part.table), batch)
                        counts[part.name] += len(batch)
            session.commit()
        except BaseException:
            session.rollback()
            raise
    return RestoreResult(backup_id, account_id, in_place, counts, api_key)
