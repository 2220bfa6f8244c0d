"""What a job handler sees of the machinery around it.

A handler is ``run(ctx, session) -> result``. It reports through ``ctx``
(``progress``, ``checkpoint``, ``stats``) and raises :class:`JobFailed` for input
it cannot process. It knows nothing of Celery or HTTP: the runner turns these
into states.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app import jobstate
from app.db import session_scope
from app.models import Job

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot succeed (bad input, a refused source): fail it, do not retry."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles a task's exception for its failure signal; keep ours whole.
        return (_rebuild_failure, (self.code, self.message, self.details))


def _rebuild_failure(code: str, message: str, details: dict[str, Any]) -> JobFailed:
    return JobFailed(code, message, **details)


class JobStopped(Exception):
    """The attempt must stop now; raised out of ``progress``/``checkpoint``."""


class JobCancelled(JobStopped):
    """The job was cancelled by its owner."""


class JobSuperseded(JobStopped):
    """A newer attempt owns the job (this one was presumed lost)."""


@dataclass
class JobContext:
    job_id: str
    account_id: str
    job_type: str
    parameters: dict[str, Any]
    attempt: int
    # What an earlier attempt saved with checkpoint(state); {} on a first run.
    saved: dict[str, Any] = field(default_factory=dict)
    # Counts so far; they go into error_details if the job fails or is cancelled.
    stats: dict[str, Any] = field(default_factory=dict)
    stage: str = "starting"
    min_interval: float = 0.5
    _percent: float = 0.0
    _message: str | None = None
    _last_write: float = field(default=0.0, repr=False)

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0..100); written at most every ``min_interval`` seconds."""
        self._percent = max(self._percent, min(100.0, percent))
        if message is not None:
            self._message = message
        if time.monotonic() - self._last_write >= self.min_interval:
            self._write(None)

    def checkpoint(self, state: dict[str, Any] | None = None) -> None:
        """A safe place to stop. With ``state``, saves it for a redelivered attempt.

        Raises :class:`JobCancelled` once the job has been cancelled. Without
        ``state`` it asks the database at most every ``min_interval`` seconds.
        """
        if state is not None:
            self.saved = state
            self._write(state)
        elif time.monotonic() - self._last_write >= self.min_interval:
            self._write(None)

    def _write(self, state: dict[str, Any] | None) -> None:
        self._last_write = time.monotonic()
        try:
            with session_scope() as session:
                if jobstate.report_progress(
                    session, self.job_id, self.attempt, self._percent, self._message, state
                ):
                    return
                row = session.execute(
                    select(Job.status, Job.attempts).where(Job.id == self.job_id)
                ).first()
        except OperationalError:
            if state is not None:
                raise  # a resume point that was not saved: let the runner retry
            # A progress report is not worth the job: try again at the next one.
            log.warning("progress write for %s failed; database unavailable", self.job_id)
            return
        if row is not None and row.status == jobstate.CANCELLED:
            raise JobCancelled(self.job_id)
        raise JobSuperseded(self.job_id)
