"""bulk_import end to end: the API, the Redis broker, real worker processes and
PostgreSQL, on the real files of tests/data served over HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Document, IndexEntry, Job, Memory
from tests.helpers import (
    DATA,
    Account,
    FileServer,
    TrickleServer,
    locomo_jsonl,
    start_job,
    wait_for_job,
)

pytestmark = pytest.mark.slow

PDFS = json.loads((DATA / "files.json").read_text())["data"]
PASSWORD = "openpassword"


def _memory_count(job_id: str) -> int:
    with session_scope() as session:
        return session.scalar(
            select(func.count())
            .select_from(Memory)
            .join(Document, Document.id == Memory.document_id)
            .where(Document.job_id == job_id)
        )


def _documents(job_id: str) -> list[Document]:
    with session_scope() as session:
        return list(session.scalars(select(Document).where(Document.job_id == job_id)))


def test_every_corpus_pdf_imports_with_its_page_count(
    client: Any, account: Account, collection: str, file_server: FileServer, worker: Any
) -> None:
    jobs = {}
    for pdf in PDFS:
        jobs[pdf["path"]] = start_job(
            client, account, "bulk_import",
            source_url=file_server.url(pdf["path"]), collection_id=collection,
        )["id"]
    for pdf in PDFS:
        job = wait_for_job(client, account, jobs[pdf["path"]])
        if pdf["encrypted"]:
            assert job["status"] == "failed"
            assert "encrypted" in job["error_message"].lower()
            assert job["error_details"]["code"] == "encrypted_pdf"
            assert job["result"] is None
            assert _documents(job["id"]) == []  # nothing half-made
            continue
        assert job["status"] == "completed", job
        assert job["progress"] == 100.0
        result = job["result"]
        assert result["pages_processed"] == pdf["pages"], pdf["path"]
        assert result["documents_created"] == 1
        assert result["memories_created"] >= 1
        assert result["bytes_read"] == (DATA / pdf["path"]).stat().st_size
        [document] = _documents(job["id"])
        assert document.status == "ready" and document.pages == pdf["pages"]
        assert _memory_count(job["id"]) == result["memories_created"]

    encrypted = next(p["path"] for p in PDFS if p["encrypted"])
    job = start_job(
        client, account, "bulk_import",
        source_url=file_server.url(encrypted), collection_id=collection, password=PASSWORD,
    )
    assert job["parameters"]["password"] == "***"  # never echoed back
    done = wait_for_job(client, account, job["id"])
    assert done["status"] == "completed", done
    assert done["result"]["pages_processed"] == 1

    # Every memory has its index entry, and the text is searchable.
    with session_scope() as session:
        missing = session.scalar(
            select(func.count()).select_from(Memory)
            .outerjoin(IndexEntry, IndexEntry.memory_id == Memory.id)
            .where(Memory.account_id == account.id, IndexEntry.memory_id.is_(None))
        )
    assert missing == 0
    hits = client.post(
        "/v1/memories/search", json={"query": "text without a meaning", "limit": 3},
        headers=account.headers,
    ).json["data"]
    assert hits and "meaning" in hits[0]["memory"]["content"]


def test_locomo_conversation_imports_one_memory_per_turn_and_search_finds_evidence(
    client: Any, account: Account, collection: str, file_server: FileServer, worker: Any
) -> None:
    body, questions, texts = locomo_jsonl(DATA / "locomo-26.json")
    url = file_server.add("locomo-26.jsonl", body)
    job = wait_for_job(
        client, account,
        start_job(client, account, "bulk_import", source_url=url, collection_id=collection)["id"],
    )
    assert job["status"] == "completed", job
    assert job["result"]["memories_created"] == len(texts)
    assert job["result"]["skipped"]["count"] == 0

    answerable = [q for q in questions if q.get("evidence") and q["category"] != 5][:40]
    found = 0
    for question in answerable:
        hits = client.post(
            "/v1/memories/search",
            json={"query": question["question"], "collection_id": collection, "limit": 10},
            headers=account.headers,
        ).json["data"]
        dia_ids = {hit["memory"]["metadata"]["dia_id"] for hit in hits}
        found += bool(dia_ids & set(question["evidence"]))
    # Lexical search on real conversational questions: most are found.
    assert found >= len(answerable) // 2, (found, len(answerable))


def test_cancel_of_a_queued_job_while_no_worker_runs_means_it_never_runs(
    client: Any, account: Account, collection: str, file_server: FileServer,
    start_worker: Any,
) -> None:
    job = start_job(
        client, account, "bulk_import",
        source_url=file_server.url("minimal-document.pdf"), collection_id=collection,
    )
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 200 and resp.json["status"] == "cancelled"

    # The revoke went out while no worker listened; the worker that starts now
    # receives the message and must check the row before running anything.
    worker = start_worker()
    marker = start_job(
        client, account, "bulk_import",
        source_url=file_server.url("minimal-document.pdf"), collection_id=collection,
    )
    assert wait_for_job(client, account, marker["id"])["status"] == "completed"
    deadline = time.monotonic() + 10
    while job["id"] not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    with session_scope() as session:
        row = session.get(Job, job["id"])
        assert row.status == "cancelled" and row.attempts == 0 and row.started_at is None
    assert _documents(job["id"]) == []


def test_cancel_of_a_running_import_stops_the_handler(
    client: Any, account: Account, collection: str, worker: Any
) -> None:
    lines = [json.dumps({"content": f"line {i} about cancellation"}) + "\n" for i in range(400)]
    server = TrickleServer([line.encode() for line in lines], delay=0.05,
                           content_type="application/x-ndjson")
    try:
        job = start_job(client, account, "bulk_import", source_url=server.url(),
                        collection_id=collection)
        wait_for_job(client, account, job["id"], statuses=("running",))
        time.sleep(1.0)
        resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
        assert resp.status_code == 200 and resp.json["status"] == "cancelled"
        # The handler notices at its next checkpoint and records what it did.
        deadline = time.monotonic() + 15
        while True:
            with session_scope() as session:
                row = session.get(Job, job["id"])
            if row.error_details is not None and row.worker is None:
                break
            assert time.monotonic() < deadline, "handler did not stop"
            time.sleep(0.1)
        assert row.status == "cancelled"
        assert row.error_details["code"] == "cancelled"
        assert row.error_details["stage"] == "download"
        assert 0 < row.error_details["bytes_read"] < sum(len(line) for line in lines)
        assert row.result is None
        time.sleep(1.0)
        with session_scope() as session:
            assert session.get(Job, job["id"]).status == "cancelled"
        assert _documents(job["id"]) == []
    finally:
        server.close()


def test_progress_never_decreases_and_ends_at_100(
    client: Any, account: Account, collection: str, worker: Any
) -> None:
    lines = [json.dumps({"content": f"memory number {i}", "importance": 0.3}) + "\n"
             for i in range(3000)]
    chunks = ["".join(lines[i:i + 100]).encode() for i in range(0, len(lines), 100)]
    server = TrickleServer(chunks, delay=0.05, content_type="application/x-ndjson")
    seen: list[float] = []
    try:
        job = start_job(client, account, "bulk_import", source_url=server.url(),
                        collection_id=collection)
        done = wait_for_job(client, account, job["id"],
                            on_poll=lambda j: seen.append(j["progress"]))
    finally:
        server.close()
    assert done["status"] == "completed", done
    assert done["result"]["memories_created"] == 3000
    assert seen == sorted(seen), seen
    assert len(set(seen)) > 3  # it really moved in steps
    assert seen[-1] == 100.0


@pytest.mark.parametrize(
    ("name", "body", "params", "code"),
    [
        ("broken.pdf", b"%PDF-1.7\n1 0 obj <<>> garbage", {}, "corrupt_pdf"),
        ("blob.bin", bytes(range(256)) * 64, {}, "unsupported_format"),
        ("missing.pdf", None, {}, "http_error"),
        ("secret.pdf", "libreoffice-writer-password.pdf", {"password": "wrong"},
         "wrong_password"),
    ],
)
def test_bad_sources_fail_clearly_and_leave_no_document(
    client: Any, account: Account, collection: str, file_server: FileServer, worker: Any,
    name: str, body: Any, params: dict[str, Any], code: str,
) -> None:
    if isinstance(body, bytes):
        url = file_server.add(name, body)
    elif isinstance(body, str):
        url = file_server.url(body)
    else:
        url = file_server.url(name)
    job = wait_for_job(
        client, account,
        start_job(client, account, "bulk_import", source_url=url, collection_id=collection,
                  **params)["id"],
    )
    assert job["status"] == "failed"
    assert job["error_details"]["code"] == code, job
    assert job["error_message"] and "Traceback" not in job["error_message"]
    assert _documents(job["id"]) == []


def test_oversize_source_and_private_addresses_are_refused_by_a_production_worker(
    client: Any, account: Account, collection: str, file_server: FileServer,
    start_worker: Any,
) -> None:
    # A worker configured as in production: no allow-listed hosts, small limit.
    start_worker(env={"HEBBRIX_IMPORT_ALLOWED_HOSTS": "", "HEBBRIX_IMPORT_MAX_BYTES": "20000"})
    refused = wait_for_job(
        client, account,
        start_job(client, account, "bulk_import", source_url=file_server.url("multicolumn.pdf"),
                  collection_id=collection)["id"],
    )
    assert refused["status"] == "failed"
    assert refused["error_details"]["code"] == "forbidden_address"
    assert "127.0.0.1" in refused["error_message"] or "address" in refused["error_message"]


def test_source_over_the_size_limit_fails(
    client: Any, account: Account, collection: str, file_server: FileServer,
    start_worker: Any,
) -> None:
    start_worker(env={"HEBBRIX_IMPORT_MAX_BYTES": "20000"})
    job = wait_for_job(
        client, account,
        start_job(client, account, "bulk_import", source_url=file_server.url("multicolumn.pdf"),
                  collection_id=collection)["id"],
    )
    assert job["status"] == "failed"
    assert job["error_details"]["code"] == "source_too_large"
    assert _documents(job["id"]) == []


def test_kill_9_of_the_worker_mid_import_then_a_new_worker_completes_without_duplicates(
    client: Any, account: Account, collection: str, file_server: FileServer,
    start_worker: Any, beat: Any,
) -> None:
    count = 60_000
    body = "".join(
        json.dumps({"content": f"memory {i}: a fact worth keeping about item {i}"}) + "\n"
        for i in range(count)
    )
    url = file_server.add("big.jsonl", body)
    first = start_worker(concurrency=1)
    job = start_job(client, account, "bulk_import", source_url=url, collection_id=collection)

    deadline = time.monotonic() + 60
    while _memory_count(job["id"]) < 2000:
        assert time.monotonic() < deadline, first.log()[-3000:]
        time.sleep(0.05)
    first.kill()  # SIGKILL to the whole worker: parent and pool child
    first.popen.wait(timeout=10)
    partial = _memory_count(job["id"])
    assert 0 < partial < count

    start_worker(concurrency=1)
    done = wait_for_job(client, account, job["id"], timeout=180)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    assert done["result"]["memories_created"] == count
    assert _memory_count(job["id"]) == count
    with session_scope() as session:
        distinct = session.scalar(
            select(func.count(func.distinct(Memory.content))).where(
                Memory.account_id == account.id
            )
        )
        entries = session.scalar(
            select(func.count()).select_from(IndexEntry).where(
                IndexEntry.account_id == account.id
            )
        )
    assert distinct == count and entries == count
    [document] = _documents(job["id"])
    assert document.status == "ready"
