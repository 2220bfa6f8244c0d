"""The sweeps and schedules: dispatch of jobs the broker never got, per-account
scheduled jobs once per slot, purge of expired records, and the cleanup type."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

import config
from app import create_app, jobstate
from app.db import session_scope
from app.models import IndexEntry, Job, JobEvent, Memory, utcnow
from app.store import insert_memories
from tasks.system import purge_expired_jobs, schedule_account_jobs
from tests.helpers import Account, start_job, wait_for_job

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_job_posted_while_the_broker_is_down_is_accepted_and_runs_once_it_is_back(
    account: Account, monkeypatch: Any, start_worker: Any, beat: Any, client: Any,
    flask_app: Any,
) -> None:
    # An API process whose broker is unreachable (nothing listens on the port).
    # Celery reads CELERY_BROKER_URL at publish time, so it stays set meanwhile.
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{_closed_port()}/0")
    config.reload_settings()
    try:
        down_api = create_app({"TESTING": True}).test_client()
        started = time.monotonic()
        resp = down_api.post(
            "/v1/jobs", json={"type": "cleanup", "parameters": {"dry_run": True}},
            headers=account.headers,
        )
        elapsed = time.monotonic() - started
    finally:
        monkeypatch.undo()
        config.reload_settings()
        # Celery made the new app the default one: give the default back, so
        # later tasks of this process publish through the real broker again.
        flask_app.extensions["celery"].set_default()
    assert resp.status_code == 202, resp.json
    assert elapsed < 15  # answered, not hung on the broker
    job_id = resp.json["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.dispatched_at is None

    # The real broker is up for the workers and beat: the dispatcher publishes it.
    start_worker()
    done = wait_for_job(client, account, job_id, timeout=60)
    assert done["status"] == "completed", done
    assert done["attempts"] == 1
    with session_scope() as session:
        assert session.get(Job, job_id).dispatched_at is not None


def test_scheduled_jobs_are_created_once_per_account_type_and_slot(
    make_account: Any, client: Any
) -> None:
    accounts = [make_account(f"sched-{i}") for i in range(2)]
    moment = "2031-05-04T10:15:00+00:00"
    first = schedule_account_jobs("cleanup", "hourly", now=moment)
    # A second beat firing the same slot (a minute later) creates nothing.
    second = schedule_account_jobs("cleanup", "hourly", now="2031-05-04T10:16:00+00:00")
    assert first >= 2 and second == 0
    for acct in accounts:
        jobs = client.get("/v1/jobs?type=cleanup", headers=acct.headers).json["data"]
        assert len(jobs) == 1
        assert jobs[0]["metadata"]["triggered_by"] == "schedule"
        assert jobs[0]["metadata"]["slot"] == "2031-05-04T10:00:00+00:00"
    # The next slot gets its own run once the first one is no longer active.
    for acct in accounts:
        job_id = client.get("/v1/jobs?type=cleanup", headers=acct.headers).json["data"][0]["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=acct.headers)
    # Once they are over, checking the same slot again creates (and publishes)
    # nothing; the next slot gets its own run.
    assert schedule_account_jobs("cleanup", "hourly", now=moment) == 0
    assert schedule_account_jobs("cleanup", "hourly", now="2031-05-04T11:00:05+00:00") >= 2
    # Every account of the test database got these runs: cancel them so the
    # workers of later tests skip them instead of cleaning every account.
    with session_scope() as session:
        for job_id in session.scalars(
            select(Job.id).where(Job.schedule_key.like("cleanup:%:2031-05-04T%"))
        ):
            jobstate.cancel(session, job_id, retention_days=1)


def test_expired_job_records_are_purged_and_what_they_made_is_kept(
    client: Any, account: Account, collection: str
) -> None:
    job = start_job(client, account, "cleanup")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    kept = _add_memories(account, collection, 1)
    with session_scope() as session:
        session.get(Job, job["id"]).expires_at = utcnow() - timedelta(seconds=1)
    assert purge_expired_jobs() >= 1
    with session_scope() as session:
        assert session.get(Job, job["id"]) is None
        assert session.scalar(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job["id"])
        ) == 0
        assert session.get(Memory, kept[0]) is not None


def _add_memories(account: Account, collection: str, n: int, *,
                  deleted_days_ago: float | None = None) -> list[str]:
    ids = [f"mem_t{time.monotonic_ns()}{i}" for i in range(n)]
    with session_scope() as session:
        insert_memories(session, [
            {"id": mid, "account_id": account.id, "collection_id": collection,
             "content": f"note {i}"} for i, mid in enumerate(ids)
        ])
        if deleted_days_ago is not None:
            when = utcnow() - timedelta(days=deleted_days_ago)
            for mid in ids:
                session.get(Memory, mid).deleted_at = when
    return ids


def test_cleanup_purges_old_soft_deleted_memories_and_orphans_dry_run_changes_nothing(
    client: Any, account: Account, collection: str, worker: Any
) -> None:
    live = _add_memories(account, collection, 3)
    recent = _add_memories(account, collection, 2, deleted_days_ago=1)
    old = _add_memories(account, collection, 700, deleted_days_ago=30)
    orphans = _add_memories(account, collection, 4)
    with session_scope() as session:
        for mid in orphans:
            session.delete(session.get(Memory, mid))  # leaves the index entries

    dry = wait_for_job(client, account,
                       start_job(client, account, "cleanup", dry_run=True)["id"])
    assert dry["status"] == "completed", dry
    assert dry["result"]["memories_purged"] == 700
    assert dry["result"]["orphaned_index_entries_purged"] == 4
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Memory).where(
            Memory.id.in_(old))) == 700

    done = wait_for_job(client, account, start_job(client, account, "cleanup")["id"])
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["memories_purged"] == 700
    assert result["orphaned_index_entries_purged"] == 4
    assert result["index_entries_purged"] == 704
    assert result["bytes_freed"] > 0
    with session_scope() as session:
        remaining = set(session.scalars(select(Memory.id).where(
            Memory.account_id == account.id)))
        entries = set(session.scalars(select(IndexEntry.memory_id).where(
            IndexEntry.account_id == account.id)))
    assert remaining == set(live) | set(recent)
    assert entries == remaining
