"""System sweeps run by beat: dispatch, reconcile, purge, and per-account schedules."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import current_app, shared_task
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from app import jobstate
from app.artifacts import artifact_store, purge_expired_artifacts, remove_stale_partials
from app.db import session_scope
from app.dispatch import publish_job, revoke_job
from app.models import Account, Job, JobEvent, utcnow
from config import AVAILABLE_JOB_TYPES, get_settings

log = logging.getLogger(__name__)

SWEEP_BATCH = 500
# A job's hard time limit plus this long, and the reconciler calls it dead.
HARD_LIMIT_MARGIN = timedelta(seconds=30)


@shared_task(name="hebbrix.system.ping", ignore_result=False, time_limit=60)
def ping() -> float:
    """A no-op that says when it ran: the bare-Celery baseline of the benchmarks,
    and a liveness probe of a worker. Its result is stored only when a result
    backend is configured."""
    return time.time()


@shared_task(name="hebbrix.system.dispatch_queued_jobs", ignore_result=True, time_limit=300)
def dispatch_queued_jobs() -> int:
    """Publish queued jobs the broker never got (it was down when they were created).

    Also re-publishes jobs queued for longer than ``redispatch_after``: a broker
    restarted without persistence loses its messages, and a duplicate is
    harmless (the first delivery claims the job, later ones find it taken).
    """
    settings = get_settings()
    now = utcnow()
    before = now - timedelta(seconds=settings.dispatch_after_seconds)
    stale = now - timedelta(seconds=settings.redispatch_after_seconds)
    with session_scope() as session:
        pending = session.execute(
            select(Job.id, Job.type, Job.dispatched_at)
            .where(
                Job.status == jobstate.QUEUED,
                or_(
                    and_(Job.dispatched_at.is_(None), Job.updated_at < before),
                    Job.dispatched_at < stale,
                ),
            )
            .order_by(Job.created_at)
            .limit(SWEEP_BATCH)
        ).all()
    published = 0
    for job_id, job_type, dispatched_at in pending:
        if not publish_job(current_app, job_id, job_type, again=dispatched_at is not None):
            break  # the broker is still down; the next sweep tries again
        published += 1
    if published:
        log.info("dispatched %d queued jobs", published)
    return published


@shared_task(name="hebbrix.system.reconcile_running_jobs", ignore_result=True, time_limit=300)
def reconcile_running_jobs() -> dict[str, int]:
    """Settle jobs whose worker is gone, that outlived their hard time limit, or
    that were cancelled but whose handler did not stop."""
    settings = get_settings()
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "terminated": 0}
    with session_scope() as session:
        running = session.scalars(
            select(Job).where(Job.status == jobstate.RUNNING).limit(SWEEP_BATCH)
        ).all()
        for job in running:
            hard = settings.time_limits.get(job.type, (0, 3600))[1]
            started = job.attempt_started_at or job.started_at or now
            if started + timedelta(seconds=hard) + HARD_LIMIT_MARGIN < now:
                # Celery sends no failure signal for a hard time limit in every
                # version; this is where such a job ends.
                if jobstate.fail(
                    session,
                    job.id,
                    code="time_limit_exceeded",
                    message=f"The job was stopped at its hard time limit of {hard} seconds.",
                    details={"attempts": job.attempts},
                    attempt=job.attempts,
                    retention_days=settings.job_retention_days,
                ):
                    counts["failed"] += 1
                continue
            heartbeat = job.heartbeat_at or started
            if heartbeat < now - timedelta(seconds=settings.heartbeat_stale_after):
                if job.attempts >= settings.max_attempts:
                    done = jobstate.fail(
                        session,
                        job.id,
                        code="worker_lost",
                        message=(
                            f"The job's worker was lost on each of its {job.attempts} attempts."
                        ),
                        details={"attempts": job.attempts},
                        attempt=job.attempts,
                        retention_days=settings.job_retention_days,
                    )
                    counts["failed"] += int(done)
                else:
                    done = jobstate.requeue(
                        session,
                        job.id,
                        attempt=job.attempts,
                        reason="worker lost (no heartbeat)",
                        redispatch=True,
                    )
                    counts["requeued"] += int(done)
        grace = now - timedelta(seconds=settings.cancel_grace_seconds)
        stubborn = session.scalars(
            select(Job.id)
            .where(
                Job.status == jobstate.CANCELLED,
                Job.worker.is_not(None),
                Job.cancel_requested_at < grace,
            )
            .limit(SWEEP_BATCH)
        ).all()
        for job_id in stubborn:
            revoke_job(current_app, job_id, terminate=True)
            session.execute(update(Job).where(Job.id == job_id).values(worker=None))
            counts["terminated"] += 1
    if any(counts.values()):
        log.info("reconciled running jobs: %s", counts)
    return counts


@shared_task(name="hebbrix.system.purge_expired_jobs", ignore_result=True, time_limit=1800)
def purge_expired_jobs() -> int:
    """Delete job records past ``expires_at`` (what the jobs made is kept)."""
    purged = 0
    while True:
        with session_scope() as session:
            ids = list(
                session.scalars(
                    select(Job.id)
                    .where(Job.expires_at.is_not(None), Job.expires_at < utcnow())
                    .limit(SWEEP_BATCH)
                )
            )
            if not ids:
                break
            session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        purged += len(ids)
    return purged


# A temporary file this old belongs to a writer that died (no job runs this long).
STALE_PARTIAL_SECONDS = 24 * 3600


@shared_task(name="hebbrix.system.expire_artifacts", ignore_result=True, time_limit=1800)
def expire_artifacts() -> dict[str, int]:
    """Remove artifacts past ``expires_at`` (file and row), and dead writers' leftovers."""
    store = artifact_store()
    counts = {"artifacts": 0, "bytes": 0, "partials": 0}
    while True:
        with session_scope() as session:
            purged, freed = purge_expired_artifacts(session, limit=SWEEP_BATCH, store=store)
        counts["artifacts"] += purged
        counts["bytes"] += freed
        if purged < SWEEP_BATCH:
            break
    counts["partials"] = remove_stale_partials(store.root, STALE_PARTIAL_SECONDS)
    # Backup writers that died leave the same kind of leftovers in their directory.
    counts["partials"] += remove_stale_partials(get_settings().backup_dir, STALE_PARTIAL_SECONDS)
    if any(counts.values()):
        log.info("expired artifacts: %s", counts)
    return counts


