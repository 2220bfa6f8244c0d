"""Handing committed jobs to the broker."""

from __future__ import annotations

import logging

from celery import Celery

from app import jobstate
from app.db import session_scope
from config.celery import job_task_name

log = logging.getLogger(__name__)


def publish_job(celery: Celery, job_id: str, job_type: str) -> bool:
    """Publish a committed job; False when the broker could not take it.

    A failure is not an error for the caller: the job stays queued with no
    ``dispatched_at`` and the periodic dispatcher publishes it later.
    """
    try:
        celery.send_task(
            job_task_name(job_type),
            args=[job_id],
            task_id=job_id,
            retry=False,
        )
    except Exception:
        log.warning("broker unavailable; job %s left for the dispatcher", job_id, exc_info=True)
        return False
    with session_scope() as session:
        jobstate.mark_dispatched(session, job_id)
    return True


def revoke_job(celery: Celery, job_id: str, *, terminate: bool = False) -> None:
    """Tell the workers to drop (or, last resort, kill) a cancelled job."""
    try:
        celery.control.revoke(job_id, terminate=terminate, signal="SIGTERM")
    except Exception:
        # The database flag already stops it: a worker checks the row first.
        log.warning("could not broadcast revoke of %s", job_id, exc_info=True)
