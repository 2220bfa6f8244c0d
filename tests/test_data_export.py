"""data_export against real PostgreSQL, Redis and worker processes: the archive and its
manifest, the authenticated download, the round trip through bulk_import, cancellation,
a killed worker, and expiry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.artifacts import artifact_store
from app.db import session_scope
from app.models import Artifact, Document, Memory, new_id, utcnow
from app.store import insert_memories
from config import reload_settings
from tasks import data_export
from tasks.context import JobContext
from tasks.data_export import artifact_id_for
from tests.helpers import Account, FileServer, Proc, start_job, wait_for_job
from tests.storedata import locked_table, locomo_memories, wait_for_lock_waiter

pytestmark = pytest.mark.slow

MEMORY_KEYS = {
    "id", "collection_id", "document_id", "content", "importance", "metadata", "created_at",
    "deleted_at",
}


@pytest.fixture(autouse=True)
def artifact_dir(tmp_path: Path) -> Iterator[Path]:
    """A private artifact directory, seen by this process and the workers it starts."""
    path = tmp_path / "artifacts"
    old = os.environ.get("HEBBRIX_ARTIFACT_DIR")
    os.environ["HEBBRIX_ARTIFACT_DIR"] = str(path)
    reload_settings()
    yield path
    if old is None:
        os.environ.pop("HEBBRIX_ARTIFACT_DIR", None)
    else:
        os.environ["HEBBRIX_ARTIFACT_DIR"] = old
    reload_settings()


def _collection(client: Any, account: Account, name: str) -> str:
    resp = client.post("/v1/collections", json={"name": name}, headers=account.headers)
    assert resp.status_code == 201, resp.json
    return resp.json["id"]


def _fill(client: Any, account: Account, limit: int | None = None) -> dict[str, Any]:
    """Two collections of LoCoMo turns, a document some belong to, a few soft-deleted."""
    talk = _collection(client, account, "conversation")
    notes = _collection(client, account, "notes")
    rows = locomo_memories(account.id, talk, limit)
    document_id = new_id("doc")
    for row in rows[:40]:
        row["document_id"] = document_id
    for row in rows[len(rows) // 2 :]:
        row["collection_id"] = notes
    with session_scope() as session:
        session.add(
            Document(
                id=document_id, account_id=account.id, collection_id=talk, name="locomo-26.json",
                title="Conversation 26", content_type="application/json", bytes=211269,
                sha256="0" * 64, status="ready",
            )
        )
        session.flush()
        insert_memories(session, rows)
    deleted = [row["id"] for row in rows[5:10]]
    for memory_id in deleted:
        resp = client.delete(f"/v1/memories/{memory_id}", headers=account.headers)
        assert resp.status_code == 204
    return {
        "collections": [talk, notes], "document_id": document_id, "rows": rows,
        "deleted": set(deleted),
    }


def _download(client: Any, account: Account, result: dict[str, Any]) -> bytes:
    resp = client.get(f"/v1/artifacts/{result['artifact_id']}/download", headers=account.headers)
    assert resp.status_code == 200, resp.data[:500]
    body = resp.data
    assert int(resp.headers["Content-Length"]) == len(body) == result["bytes"]
    assert resp.headers["X-Content-SHA256"] == result["sha256"]
    assert hashlib.sha256(body).hexdigest() == result["sha256"]
    return body


def _members(body: bytes) -> list[tuple[str, bytes]]:
    if body.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            return [(info.filename, zf.read(info)) for info in zf.infolist()]
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def _checked_manifest(members: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The manifest, after checking it is last and every file matches its entry."""
    names = [name for name, _ in members]
    assert names[-1] == "manifest.json"
    manifest = json.loads(members[-1][1])
    assert manifest["format"] == "hebbrix-export" and manifest["schema_version"] == 1
    assert set(manifest["files"]) == set(names[:-1])
    for name, data in members[:-1]:
        entry = manifest["files"][name]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["bytes"] == len(data)
        assert entry["rows"] == len(data.splitlines())
        assert manifest["counts"][name.removesuffix(".jsonl")] == entry["rows"]
    return manifest


def _lines(members: list[tuple[str, bytes]], name: str) -> list[dict[str, Any]]:
    data = dict(members)[name]
    return [json.loads(line) for line in data.splitlines()]