def slot_start(period: str, now: datetime) -> datetime:
    if period == "hourly":
        return now.replace(minute=0, second=0, microsecond=0)
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown period {period!r}")


def _schedule_key(job_type: str, account_id: Any, slot: datetime) -> Any:
    """The unique key of one scheduled run; ``account_id`` may be a column."""
    return f"{job_type}:" + account_id + f":{slot.isoformat()}"


@shared_task(name="hebbrix.system.schedule_account_jobs", ignore_result=True, time_limit=1800)
def schedule_account_jobs(job_type: str, period: str, now: str | None = None) -> int:
    """Create this slot's scheduled job of ``job_type`` for every account.

    The schedule key (type, account, slot) is unique in the jobs table, so a
    second beat firing the same slot creates nothing.
    """
    if job_type not in AVAILABLE_JOB_TYPES:
        return 0
    moment = datetime.fromisoformat(now) if now else datetime.now(UTC)
    slot = slot_start(period, moment.astimezone(UTC))
    created: list[tuple[str, str]] = []
    with session_scope() as session:
        # An account whose previous run is still active skips this slot, as a
        # client's second request for a singleton type would be refused.
        busy = select(Job.account_id).where(
            Job.type == job_type, Job.status.in_(jobstate.ACTIVE)
        )
        # Accounts that have this slot's run already are left out here, so the
        # check every minute does not retry (and fail) one insert per account.
        done = select(Job.id).where(
            Job.schedule_key == _schedule_key(job_type, Account.id, slot)
        )
        account_ids = list(
            session.scalars(
                select(Account.id)
                .where(Account.id.not_in(busy), ~done.exists())
                .order_by(Account.id)
            )
        )
    for account_id in account_ids:
        key = _schedule_key(job_type, account_id, slot)
        try:
            with session_scope() as session:
                job = jobstate.create_job(
                    session,
                    account_id=account_id,
                    job_type=job_type,
                    parameters={},
                    metadata={"triggered_by": "schedule", "slot": slot.isoformat()},
                    schedule_key=key,
                )
        except IntegrityError:
            continue  # this slot's job exists: another check or beat made it
        # Only once the commit went through: the unique key is checked there.
        created.append((job.id, job_type))
    for job_id, jtype in created:
        publish_job(current_app, job_id, jtype)
    return len(created)
