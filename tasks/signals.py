"""Celery signals -> job states. Every write goes through :mod:`app.jobstate`,
conditional on the state and the attempt it comes from, so signals that arrive
late or twice change nothing."""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    task_failure,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
    worker_process_init,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import jobstate
from app.db import reset_engine, session_scope
from app.models import Job, utcnow
from config import get_settings
from tasks.context import JobFailed

log = logging.getLogger(__name__)

JOB_TASK_PREFIX = "hebbrix.jobs."
HOSTNAME = socket.gethostname()
# A state write that meets a restarting database waits this long in all before
# giving up; the reconciler settles whatever is left.
DB_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)

T = TypeVar("T")


def write_state(action: Callable[[Session], T]) -> T:
    """Run one short state write, retrying while the database is unreachable."""
    for delay in (*DB_RETRY_DELAYS, None):
        try:
            with session_scope() as session:
                return action(session)
        except OperationalError:
            if delay is None:
                raise
            log.warning("database unavailable for a state write; retrying in %ss", delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_job_task(task: Task | None) -> bool:
    return task is not None and (task.name or "").startswith(JOB_TASK_PREFIX)


def _claimed_attempt(task: Task) -> int | None:
    claim = getattr(task.request, "hebbrix_claim", None)
    return claim.attempt if claim is not None and claim.run else None


def previous_attempt_dead(job: Job, stale_after: float) -> bool:
    """Whether the attempt recorded on a ``running`` job can no longer be alive."""
    if job.worker is None:
        return True
    host, _, pid = job.worker.rpartition(":")
    if host == HOSTNAME and pid.isdigit():
        if int(pid) == os.getpid():
            return True  # a prefork child runs one task at a time: not this one
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    heartbeat = job.heartbeat_at or job.attempt_started_at
    return heartbeat is None or heartbeat < utcnow() - timedelta(seconds=stale_after)


@worker_process_init.connect
def _fresh_engine_in_child(**_: Any) -> None:
    # Connections must not cross the fork from the prefork parent.
    reset_engine()
    limit_mb = get_settings().worker_memory_limit_mb
    if limit_mb > 0:
        # A runaway job then fails with MemoryError in its own child instead of
        # drawing the kernel's out-of-memory killer onto the whole machine.
        limit = limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@task_prerun.connect
def _claim(task_id: str, task: Task, **_: Any) -> None:
    if not _is_job_task(task):
        return
    settings = get_settings()

    def claim_it(session: Session) -> jobstate.Claim:
        return jobstate.claim_attempt(
            session,
            task_id,
            worker=f"{HOSTNAME}:{os.getpid()}",
            max_attempts=settings.max_attempts,
            previous_is_dead=lambda job: previous_attempt_dead(
                job, settings.heartbeat_stale_after
            ),
            retention_days=settings.job_retention_days,
        )

    claim = write_state(claim_it)
    task.request.hebbrix_claim = claim


@task_success.connect
def _completed(sender: Task, result: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    attempt = _claimed_attempt(sender)
    if attempt is None or result is None:
        return
    job_id = sender.request.id
    retention = get_settings().job_retention_days

    def finish(session: Session) -> None:
        if jobstate.complete(session, job_id, attempt, result, retention_days=retention):
            return
        # Cancelled while the handler was finishing: the cancel won, but say
        # what the handler had done by then.
        jobstate.record_cancel_details(
            session, job_id, {"code": "cancelled", "stage": "finished", **result}
        )

    write_state(finish)


@task_failure.connect
def _failed(sender: Task, task_id: str, exception: BaseException, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    if isinstance(exception, JobFailed):
        code, message, details = exception.code, exception.message, exception.details
    elif isinstance(exception, MemoryError):
        code = "out_of_memory"
        message = "The job ran out of memory; a smaller source or a bigger worker is needed."
        details = {}
    elif isinstance(exception, TimeLimitExceeded):
        code = "time_limit_exceeded"
        message = "The job was stopped at its hard time limit."
        details = {}
    else:
        # The client gets one sentence, never the traceback (that is in the log).
        code = "internal_error"
        message = f"The job failed because of an internal error ({type(exception).__name__})."
        details = {}
    attempt = _claimed_attempt(sender)
    retention = get_settings().job_retention_days
    write_state(
        lambda session: jobstate.fail(
            session,
            task_id,
            code=code,
            message=message,
            details=details,
            attempt=attempt,
            retention_days=retention,
        )
    )


@task_retry.connect
def _retrying(sender: Task, request: Any, reason: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    claim = getattr(request, "hebbrix_claim", None)
    attempt = claim.attempt if claim is not None else None
    why = f"retrying after: {type(reason).__name__}" if reason else "retrying"
    write_state(
        lambda session: jobstate.requeue(
            session, request.id, attempt=attempt, reason=why, redispatch=False
        )
    )


@task_revoked.connect
def _revoked(sender: Task | None, request: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    retention = get_settings().job_retention_days
    write_state(
        lambda session: jobstate.cancel(
            session, request.id, retention_days=retention, reason="revoked"
        )
    )
