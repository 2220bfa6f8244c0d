"""backup and restore against real PostgreSQL, Redis and worker processes: every row comes
back, damaged archives are refused before anything is written, one snapshot is one moment,
cancellation leaves nothing, one backup per account at a time, pruning, and S3 storage
on a local S3-compatible server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from app.backups import PARTS, BackupDamaged, encode_row, restore_backup
from app.db import session_scope
from app.models import Backup, Document, IndexEntry, Memory, MemoryFeedback, Policy, new_id
from app.store import insert_memories
from config import reload_settings
from tasks import backup
from tasks.context import JobContext
from tests.helpers import ROOT, Account, Proc, start_job, wait_for_job
from tests.storedata import locked_table, locomo_memories, wait_for_lock_waiter

pytestmark = pytest.mark.slow

Dump = dict[str, list[dict[str, Any]]]


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set variables for this process and the workers it starts, then put them back."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    reload_settings()
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reload_settings()


@pytest.fixture(autouse=True)
def backup_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "backups"
    with environment(HEBBRIX_BACKUP_DIR=str(path)):
        yield path


def _fill(client: Any, account: Account, limit: int = 150) -> None:
    """Everything an account can own: collections, a document, memories (some deleted,
    some consolidated), their index entries and an orphaned one, feedback, a policy."""
    collections = []
    for name in ("conversation", "notes"):
        resp = client.post("/v1/collections", json={"name": name}, headers=account.headers)
        assert resp.status_code == 201
        collections.append(resp.json["id"])
    rows = locomo_memories(account.id, collections[0], limit)
    document_id = new_id("doc")
    for row in rows[:30]:
        row["document_id"] = document_id
    for row in rows[limit // 2 :]:
        row["collection_id"] = collections[1]
    with session_scope() as session:
        session.add(
            Document(
                id=document_id, account_id=account.id, collection_id=collections[0],
                name="locomo-26.json", title="Conversation 26", content_type="application/json",
                bytes=211269, sha256="ab" * 32, pages=None, status="ready",
            )
        )
        session.flush()
        insert_memories(session, rows)
        session.execute(
            update(Memory)
            .where(Memory.id.in_([rows[1]["id"], rows[2]["id"]]))
            .values(consolidated_into=rows[3]["id"], access_count=4)
        )
        session.add(
            IndexEntry(
                memory_id=new_id("mem"), account_id=account.id, collection_id=collections[0],
                terms="orphan", vector=b"\x00\x01\x02",
            )
        )
        session.add(
            Policy(
                id=new_id("pol"), account_id=account.id, version=1, algorithm="reinforce",
                features={"names": ["bm25", "importance"]}, weights={"w": [0.5, -0.25]},
                metrics={"ndcg_before": 0.4, "ndcg_after": 0.6},
            )
        )
    for row in rows[10:15]:
        assert client.delete(f"/v1/memories/{row['id']}", headers=account.headers).status_code
    for i, row in enumerate(rows[20:26]):
        resp = client.post(
            f"/v1/memories/{row['id']}/feedback",
            json={"query": f"what did {row['metadata']['speaker']} say?", "reward": i % 2 - 0.5},
            headers=account.headers,
        )
        assert resp.status_code == 201


def _dump(account_id: str) -> Dump:
    """Every store row of the account, every column, in a stable order."""
    dump: Dump = {}
    with session_scope() as session:
        for part in PARTS:
            table = part.table
            rows = session.execute(
                select(table).where(table.c.account_id == account_id).order_by(
                    table.c[part.order_by]
                )
            )
            dump[part.name] = [encode_row(table, row) for row in rows]
    return dump


def _wipe(account_id: str) -> None:
    with session_scope() as session:
        for part in reversed(PARTS):
            session.execute(delete(part.table).where(part.table.c.account_id == account_id))


def _backup(client: Any, account: Account, **parameters: Any) -> dict[str, Any]:
    job = wait_for_job(client, account, start_job(client, account, "backup", **parameters)["id"])
    assert job["status"] == "completed", job
    return job["result"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=60,
    )


def _canonical(dump: Dump) -> dict[str, list[str]]:
    """The dump with ids replaced by what they point at, to compare across accounts."""
    collections = {c["id"]: c["name"] for c in dump["collections"]}
    documents = {d["id"]: d["name"] for d in dump["documents"]}
    contents = {m["id"]: m["content"] for m in dump["memories"]}

    def strip(row: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in keys}

    def show(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    return {
        "collections": show([strip(c, "id", "account_id") for c in dump["collections"]]),
        "documents": show(
            [{**strip(d, "id", "account_id", "job_id"),
              "collection_id": collections[d["collection_id"]]} for d in dump["documents"]]
        ),
        "memories": show(
            [{**strip(m, "id", "account_id"),
              "collection_id": collections[m["collection_id"]],
              "document_id": documents.get(m["document_id"]),
              "consolidated_into": contents.get(m["consolidated_into"])}
             for m in dump["memories"]]
        ),
        "index_entries": show(
            [{**strip(e, "account_id"), "memory_id": contents.get(e["memory_id"], "orphan"),
              "collection_id": collections[e["collection_id"]]} for e in dump["index_entries"]]
        ),
        "memory_feedback": show(
            [{**strip(f, "id", "account_id"), "memory_id": contents.get(f["memory_id"])}
             for f in dump["memory_feedback"]]
        ),
        "policies": show([strip(p, "id", "account_id", "job_id") for p in dump["policies"]]),
    }


def test_backup_then_restore_in_place_and_into_a_new_account(
    client: Any, account: Account, worker: Proc, backup_dir: Path
) -> None:
    _fill(client, account)
    before = _dump(account.id)
    job = wait_for_job(client, account, start_job(client, account, "backup")["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["backup_id"].startswith("bak_")
    path = Path(result["location"])
    assert path.parent == backup_dir / account.id and path.name.endswith(".tar.gz")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == result["sha256"]
    assert path.stat().st_size == result["bytes"]
    assert result["counts"] == {
        **{name: len(rows) for name, rows in before.items()},
        "memories_deleted": 5,
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # A redelivered attempt finds the backup stored and returns it unchanged.
    ctx = JobContext(job_id=job["id"], account_id=account.id, job_type="backup",
                     parameters={}, attempt=1)
    with session_scope() as session:
        assert backup.run(ctx, session) == result
    assert len(list(path.parent.iterdir())) == 1

    _wipe(account.id)
    # Written after the backup: an in-place restore replaces it.
    resp = client.post("/v1/collections", json={"name": "stray"}, headers=account.headers)
    with session_scope() as session:
        insert_memories(session, locomo_memories(account.id, resp.json["id"], 3))
    with session_scope() as session:
        restored = restore_backup(session, result["backup_id"])
    assert restored.in_place and restored.account_id == account.id
    assert restored.counts == {name: len(rows) for name, rows in before.items()}
    assert _dump(account.id) == before

    listed = _cli("backups", "list", account.id)
    assert listed.returncode == 0, listed.stderr
    assert result["backup_id"] in listed.stdout and result["sha256"] in listed.stdout

    done = _cli("backups", "restore", result["backup_id"], "--into", "copy of test")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    new_account = lines[0].rsplit(" ", 1)[-1]
    assert new_account.startswith("acc_") and new_account != account.id
    assert "memories: 150" in done.stdout
    copy = _dump(new_account)
    assert _canonical(copy) == _canonical(before)
    old_ids = {m["id"] for m in before["memories"]}
    assert not old_ids & {m["id"] for m in copy["memories"]}
    # The new account's key (printed once, last) sees the copy through the API.
    key = lines[-1]
    resp = client.get(
        "/v1/memories", query_string={"limit": 100}, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 200 and len(resp.json["data"]) == 100
    assert _dump(account.id) == before  # the original is untouched


def test_damaged_backup_is_refused_and_nothing_is_written(
    client: Any, account: Account, worker: Proc
) -> None:
    _fill(client, account, limit=60)
    result = _backup(client, account)
    path = Path(result["location"])
    original = path.read_bytes()
    # What the account looks like now must survive every refused restore.
    with session_scope() as session:
        session.execute(delete(IndexEntry).where(IndexEntry.account_id == account.id))
    current = _dump(account.id)

    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    with session_scope() as session, pytest.raises(BackupDamaged, match="checksum"):
        restore_backup(session, result["backup_id"])
    cli = _cli("backups", "restore", result["backup_id"])
    assert cli.returncode != 0 and "damaged" in cli.stderr
    assert _dump(account.id) == current

    # A consistent archive whose member no longer matches the manifest: also refused.
    with tarfile.open(fileobj=io.BytesIO(original), mode="r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w:gz") as tar:
        for info, data in members:
            if info.name == "memories.jsonl":
                data = data.replace(b'"content":"', b'"content":"EDITED ', 1)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(rebuilt.getvalue())
    with session_scope() as session:
        session.execute(
            update(Backup)
            .where(Backup.id == result["backup_id"])
            .values(sha256=hashlib.sha256(rebuilt.getvalue()).hexdigest(),
                    bytes=len(rebuilt.getvalue()))
        )
    with session_scope() as session, pytest.raises(BackupDamaged, match="memories.jsonl"):
        restore_backup(session, result["backup_id"])
    assert _dump(account.id) == current

    path.write_bytes(original)
    with session_scope() as session:
        session.execute(
            update(Backup)
            .where(Backup.id == result["backup_id"])
            .values(sha256=result["sha256"], bytes=result["bytes"])
        )
    missing = _cli("backups", "restore", "bak_nope")
    assert missing.returncode != 0 and "no backup bak_nope" in missing.stderr


def test_snapshot_is_one_moment_and_cancel_leaves_nothing(
    client: Any, account: Account, worker: Proc, backup_dir: Path
) -> None:
    _fill(client, account, limit=60)
    before = _dump(account.id)
    with locked_table("memories"):
        job = start_job(client, account, "backup")
        wait_for_lock_waiter("memories")
        # Written while the backup waits: after its snapshot began, so not in it.
        resp = client.post("/v1/collections", json={"name": "late"}, headers=account.headers)
        assert resp.status_code == 201
        with session_scope() as session:
            session.add(
                MemoryFeedback(account_id=account.id, memory_id="mem_x", query="q", reward=1.0)
            )
    done = wait_for_job(client, account, job["id"])
    assert done["status"] == "completed", done
    assert done["result"]["counts"]["collections"] == len(before["collections"])
    assert done["result"]["counts"]["memory_feedback"] == len(before["memory_feedback"])
    assert len(_dump(account.id)["collections"]) == len(before["collections"]) + 1

    folder = backup_dir / account.id
    kept = sorted(folder.iterdir())
    with locked_table("memories"):
        job = start_job(client, account, "backup")
        wait_for_lock_waiter("memories")
        assert any(p.name.endswith(".partial") for p in folder.iterdir())
        resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
        assert resp.status_code == 200 and resp.json["status"] == "cancelled"
    stopped = _wait_stopped(client, account, job["id"])
    assert stopped["status"] == "cancelled"
    assert stopped["error_details"]["code"] == "cancelled"
    assert sorted(folder.iterdir()) == kept
    assert list((backup_dir / ".scratch").iterdir()) == []
    with session_scope() as session:
        assert session.scalars(select(Backup).where(Backup.job_id == job["id"])).all() == []


def _wait_stopped(client: Any, account: Account, job_id: str) -> dict[str, Any]:
    """A cancelled job once its handler has stopped and said what it had done."""
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=account.headers).json
        if job["error_details"] is not None:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_a_second_backup_while_one_is_active_is_409(client: Any, account: Account) -> None:
    first = start_job(client, account, "backup")
    resp = client.post("/v1/jobs", json={"type": "backup"}, headers=account.headers)
    assert resp.status_code == 409
    assert first["id"] in resp.json["message"]
    bad = client.post(
        "/v1/jobs", json={"type": "backup", "parameters": {"compression": "rar", "x": 1}},
        headers=account.headers,
    )
    assert bad.status_code == 422
    assert set(bad.json["errors"]["json"]["parameters"]) == {"compression", "x"}
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=account.headers)


def test_pruning_keeps_the_newest_n(
    client: Any, account: Account, start_worker: Callable[..., Proc], backup_dir: Path
) -> None:
    _fill(client, account, limit=20)
    start_worker(queues=("backup",), env={"HEBBRIX_BACKUP_KEEP": "2"})
    results = [_backup(client, account, compression=c) for c in ("tar.gz", "zip", "tar.gz")]
    assert [r["pruned"] for r in results] == [[], [], [results[0]["backup_id"]]]
    with session_scope() as session:
        kept = session.scalars(
            select(Backup.id).where(Backup.account_id == account.id).order_by(Backup.created_at)
        ).all()
    assert kept == [results[1]["backup_id"], results[2]["backup_id"]]
    assert sorted(p.name for p in (backup_dir / account.id).iterdir()) == sorted(
        Path(r["location"]).name for r in results[1:]
    )
    assert results[1]["location"].endswith(".zip")
    _wipe(account.id)
    with session_scope() as session:
        restore_backup(session, results[1]["backup_id"])
    assert len(_dump(account.id)["memories"]) == 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def s3_server(log_dir: Path) -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port."""
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    proc = Proc(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        log_dir,
    )
    try:
        proc.wait_for("Running on", timeout=30)
        url = f"http://127.0.0.1:{port}"
        with environment(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"):
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(
                Bucket="hebbrix-backups"
            )
        yield url
    finally:
        proc.stop()


def test_backup_to_s3_compatible_storage(
    client: Any, account: Account, start_worker: Callable[..., Proc], s3_server: str
) -> None:
    import boto3

    _fill(client, account, limit=40)
    before = _dump(account.id)
    with environment(
        HEBBRIX_BACKUP_S3_URL="s3://hebbrix-backups/nightly",
        HEBBRIX_BACKUP_S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    ):
        start_worker(queues=("backup",))
        result = _backup(client, account)
        key = f"nightly/{account.id}/{result['backup_id']}.tar.gz"
        assert result["location"] == f"s3://hebbrix-backups/{key}"
        s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        body = s3.get_object(Bucket="hebbrix-backups", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == result["sha256"]
        _wipe(account.id)
        with session_scope() as session:
            restored = restore_backup(session, result["backup_id"])
        assert restored.counts["memories"] == 40
        assert _dump(account.id) == before
