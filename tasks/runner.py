"""The one Celery task per job type, and the runner that owns their state.

The task takes the job id (which is also its task id), runs the type's handler
with a :class:`~tasks.context.JobContext`, and leaves every change of state to
the signal handlers in :mod:`tasks.signals` and the state machine in
:mod:`app.jobstate`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import jobstate
from app.db import new_session, session_scope
from config import AVAILABLE_JOB_TYPES, get_settings
from config.celery import job_task_name
from tasks import backup, bulk_import, cleanup, consolidation, data_export, rl_training
from tasks.context import JobCancelled, JobContext, JobFailed, JobSuperseded

log = logging.getLogger(__name__)

Handler = Callable[[JobContext, Session], dict[str, Any]]

HANDLERS: dict[str, Handler] = {
    "bulk_import": bulk_import.run,
    "data_export": data_export.run,
    "backup": backup.run,
    "cleanup": cleanup.run,
    "consolidation": consolidation.run,
    "rl_training": rl_training.run,
}
assert set(HANDLERS) == set(AVAILABLE_JOB_TYPES), "every available type needs a handler"

# Errors worth another attempt: the database or a network peer went away for a
# moment. Anything else is a bug or bad input and fails the job.
RETRYABLE: tuple[type[BaseException], ...] = (OperationalError, ConnectionError, TimeoutError)


class _Heartbeat(threading.Thread):
    """Touches the job row while the handler runs, so the reconciler can tell a
    busy job from one whose worker died."""

    def __init__(self, job_id: str, attempt: int, interval: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.attempt, self.interval = job_id, attempt, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with session_scope() as session:
                    if not jobstate.heartbeat(session, self.job_id, self.attempt):
                        return
            except Exception:  # a lost connection: try again at the next beat
                log.warning("heartbeat of %s failed", self.job_id, exc_info=True)


def run_job(task: Task, job_id: str) -> dict[str, Any] | None:
    """Run the handler of ``job_id`` for the attempt that task_prerun claimed."""
    claim: jobstate.Claim | None = getattr(task.request, "hebbrix_claim", None)
    if claim is None or not claim.run:
        reason = claim.reason if claim else "not claimed"
        log.info("skipping %s: %s", job_id, reason)
        return None
    settings = get_settings()
    # Everything the handler needs came with the claim: no second read.
    ctx = JobContext(
        job_id=job_id,
        account_id=claim.account_id,
        job_type=claim.job_type,
        parameters=claim.parameters or {},
        attempt=claim.attempt,
        saved=claim.checkpoint or {},
        min_interval=settings.progress_interval,
    )
    heartbeat = _Heartbeat(job_id, claim.attempt, settings.heartbeat_interval)
    heartbeat.start()
    try:
        return _call_handler(ctx)
    except JobCancelled:
        with session_scope() as s:
            jobstate.record_cancel_details(
                s, job_id, {"code": "cancelled", "stage": ctx.stage, **ctx.stats}
            )
        return None
    except JobSuperseded:
        log.warning("attempt %s of %s was superseded; stopping", claim.attempt, job_id)
        return None
    except SoftTimeLimitExceeded:
        limit = settings.time_limits[ctx.job_type][0]
        raise JobFailed(
            "soft_time_limit_exceeded",
            f"The job ran past its time limit of {limit} seconds.",
            stage=ctx.stage,
            **ctx.stats,
        ) from None
    except JobFailed as exc:
        exc.details = {"stage": ctx.stage, **ctx.stats, **exc.details}
        raise
    except RETRYABLE as exc:
        retries = task.request.retries
        raise task.retry(
            exc=exc, countdown=min(60, 2 ** (retries + 1)), max_retries=settings.max_attempts - 1
        ) from exc
    finally:
        heartbeat.stopped.set()


def _call_handler(ctx: JobContext) -> dict[str, Any]:
    """The handler in a session of its own, committed on success."""
    with new_session() as session:
        try:
            result = HANDLERS[ctx.job_type](ctx, session)
            session.commit()
            return result
        except BaseException:
            # Before anyone records what happened: on SQLite an open write
            # transaction of the handler would make that write wait.
            session.rollback()
            raise


def _define_job_task(job_type: str) -> Task:
    soft, hard = get_settings().time_limits[job_type]

    @shared_task(
        name=job_task_name(job_type),
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        # 0 turns a limit off.
        soft_time_limit=soft or None,
        time_limit=hard or None,
        # Expected failures: logged without a traceback.
        throws=(JobFailed,),
    )
    def job_task(self: Task, job_id: str) -> dict[str, Any] | None:
        return run_job(self, job_id)

    return job_task


JOB_TASKS: dict[str, Task] = {t: _define_job_task(t) for t in AVAILABLE_JOB_TYPES}