def _export_files(artifact_dir: Path, account_id: str) -> list[Path]:
    folder = artifact_dir / "exports" / account_id
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_export_archive_download_and_tenant_scoping(
    client: Any,
    account: Account,
    make_account: Callable[..., Account],
    worker: Proc,
    artifact_dir: Path,
) -> None:
    data = _fill(client, account)
    job = wait_for_job(client, account, start_job(client, account, "data_export")["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    live = len(data["rows"]) - len(data["deleted"])
    assert result["counts"] == {"collections": 2, "documents": 1, "memories": live}
    assert result["artifact_id"] == artifact_id_for(job["id"])
    assert result["download_url"].endswith(f"/v1/artifacts/{result['artifact_id']}/download")
    assert result["filename"].endswith(".zip")

    meta = client.get(f"/v1/artifacts/{result['artifact_id']}", headers=account.headers)
    assert meta.status_code == 200
    assert meta.json["sha256"] == result["sha256"] and meta.json["bytes"] == result["bytes"]
    assert meta.json["download_url"] == result["download_url"]
    assert meta.json["expires_at"] == result["expires_at"]
    with session_scope() as session:
        artifact = session.get(Artifact, result["artifact_id"])
        assert artifact is not None
        retention = artifact.expires_at - artifact.created_at
        assert retention == timedelta(days=7)

    body = _download(client, account, result)
    members = _members(body)
    assert [name for name, _ in members] == [
        "collections.jsonl", "documents.jsonl", "memories.jsonl", "manifest.json",
    ]
    manifest = _checked_manifest(members)
    assert manifest["account_id"] == account.id and manifest["job_id"] == job["id"]

    memories = _lines(members, "memories.jsonl")
    assert all(set(line) == MEMORY_KEYS for line in memories)
    by_id = {row["id"]: row for row in data["rows"]}
    assert {line["id"] for line in memories} == set(by_id) - data["deleted"]
    for line in memories[:50]:
        row = by_id[line["id"]]
        assert line["content"] == row["content"] and line["importance"] == row["importance"]
        assert line["metadata"] == row["metadata"] and line["deleted_at"] is None
        assert line["created_at"] == row["created_at"].isoformat()
        assert line["document_id"] == row.get("document_id")
    assert [c["name"] for c in _lines(members, "collections.jsonl")] == ["conversation", "notes"]
    assert _lines(members, "documents.jsonl")[0]["id"] == data["document_id"]
    assert not list((artifact_dir / ".scratch").glob("*"))

    # A redelivered attempt finds the artifact complete and returns it unchanged.
    ctx = JobContext(job_id=job["id"], account_id=account.id, job_type="data_export",
                     parameters={}, attempt=job["attempts"])
    with session_scope() as session:
        assert data_export.run(ctx, session) == result
    assert len(_export_files(artifact_dir, account.id)) == 1

    other = make_account("other")
    for path in (f"/v1/artifacts/{result['artifact_id']}",
                 f"/v1/artifacts/{result['artifact_id']}/download"):
        assert client.get(path, headers=other.headers).status_code == 404
        assert client.get(path).status_code == 401
    assert client.get("/v1/artifacts/art_nope", headers=account.headers).status_code == 404


def test_filters_tar_gz_deleted_and_unknown_collection(
    client: Any, account: Account, worker: Proc, artifact_dir: Path
) -> None:
    data = _fill(client, account, limit=120)
    talk = data["collections"][0]
    job = start_job(
        client, account, "data_export", collection_ids=[talk], include=["memories"],
        compression="tar.gz", include_deleted=True,
    )
    job = wait_for_job(client, account, job["id"])
    assert job["status"] == "completed", job
    in_talk = [r for r in data["rows"] if r["collection_id"] == talk]
    assert job["result"]["counts"] == {"memories": len(in_talk)}
    body = _download(client, account, job["result"])
    assert body[:2] == b"\x1f\x8b" and job["result"]["filename"].endswith(".tar.gz")
    members = _members(body)
    assert [name for name, _ in members] == ["memories.jsonl", "manifest.json"]
    _checked_manifest(members)
    lines = _lines(members, "memories.jsonl")
    assert {line["id"] for line in lines} == {r["id"] for r in in_talk}
    assert {line["id"] for line in lines if line["deleted_at"]} == data["deleted"]

    # Another account's or an unknown collection is refused before a job exists.
    bad = client.post(
        "/v1/jobs",
        json={"type": "data_export", "parameters": {"collection_ids": [talk, "col_nope"]}},
        headers=account.headers,
    )
    assert bad.status_code == 422
    assert "col_nope" in bad.json["errors"]["json"]["parameters"]["collection_ids"][0]
    assert _export_files(artifact_dir, account.id) == [
        artifact_dir / "exports" / account.id / f"{job['result']['artifact_id']}.tar.gz"
    ]


def test_round_trip_through_bulk_import(
    client: Any,
    account: Account,
    make_account: Callable[..., Account],
    worker: Proc,
    file_server: FileServer,
) -> None:
    data = _fill(client, account)
    job = wait_for_job(client, account, start_job(client, account, "data_export")["id"])
    assert job["status"] == "completed", job
    body = _download(client, account, job["result"])

    other = make_account("importer")
    target = _collection(client, other, "imported")
    url = file_server.add("hebbrix-export.zip", body)
    imported = start_job(client, other, "bulk_import", source_url=url, collection_id=target)
    imported = wait_for_job(client, other, imported["id"])
    assert imported["status"] == "completed", imported
    live = [r for r in data["rows"] if r["id"] not in data["deleted"]]
    assert imported["result"]["memories_created"] == len(live)
    assert imported["result"]["skipped"]["count"] == 0

    def key(content: str, importance: float, metadata: dict[str, Any], created: Any) -> tuple:
        return (content, importance, json.dumps(metadata, sort_keys=True), created.isoformat())

    with session_scope() as session:
        copies = list(session.scalars(select(Memory).where(Memory.account_id == other.id)))
    source_ids = {m.metadata_.get("source_id") for m in copies}
    assert source_ids == {r["id"] for r in live}
    got = sorted(
        key(m.content, m.importance,
            {k: v for k, v in m.metadata_.items() if k != "source_id"}, m.created_at)
        for m in copies
    )
    want = sorted(key(r["content"], r["importance"], r["metadata"], r["created_at"]) for r in live)
    assert got == want


def _wait_stopped(client: Any, account: Account, job_id: str) -> dict[str, Any]:
    """A cancelled job once its handler has stopped and said what it had done."""
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=account.headers).json
        if job["error_details"] is not None:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_cancel_mid_run_leaves_no_file_and_no_row(
    client: Any, account: Account, worker: Proc, artifact_dir: Path
) -> None:
    _fill(client, account, limit=200)
    folder = artifact_dir / "exports" / account.id
    with locked_table("memories"):
        job = start_job(client, account, "data_export")
        wait_for_lock_waiter("memories")
        # Mid-run, waiting to read the memories: the archive's temporary file exists.
        assert [p.name for p in folder.iterdir()][0].endswith(".partial")
        resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
        assert resp.status_code == 200 and resp.json["status"] == "cancelled"
    stopped = _wait_stopped(client, account, job["id"])
    assert stopped["status"] == "cancelled"
    assert stopped["error_details"]["code"] == "cancelled"
    assert list(folder.iterdir()) == []
    assert list((artifact_dir / ".scratch").iterdir()) == []
    with session_scope() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job["id"])).all() == []


