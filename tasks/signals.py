"""Celery signals -> job states. Every write goes through :mod:`app.jobstate`,
conditional on the state and the attempt it comes from, so signals that arrive
late or twice change nothing."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

from celery import Task
from celery.signals import (
    task_failure,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
    worker_process_init,
)

from app import jobstate
from app.db import reset_engine, session_scope
from app.models import Job, utcnow
from config import get_settings
from tasks.context import JobFailed

log = logging.getLogger(__name__)

JOB_TASK_PREFIX = "hebbrix.jobs."
HOSTNAME = socket.gethostname()


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


@task_prerun.connect
def _claim(task_id: str, task: Task, **_: Any) -> None:
    if not _is_job_task(task):
        return
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, task_id)
        dead = job is not None and previous_attempt_dead(job, settings.heartbeat_stale_after)
        claim = jobstate.claim_attempt(
            session,
            task_id,
            worker=f"{HOSTNAME}:{os.getpid()}",
            max_attempts=settings.max_attempts,
            previous_is_dead=dead,
            retention_days=settings.job_retention_days,
        )
    task.request.hebbrix_claim = claim


@task_success.connect
def _completed(sender: Task, result: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    attempt = _claimed_attempt(sender)
    if attempt is None or result is None:
        return
    with session_scope() as session:
        jobstate.complete(
            session,
            sender.request.id,
            attempt,
            result,
            retention_days=get_settings().job_retention_days,
        )


@task_failure.connect
def _failed(sender: Task, task_id: str, exception: BaseException, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    if isinstance(exception, JobFailed):
        code, message, details = exception.code, exception.message, exception.details
    else:
        # The client gets one sentence, never the traceback (that is in the log).
        code = "internal_error"
        message = f"The job failed because of an internal error ({type(exception).__name__})."
        details = {}
    with session_scope() as session:
        jobstate.fail(
            session,
            task_id,
            code=code,
            message=message,
            details=details,
            attempt=_claimed_attempt(sender),
            retention_days=get_settings().job_retention_days,
        )


@task_retry.connect
def _retrying(sender: Task, request: Any, reason: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    claim = getattr(request, "hebbrix_claim", None)
    with session_scope() as session:
        jobstate.requeue(
            session,
            request.id,
            attempt=claim.attempt if claim is not None else None,
            reason=f"retrying after: {type(reason).__name__}" if reason else "retrying",
            redispatch=False,
        )


@task_revoked.connect
def _revoked(sender: Task | None, request: Any, **_: Any) -> None:
    if not _is_job_task(sender):
        return
    with session_scope() as session:
        jobstate.cancel(
            session,
            request.id,
            retention_days=get_settings().job_retention_days,
            reason="revoked",
        )
