"""Celery's settings, derived from :mod:`config`: one queue per job type, routes,
delivery guarantees and the beat schedule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from kombu import Queue

from config import AVAILABLE_JOB_TYPES, JOB_TYPES, Settings

SYSTEM_QUEUE = "system"
ALL_QUEUES: tuple[str, ...] = (*JOB_TYPES, SYSTEM_QUEUE)


def job_task_name(job_type: str) -> str:
    return f"hebbrix.jobs.{job_type}"


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem"):
        broker_dir = settings.var_dir / "broker"
        folders = {
            "data_folder_in": broker_dir / "queue",
            "data_folder_out": broker_dir / "queue",
            "control_folder": broker_dir / "control",
            "processed_folder": broker_dir / "processed",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {**{k: str(v) for k, v in folders.items()}, "store_processed": False}
    options: dict[str, Any] = {
        # Unacknowledged messages come back after this long: it must exceed the
        # longest job, or a healthy long job would be delivered twice.
        "visibility_timeout": settings.visibility_timeout,
    }
    if settings.visibility_timeout <= 600:
        # kombu scans for expired unacked messages about every 100 s; with a
        # short timeout that would dominate how long a redelivery takes.
        options.update(
            unacked_restore_interval=max(1, settings.visibility_timeout // 2),
            unacked_restore_throttle=1,
        )
    if settings.broker_key_prefix:
        # Lets several deployments (or test runs) share one Redis.
        options["global_keyprefix"] = settings.broker_key_prefix
    if settings.broker_url.startswith(("redis", "rediss")):
        # A request must not hang when Redis is down: fail fast and let the
        # dispatcher publish the job later.
        options.update(socket_connect_timeout=3, socket_timeout=10, retry_on_timeout=True)
    return options


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    sweep = timedelta(seconds=settings.sweep_interval)
    schedule: dict[str, dict[str, Any]] = {
        "dispatch-queued-jobs": {"task": "hebbrix.system.dispatch_queued_jobs", "schedule": sweep},
        "reconcile-running-jobs": {
            "task": "hebbrix.system.reconcile_running_jobs",
            "schedule": sweep,
        },
        "purge-expired-jobs": {
            "task": "hebbrix.system.purge_expired_jobs",
            "schedule": crontab(minute=17),
        },
        "expire-artifacts": {
            "task": "hebbrix.system.expire_artifacts",
            "schedule": crontab(minute="*/10"),
        },
    }
    # Per-account schedules: beat only checks often; the task creates the job of
    # the current slot (hour, day) once, so a beat that was down at the top of
    # the hour, restarted, or running twice still yields one run per slot.
    check = timedelta(seconds=settings.schedule_check_seconds)
    for job_type, period in (("cleanup", "hourly"), ("consolidation", "daily")):
        if job_type in AVAILABLE_JOB_TYPES:
            schedule[f"{job_type}-every-account"] = {
                "task": "hebbrix.system.schedule_account_jobs",
                "schedule": check,
                "args": (job_type, period),
            }
    return schedule


def celery_config(settings: Settings) -> dict[str, Any]:
    """The lowercase Celery settings for ``settings``."""
    routes: dict[str, dict[str, str]] = {
        job_task_name(t): {"queue": t, "routing_key": t} for t in JOB_TYPES
    }
    routes["hebbrix.system.*"] = {"queue": SYSTEM_QUEUE, "routing_key": SYSTEM_QUEUE}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        # A worker keeps running tasks when the broker drops; their messages are
        # unacknowledged and come back if the worker dies meanwhile.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "result_backend": settings.result_backend or None,
        "result_backend_transport_options": (
            {"global_keyprefix": settings.broker_key_prefix} if settings.broker_key_prefix else {}
        ),
        "task_ignore_result": True,
        "task_queues": [Queue(q, routing_key=q) for q in ALL_QUEUES],
        "task_default_queue": SYSTEM_QUEUE,
        "task_routes": routes,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": str(settings.var_dir / "celerybeat-schedule"),
    }
