"""Where downloadable artifacts (data exports) live, and how they expire.

The store is addressed by keys such as ``exports/acc_x/art_y.zip``, never by
paths from a client. A file appears under its key only once it is complete:
it is written under a temporary name in the same directory, synced, and then
renamed into place, so a crashed, cancelled or failed writer leaves no
half-written artifact behind (at worst a ``.partial`` file the sweep removes).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Artifact, utcnow
from config import get_settings

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PARTIAL_SUFFIX = ".partial"
SCRATCH_DIR = ".scratch"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: Path) -> Iterator[IO[bytes]]:
    """Write ``final`` all at once: a temporary file in its directory, fsync, rename.

    The file is opened for reading too, so the caller can checksum what it wrote
    before it is published. On any exception (a cancellation included) the
    temporary file is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # A dead attempt's leftovers for the same file are garbage now.
    for stale in final.parent.glob(f".{final.name}.*{PARTIAL_SUFFIX}"):
        with suppress(FileNotFoundError):
            stale.unlink()
    temp = final.parent / f".{final.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
    f = open(temp, "x+b")  # noqa: SIM115 - closed on both paths below
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(temp, final)
        fsync_dir(final.parent)
    except BaseException:
        f.close()
        with suppress(FileNotFoundError):
            temp.unlink()
        raise


def remove_stale_partials(root: Path, older_than: float) -> int:
    """Remove what writers that died more than ``older_than`` seconds ago left behind:
    their ``.partial`` files and their scratch directories."""
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for path in root.rglob(f".*{PARTIAL_SUFFIX}"):
        with suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    scratch = root / SCRATCH_DIR
    if scratch.is_dir():
        for path in scratch.iterdir():
            with suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
    return removed


class LocalStore:
    """Files under one directory, addressed by key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not parts or not all(_SEGMENT.fullmatch(p) for p in parts):
            raise ValueError(f"invalid artifact key {key!r}")
        return self.root.joinpath(*parts)

    def writer(self, key: str) -> AbstractContextManager[IO[bytes]]:
        return atomic_file(self.path(key))

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private directory on the store's filesystem for spooling, removed after."""
        base = self.root / SCRATCH_DIR
        base.mkdir(parents=True, exist_ok=True)
        path = base / secrets.token_hex(8)
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> int:
        """Remove ``key``; returns the bytes freed (0 if it was already gone)."""
        path = self.path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size


def artifact_store() -> LocalStore:
    return LocalStore(get_settings().artifact_dir)


def download_url(artifact_id: str) -> str:
    return f"{get_settings().public_url.rstrip('/')}/v1/artifacts/{artifact_id}/download"


def is_expired(artifact: Artifact, now: datetime | None = None) -> bool:
    return artifact.expires_at is not None and artifact.expires_at <= (now or utcnow())


def purge_expired_artifacts(
    session: Session,
    *,
    account_id: str | None = None,
    limit: int = 500,
    store: LocalStore | None = None,
) -> tuple[int, int]:
    """Delete up to ``limit`` expired artifacts (file, then row) and commit.

    Returns ``(artifacts purged, bytes freed)``. The file goes first: a crash
    in between leaves a row whose download answers 410 and that the next run
    removes, never a file that nothing points at.
    """
    store = store or artifact_store()
    stmt = (
        select(Artifact)
        .where(Artifact.expires_at.is_not(None), Artifact.expires_at <= utcnow())
        .order_by(Artifact.expires_at)
        .limit(limit)
    )
    if account_id is not None:
        stmt = stmt.where(Artifact.account_id == account_id)
    expired = list(session.scalars(stmt))
    freed = 0
    for artifact in expired:
        freed += store.delete(artifact.location)
        session.delete(artifact)
    session.commit()
    return len(expired), freed
