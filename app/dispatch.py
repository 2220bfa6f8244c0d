"""Handing committed jobs to the broker."""

from __future__ import annotations

import logging
import time

from celery import Celery
from sqlalchemy import text

from app import jobstate
from app.db import session_scope
from config.celery import job_task_name

log = logging.getLogger(__name__)

# After a failed publish, jobs skip the broker for this long and are left to the
# dispatcher sweep, which publishes them once the broker answers again.
BROKER_BACKOFF_SECONDS = 5.0
# Kept on the Celery app, as it is that app's broker which is down.
_DOWN_UNTIL = "hebbrix_broker_down_until"


def publish_job(celery: Celery, job_id: str, job_type: str, *, again: bool = False) -> bool:
    """Publish a committed job; False when the broker could not take it.

    A failure is not an error for the caller: the job stays queued with no
    ``dispatched_at`` and the periodic dispatcher publishes it later.
    """
    if time.monotonic() < getattr(celery, _DOWN_UNTIL, 0.0):
        return False
    try:
        celery.send_task(
            job_task_name(job_type),
            args=[job_id],
            task_id=job_id,
            retry=False,
        )
    except Exception:
        # Finding the broker down costs seconds of connection retries; spare the
        # next requests that wait while it is likely still down.
        setattr(celery, _DOWN_UNTIL, time.monotonic() + BROKER_BACKOFF_SECONDS)
        log.warning("broker unavailable; job %s left for the dispatcher", job_id, exc_info=True)
        return False
    with session_scope() as session:
        if session.get_bind().dialect.name == "postgresql":
            # Only a hint for the dispatcher: a database crash that loses it makes
            # the job be published once more, which is harmless. Not worth a wait
            # for the disk on every job.
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        jobstate.mark_dispatched(session, job_id, again=again)
    return True


def revoke_job(celery: Celery, job_id: str, *, terminate: bool = False) -> None:
    """Tell the workers to drop (or, last resort, kill) a cancelled job."""
    try:
        celery.control.revoke(job_id, terminate=terminate, signal="SIGTERM")
    except Exception:
        # The database flag already stops it: a worker checks the row first.
        log.warning("could not broadcast revoke of %s", job_id, exc_info=True)
