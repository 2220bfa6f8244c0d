"""Archives of JSON-lines members with a manifest: what data_export and backup write.

An archive is built from members spooled to disk one at a time, each with its
SHA-256, size and row count, so nothing is ever held whole in memory; the
manifest that lists those checksums is written last. Reading streams members in
archive order, which is what lets a restore verify every checksum before it
writes anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

BLOCK = 1024 * 1024
MANIFEST = "manifest.json"

# compression -> (file name suffix, content type)
COMPRESSIONS: dict[str, tuple[str, str]] = {
    "zip": (".zip", "application/zip"),
    "tar.gz": (".tar.gz", "application/gzip"),
}


class ArchiveError(Exception):
    """An archive that cannot be read as one of ours (corrupt, truncated, not an archive)."""


class JsonlSpool:
    """One member being written: a JSON object per line, counted and hashed as it goes."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.path = directory / name
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._hash = hashlib.sha256()
        self.bytes = 0
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        self._file.write(line)
        self._hash.update(line)
        self.bytes += len(line)
        self.rows += 1

    def close(self) -> None:
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def entry(self) -> dict[str, Any]:
        """This member's line in the manifest's ``files``."""
        return {"sha256": self.sha256, "bytes": self.bytes, "rows": self.rows}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_archive(
    out: IO[bytes], compression: str, members: list[JsonlSpool], manifest: dict[str, Any]
) -> None:
    """Pack ``members`` then ``manifest.json`` into ``out`` (left open, not synced)."""
    data = manifest_bytes(manifest)
    now = time.time()
    if compression == "zip":
        # The zip is closed before ``out`` is, so its central directory is complete.
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for member in members:
                zf.write(member.path, arcname=member.name)
            zf.writestr(MANIFEST, data)
        return
    if compression != "tar.gz":
        raise ValueError(f"unknown compression {compression!r}")
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            with open(member.path, "rb") as f:
                tar.addfile(_tar_info(member.name, member.bytes, now), f)
        tar.addfile(_tar_info(MANIFEST, len(data), now), io.BytesIO(data))


def _tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    # Plain, owner-less entries: the machine that wrote them is none of the reader's business.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info


def file_digest(f: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and size of a whole file, read from its start."""
    f.seek(0)
    digest = hashlib.sha256()
    size = 0
    while block := f.read(BLOCK):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def path_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    with open(path, "rb") as f:
        return file_digest(f)


def detect_compression(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    raise ArchiveError("The file is neither a zip nor a gzip-compressed tar archive.")


_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError)


@contextmanager
def open_members(path: str | os.PathLike[str]) -> Iterator[Iterator[tuple[str, IO[bytes]]]]:
    """The regular-file members of an archive as ``(name, stream)``, in archive order.

    Each stream is valid until the iteration moves on. Read errors become
    :class:`ArchiveError`.
    """
    compression = detect_compression(path)
    try:
        if compression == "zip":
            with zipfile.ZipFile(path) as zf:
                yield _zip_members(zf)
        else:
            with tarfile.open(path, mode="r:gz") as tar:
                yield _tar_members(tar)
    except _READ_ERRORS as exc:
        raise ArchiveError(f"The archive cannot be read ({type(exc).__name__}).") from exc


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[str, IO[bytes]]]:
    for info in zf.infolist():
        if info.is_dir():
            continue
        with zf.open(info) as stream:
            yield info.filename, stream


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    for info in tar:
        if not info.isreg():
            continue
        stream = tar.extractfile(info)
        if stream is not None:
            with stream:
                yield info.name, stream


def iter_jsonl(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines stream, one line in memory at a time."""
    for line in stream:
        if line.strip():
            yield json.loads(line)
