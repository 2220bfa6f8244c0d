"""The one place that builds the Celery application."""

from __future__ import annotations

from celery import Celery

from config import get_settings
from config.celery import celery_config

# Modules that define tasks and connect signals; only worker and beat processes
# import them, the API publishes by task name.
TASK_MODULES = ("tasks.runner", "tasks.system", "tasks.signals")


def make_celery(*, with_tasks: bool = False) -> Celery:
    """A Celery app configured from the environment, made the default app."""
    celery = Celery("hebbrix", include=list(TASK_MODULES) if with_tasks else [])
    celery.config_from_object(celery_config(get_settings()))
    celery.set_default()
    return celery