def test_killed_worker_mid_run_completes_once_on_another(
    client: Any,
    account: Account,
    start_worker: Callable[..., Proc],
    beat: Proc,
    artifact_dir: Path,
) -> None:
    data = _fill(client, account, limit=200)
    # The system queue runs beat's sweeps: the reconciler that notices the dead worker.
    first = start_worker(queues=("data_export", "system"))
    with locked_table("memories"):
        job = start_job(client, account, "data_export")
        wait_for_lock_waiter("memories")
        first.kill()
        first.popen.wait(timeout=10)
    start_worker(queues=("data_export", "system"))
    done = wait_for_job(client, account, job["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    live = len(data["rows"]) - len(data["deleted"])
    assert done["result"]["counts"]["memories"] == live
    with session_scope() as session:
        artifacts = session.scalars(select(Artifact).where(Artifact.account_id == account.id))
        assert [a.id for a in artifacts] == [done["result"]["artifact_id"]]
    # The dead attempt's temporary file went when the next attempt started writing.
    folder = artifact_dir / "exports" / account.id
    assert [p.name for p in folder.iterdir()] == [f"{done['result']['artifact_id']}.zip"]
    _checked_manifest(_members(_download(client, account, done["result"])))


def test_bad_parameters_are_422_with_field_errors(client: Any, account: Account) -> None:
    resp = client.post(
        "/v1/jobs",
        json={
            "type": "data_export",
            "parameters": {
                "include": ["memories", "secrets"], "compression": "rar", "format": "csv",
                "include_deleted": "sometimes", "collection_ids": [], "extra": 1,
            },
        },
        headers=account.headers,
    )
    assert resp.status_code == 422
    errors = resp.json["errors"]["json"]["parameters"]
    assert set(errors) == {
        "include", "compression", "format", "include_deleted", "collection_ids", "extra",
    }


def _expired_artifact(account_id: str, payload: bytes) -> Artifact:
    store = artifact_store()
    artifact_id = new_id("art")
    key = f"exports/{account_id}/{artifact_id}.zip"
    with store.writer(key) as out:
        out.write(payload)
    now = utcnow()
    with session_scope() as session:
        artifact = Artifact(
            id=artifact_id, account_id=account_id, kind="data_export", location=key,
            filename="old.zip", content_type="application/zip", bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(), created_at=now - timedelta(days=8),
            expires_at=now - timedelta(days=1),
        )
        session.add(artifact)
    return artifact


def test_expired_artifacts_are_410_then_swept_and_cleaned_up(
    client: Any, account: Account, worker: Proc
) -> None:
    from tasks.system import expire_artifacts

    store = artifact_store()
    swept = _expired_artifact(account.id, b"x" * 1000)
    for path in (f"/v1/artifacts/{swept.id}", f"/v1/artifacts/{swept.id}/download"):
        resp = client.get(path, headers=account.headers)
        assert resp.status_code == 410 and "expired" in resp.json["message"]
    assert expire_artifacts()["artifacts"] >= 1
    assert not store.exists(swept.location)
    with session_scope() as session:
        assert session.get(Artifact, swept.id) is None
    assert client.get(f"/v1/artifacts/{swept.id}", headers=account.headers).status_code == 404

    cleaned = _expired_artifact(account.id, b"y" * 2048)
    job = wait_for_job(client, account, start_job(client, account, "cleanup")["id"])
    assert job["status"] == "completed", job
    assert job["result"]["artifacts_purged"] == 1
    assert job["result"]["bytes_freed"] >= 2048
    assert not store.exists(cleaned.location)
    with session_scope() as session:
        assert session.get(Artifact, cleaned.id) is None
