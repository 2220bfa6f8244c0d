"""/v1/jobs: start, inspect, list, cancel and delete jobs."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import current_app, g, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from sqlalchemy import delete, select

from app import jobstate
from app.api import get_owned
from app.auth import authenticate
from app.dispatch import publish_job, revoke_job
from app.models import Account, Collection, Job, JobEvent
from app.pagination import paginate
from app.schemas import (
    PARAMETER_SCHEMAS,
    JobCreateSchema,
    JobListQuerySchema,
    JobPageSchema,
    JobSchema,
)
from app.store import feedback_shortfall
from config import AVAILABLE_JOB_TYPES, SINGLETON_JOB_TYPES, get_settings

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Background jobs.")
blp.before_request(authenticate)


def get_owned_job(job_id: str) -> Job:
    return get_owned(Job, job_id, "job")


def _validate_parameters(job_type: str, parameters: dict[str, Any]) -> dict[str, Any]:
    if job_type not in AVAILABLE_JOB_TYPES:
        abort(
            422,
            message=f"Job type '{job_type}' is not available yet.",
            errors={"json": {"type": [f"Job type '{job_type}' is not available yet."]}},
        )
    try:
        loaded = PARAMETER_SCHEMAS[job_type]().load(parameters)
    except ma.ValidationError as err:
        abort(422, message="Invalid job parameters.", errors={"json": {"parameters": err.messages}})
    if job_type in ("bulk_import", "consolidation") and "collection_id" in loaded:
        collection = g.db.get(Collection, loaded["collection_id"])
        if collection is None or collection.account_id != g.account_id:
            abort(
                422,
                message="Invalid job parameters.",
                errors={"json": {"parameters": {"collection_id": ["No such collection."]}}},
            )
    if job_type == "data_export" and loaded.get("collection_ids"):
        wanted = set(loaded["collection_ids"])
        owned = set(
            g.db.scalars(
                select(Collection.id).where(
                    Collection.id.in_(wanted), Collection.account_id == g.account_id
                )
            )
        )
        if missing := sorted(wanted - owned):
            abort(
                422,
                message="Invalid job parameters.",
                errors={
                    "json": {
                        "parameters": {
                            "collection_ids": [f"No such collection: {', '.join(missing)}."]
                        }
                    }
                },
            )
    if job_type == "rl_training":
        # Refused now rather than failed later: the caller can go and rate results.
        shortfall = feedback_shortfall(g.db, g.account_id)
        if shortfall is not None:
            abort(422, message=shortfall, errors={"json": {"type": [shortfall]}})
    # Stored as JSON: keep the caller's plain values, as validated.
    return {key: parameters[key] for key in loaded}


def _check_admission(job_type: str) -> None:
    settings = get_settings()
    # Admissions of one account take turns: the account row stays locked until
    # the new job is committed, so concurrent requests cannot all pass the
    # quota or singleton check below. NO KEY UPDATE (key_share) leaves the row
    # free for foreign-key checks, so workers inserting this account's memories
    # never wait on it. (SQLite already serializes writers.)
    g.db.execute(
        select(Account.id).where(Account.id == g.account_id).with_for_update(key_share=True)
    )
    active = g.db.execute(
        select(Job.type, Job.id)
        .where(Job.account_id == g.account_id, Job.status.in_(jobstate.ACTIVE))
        .limit(settings.max_active_jobs + 1)
    ).all()
    if job_type in SINGLETON_JOB_TYPES:
        for active_type, active_id in active:
            if active_type == job_type:
                abort(
                    409,
                    message=f"A {job_type} job is already active for this account: {active_id}.",
                    errors={"json": {"type": [f"{active_id} is active."]}},
                )
    if len(active) >= settings.max_active_jobs:
        abort(
            429,
            message=f"This account already has {settings.max_active_jobs} active jobs; "
            "wait for some to finish.",
            headers={"Retry-After": "30"},
        )


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(JobCreateSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="A job of this singleton type is already active.")
    @blp.alt_response(429, description="Over the account's active-job quota.")
    def post(self, body: dict[str, Any]) -> tuple[Job, int, dict[str, str]]:
        """Start a job

        Returns at once with the queued job; poll it, or cancel it.
        """
        job_type = body["type"]
        parameters = _validate_parameters(job_type, body["parameters"])
        _check_admission(job_type)
        job = jobstate.create_job(
            g.db,
            account_id=g.account_id,
            job_type=job_type,
            parameters=parameters,
            metadata=body["metadata"],
        )
        g.db.commit()
        # Published only after the commit, so a worker always finds the row.
        publish_job(current_app.extensions["celery"], job.id, job.type)
        # The answer is the job as committed, queued; reading it back would cost a
        # round trip per request and could only show a worker that already took it.
        return job, 202, {"Location": url_for("jobs.JobById", job_id=job.id)}

    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobPageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first

        Filter by `status` and `type`; page with `limit` and the `next_cursor`
        of the previous page as `after`.
        """
        stmt = select(Job).where(Job.account_id == g.account_id)
        if "status" in query:
            stmt = stmt.where(Job.status == query["status"])
        if "type" in query:
            stmt = stmt.where(Job.type == query["type"])
        return paginate(g.db, stmt, Job, query["limit"], query.get("after"))


@blp.route("/<job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema)
    def get(self, job_id: str) -> Job:
        """Get a job: its status, progress, result or error"""
        return get_owned_job(job_id)

    @blp.response(204)
    @blp.alt_response(409, description="The job is still queued or running.")
    def delete(self, job_id: str) -> None:
        """Delete a finished job's record

        What the job produced (memories, exports, backups) is kept.
        """
        job = get_owned_job(job_id)
        if job.status not in jobstate.TERMINAL:
            abort(409, message=f"Job {job_id} is {job.status}; cancel it before deleting it.")
        g.db.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
        g.db.execute(delete(Job).where(Job.id == job_id, Job.status.in_(jobstate.TERMINAL)))
        g.db.commit()


@blp.route("/<job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(200, JobSchema)
    @blp.alt_response(409, description="The job already completed or failed.")
    def post(self, job_id: str) -> Job:
        """Cancel a job

        The job is cancelled at once; a running handler stops at its next
        checkpoint. Cancelling a cancelled job changes nothing.
        """
        job = get_owned_job(job_id)
        settings = get_settings()
        if jobstate.cancel(
            g.db,
            job_id,
            retention_days=settings.job_retention_days,
            reason="cancelled by the client",
        ):
            g.db.commit()
            revoke_job(current_app.extensions["celery"], job_id)
        g.db.refresh(job)
        g.db.commit()
        if job.status in (jobstate.COMPLETED, jobstate.FAILED):
            abort(409, message=f"Job {job_id} already {job.status}.")
        return job
