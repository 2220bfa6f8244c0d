"""Entry point for ``celery -A tasks.worker worker|beat|flower``."""

from tasks.celery_app import make_celery

celery = make_celery(with_tasks=True)
