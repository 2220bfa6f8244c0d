"""The job state machine: every change of a job's state goes through here.

Both sides call it: the API (create, cancel, delete) and the workers (claim an
attempt, progress, complete, fail, retry). Each write is a conditional
``UPDATE ... WHERE status = <from>`` so a late or duplicate signal can never move
a job out of a terminal state, and each transition is recorded as a job event.

    queued  -> running -> completed | failed | cancelled
    queued  -> cancelled | failed
    running -> queued            (retry / lost worker; the next claim adds an attempt)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, update
from sqlalchemy.orm import Session

from app.models import Job, JobEvent, new_id, utcnow

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (COMPLETED, FAILED, CANCELLED)
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)


def create_job(
    session: Session,
    *,
    account_id: str,
    job_type: str,
    parameters: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    schedule_key: str | None = None,
    job_id: str | None = None,
) -> Job:
    """Add a queued job and its first event; the caller commits, then publishes."""
    now = utcnow()
    job = Job(
        id=job_id or new_id("job"),
        account_id=account_id,
        type=job_type,
        status=QUEUED,
        progress=0.0,
        parameters=parameters,
        metadata_=metadata or {},
        queue=job_type,
        attempts=0,
        schedule_key=schedule_key,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, from_status=None, to_status=QUEUED, created_at=now))
    return job


def transition(
    session: Session,
    job_id: str,
    from_statuses: Iterable[str],
    to_status: str,
    *,
    message: str | None = None,
    attempt: int | None = None,
    **values: Any,
) -> str | None:
    """Move ``job_id`` to ``to_status`` if it is in one of ``from_statuses``.

    With ``attempt`` the move also requires that no later attempt has claimed
    the job, so a superseded worker cannot overwrite its successor. Returns the
    status the job came from, or None when nothing matched (the caller lost a
    race, which is never an error). The caller commits.
    """
    now = utcnow()
    values.setdefault("updated_at", now)
    for from_status in from_statuses:
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.status == from_status)
            .values(status=to_status, **values)
            .execution_options(synchronize_session=False)
        )
        if attempt is not None:
            stmt = stmt.where(Job.attempts == attempt)
        if session.execute(stmt).rowcount == 1:
            if from_status != to_status or message:
                session.add(
                    JobEvent(
                        job_id=job_id,
                        from_status=from_status,
                        to_status=to_status,
                        message=message,
                        created_at=now,
                    )
                )
            return from_status
    return None


def _terminal_values(retention_days: int) -> dict[str, Any]:
    now = utcnow()
    return {"finished_at": now, "expires_at": now + timedelta(days=retention_days), "worker": None}


def mark_dispatched(session: Session, job_id: str, *, again: bool = False) -> None:
    """Record that the broker took the job (``again``: a re-publish of a queued job)."""
    stmt = update(Job).where(Job.id == job_id).values(dispatched_at=utcnow())
    if not again:
        stmt = stmt.where(Job.dispatched_at.is_(None))
    session.execute(stmt.execution_options(synchronize_session=False))


@dataclass(frozen=True)
class Claim:
    """What a worker may do with a delivered job, and what it needs to run it."""

    run: bool
    attempt: int = 0
    reason: str = ""
    account_id: str = ""
    job_type: str = ""
    parameters: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None


def claim_attempt(
    session: Session,
    job_id: str,
    *,
    worker: str,
    max_attempts: int,
    previous_is_dead: Callable[[Job], bool],
    retention_days: int,
) -> Claim:
    """Start a new attempt of ``job_id`` for ``worker``, or say why not.

    A job still ``running`` is taken over only when ``previous_is_dead`` finds
    its previous attempt dead (a redelivery after a lost worker); a live
    duplicate delivery is skipped. Past ``max_attempts`` the job fails instead, so a job
    that kills its worker every time cannot loop forever.
    """
    job = session.get(Job, job_id)
    if job is None:
        return Claim(False, reason="no such job")
    if job.status not in ACTIVE:
        return Claim(False, reason=f"job is {job.status}")
    if job.status == RUNNING and not previous_is_dead(job):
        return Claim(False, reason="job is running elsewhere")
    if job.attempts >= max_attempts:
        fail(
            session,
            job_id,
            code="attempts_exhausted",
            message=f"The job was stopped after {job.attempts} attempts that did not finish.",
            details={"attempts": job.attempts},
            retention_days=retention_days,
        )
        return Claim(False, reason="attempts exhausted")
    now = utcnow()
    attempt = job.attempts + 1
    came_from = transition(
        session,
        job_id,
        (job.status,),
        RUNNING,
        message=None if job.status == QUEUED else f"attempt {attempt} after a lost worker",
        attempt=job.attempts,
        attempts=attempt,
        started_at=job.started_at or now,
        attempt_started_at=now,
        heartbeat_at=now,
        worker=worker,
    )
    if came_from is None:
        return Claim(False, reason="lost a race for the job")
    return Claim(
        True,
        attempt=attempt,
        account_id=job.account_id,
        job_type=job.type,
        parameters=dict(job.parameters),
        checkpoint=dict(job.checkpoint or {}),
    )


def report_progress(
    session: Session,
    job_id: str,
    attempt: int,
    progress: float,
    message: str | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> bool:
    """Record progress of a running attempt; False when the attempt should stop."""
    progress = max(0.0, min(100.0, progress))
    values: dict[str, Any] = {
        # Progress never goes down, whatever order the writes land in.
        "progress": case((Job.progress < progress, progress), else_=Job.progress),
        "heartbeat_at": utcnow(),
        "updated_at": utcnow(),
    }
    if message is not None:
        values["progress_message"] = message
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def complete(
    session: Session, job_id: str, attempt: int, result: dict[str, Any], *, retention_days: int
) -> bool:
    return (
        transition(
            session,
            job_id,
            (RUNNING,),
            COMPLETED,
            attempt=attempt,
            result=result,
            progress=100.0,
            progress_message=None,
            checkpoint=None,
            **_terminal_values(retention_days),
        )
        is not None
    )


def fail(
    session: Session,
    job_id: str,
    *,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    attempt: int | None = None,
    retention_days: int,
) -> bool:
    error_details = {"code": code, **(details or {})}
    return (
        transition(
            session,
            job_id,
            ACTIVE,
            FAILED,
            message=message,
            attempt=attempt,
            error_message=message,
            error_details=error_details,
            **_terminal_values(retention_days),
        )
        is not None
    )


def cancel(
    session: Session, job_id: str, *, retention_days: int, reason: str | None = None
) -> bool:
    """Mark an active job cancelled at once; the worker notices at its next checkpoint."""
    now = utcnow()
    values = _terminal_values(retention_days)
    # A running attempt keeps its worker recorded so the sweep can terminate a
    # handler that ignores the cancellation.
    values.pop("worker")
    return (
        transition(
            session,
            job_id,
            ACTIVE,
            CANCELLED,
            message=reason,
            cancel_requested_at=now,
            **values,
        )
        is not None
    )


def requeue(
    session: Session, job_id: str, *, attempt: int | None, reason: str, redispatch: bool
) -> bool:
    """Put a running job back in the queue (a retry, or its worker was lost)."""
    values: dict[str, Any] = {"worker": None}
    if redispatch:
        # Nothing holds a message for it any more: let the dispatcher publish it.
        values["dispatched_at"] = None
    return (
        transition(session, job_id, (RUNNING,), QUEUED, message=reason, attempt=attempt, **values)
        is not None
    )


def record_cancel_details(session: Session, job_id: str, details: dict[str, Any]) -> None:
    """Say what a cancelled job had done before it stopped."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == CANCELLED)
        .values(error_details=details, worker=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
