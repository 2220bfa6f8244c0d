"""All configuration of Hebbrix Jobs, read from the environment.

With nothing set the *embedded* profile applies: a SQLite file and a kombu
filesystem broker under ``./var/``, so a newcomer needs nothing but Python.
Setting ``DATABASE_URL`` and ``CELERY_BROKER_URL`` selects the *production*
profile (PostgreSQL through psycopg 3, Redis or RabbitMQ). Both profiles run the
same code; only these values differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

JOB_TYPES: tuple[str, ...] = (
    "bulk_import",
    "data_export",
    "backup",
    "consolidation",
    "cleanup",
    "rl_training",
)

# What bulk_import can read (``parameters.format``; detected when not given).
IMPORT_FORMATS: tuple[str, ...] = (
    "pdf",
    "text",
    "markdown",
    "html",
    "json",
    "jsonl",
    "csv",
    "zip",
    "tar",
)

# Types whose handlers exist. The others are refused by the API with a clear
# message instead of being accepted by a handler that would only pretend.
AVAILABLE_JOB_TYPES: tuple[str, ...] = (
    "bulk_import",
    "data_export",
    "backup",
    "cleanup",
    "consolidation",
    "rl_training",
)

# At most one active job of these types per account.
SINGLETON_JOB_TYPES: tuple[str, ...] = ("backup", "consolidation", "cleanup", "rl_training")

# Soft / hard time limits in seconds, per type. The hard limit is also what the
# reconciler uses to fail a job whose worker was killed by it.
DEFAULT_TIME_LIMITS: dict[str, tuple[int, int]] = {
    "bulk_import": (3300, 3600),
    "data_export": (3300, 3600),
    "backup": (3300, 3600),
    "consolidation": (1700, 1800),
    "cleanup": (1700, 1800),
    "rl_training": (3300, 3600),
}


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _env_float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() in {"1", "true", "yes", "on"}


def _time_limits() -> dict[str, tuple[int, int]]:
    limits = dict(DEFAULT_TIME_LIMITS)
    for job_type, (soft, hard) in DEFAULT_TIME_LIMITS.items():
        key = job_type.upper()
        limits[job_type] = (
            _env_int(f"HEBBRIX_{key}_SOFT_TIME_LIMIT", soft),
            _env_int(f"HEBBRIX_{key}_TIME_LIMIT", hard),
        )
    return limits


@dataclass(frozen=True)
class Settings:
    """One immutable snapshot of the configuration."""

    var_dir: Path
    database_url: str
    broker_url: str
    broker_key_prefix: str
    # Where task results go; empty (the default) keeps none: job state lives in
    # the database. Benchmarks set it for a bare Celery round trip.
    result_backend: str
    embedded: bool
    import_allowed_hosts: str
    import_allow_private: bool
    import_max_bytes: int
    import_timeout: float
    max_body_bytes: int
    max_active_jobs: int
    job_retention_days: int
    max_attempts: int
    visibility_timeout: int
    worker_memory_limit_mb: int
    progress_interval: float
    heartbeat_interval: float
    heartbeat_stale_after: float
    cancel_grace_seconds: float
    dispatch_after_seconds: float
    redispatch_after_seconds: float
    sweep_interval: float
    schedule_check_seconds: float
    cleanup_grace_days: int
    cleanup_batch_size: int
    # rl_training refuses to start with less feedback than this to learn from.
    rl_min_feedback_rows: int
    rl_min_feedback_queries: int
    artifact_dir: Path
    # Exports stay downloadable this long; then the sweep and cleanup remove them.
    artifact_retention_days: int
    # Rows per batch that data_export and backup read and write between checkpoints.
    export_batch_size: int
    backup_batch_size: int
    backup_dir: Path
    # Backups kept per account; older ones are pruned after each successful backup.
    backup_keep: int
    # s3://bucket/prefix stores backups there instead of backup_dir. Credentials
    # come from boto3's usual chain (AWS_ACCESS_KEY_ID, ...), never from here.
    backup_s3_url: str
    backup_s3_endpoint_url: str
    backup_s3_region: str
    api_host: str
    api_port: int
    flower_port: int
    flower_basic_auth: str
    public_url: str
    time_limits: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings() -> Settings:
    """Read the environment into a :class:`Settings`."""
    var_dir = Path(_env("HEBBRIX_VAR_DIR", "var")).resolve()
    database_url = os.environ.get("DATABASE_URL", "")
    broker_url = os.environ.get("CELERY_BROKER_URL", "")
    embedded = not database_url and not broker_url
    if not database_url:
        database_url = f"sqlite:///{var_dir / 'hebbrix.db'}"
    elif database_url.startswith(("postgres://", "postgresql://")):
        # psycopg 3 is the driver; accept the URLs every platform hands out.
        database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
    if not broker_url:
        broker_url = "filesystem://"
    # The embedded profile is a local demo: imports may reach this machine's
    # loopback so a file served by `python -m http.server` can be imported.
    # Production allows only public addresses unless hosts are listed.
    default_allowed = "localhost,127.0.0.1,[::1]" if embedded else ""
    api_port = _env_int("HEBBRIX_API_PORT", 8000)
    api_host = _env("HEBBRIX_API_HOST", "127.0.0.1")
    return Settings(
        var_dir=var_dir,
        database_url=database_url,
        broker_url=broker_url,
        broker_key_prefix=_env("HEBBRIX_BROKER_KEY_PREFIX", ""),
        result_backend=_env("HEBBRIX_RESULT_BACKEND", ""),
        embedded=embedded,
        import_allowed_hosts=_env("HEBBRIX_IMPORT_ALLOWED_HOSTS", default_allowed),
        import_allow_private=_env_bool("HEBBRIX_IMPORT_ALLOW_PRIVATE", False),
        import_max_bytes=_env_int("HEBBRIX_IMPORT_MAX_BYTES", 200 * 1024 * 1024),
        import_timeout=_env_float("HEBBRIX_IMPORT_TIMEOUT", 30.0),
        max_body_bytes=_env_int("HEBBRIX_MAX_BODY_BYTES", 1024 * 1024),
        max_active_jobs=_env_int("HEBBRIX_MAX_ACTIVE_JOBS", 100),
        job_retention_days=_env_int("HEBBRIX_JOB_RETENTION_DAYS", 30),
        max_attempts=_env_int("HEBBRIX_MAX_ATTEMPTS", 3),
        visibility_timeout=_env_int("HEBBRIX_VISIBILITY_TIMEOUT", 4 * 3600),
        # Address-space limit of each worker pool child in MiB; 0 for none.
        worker_memory_limit_mb=_env_int("HEBBRIX_WORKER_MEMORY_LIMIT_MB", 0),
        progress_interval=_env_float("HEBBRIX_PROGRESS_INTERVAL", 0.5),
        heartbeat_interval=_env_float("HEBBRIX_HEARTBEAT_INTERVAL", 5.0),
        heartbeat_stale_after=_env_float("HEBBRIX_HEARTBEAT_STALE_AFTER", 60.0),
        cancel_grace_seconds=_env_float("HEBBRIX_CANCEL_GRACE_SECONDS", 30.0),
        dispatch_after_seconds=_env_float("HEBBRIX_DISPATCH_AFTER_SECONDS", 5.0),
        # A queued job is published again after this long (a broker restarted
        # without persistence has lost it); well above any normal queue wait.
        redispatch_after_seconds=_env_float("HEBBRIX_REDISPATCH_AFTER_SECONDS", 1800.0),
        sweep_interval=_env_float("HEBBRIX_SWEEP_INTERVAL", 10.0),
        schedule_check_seconds=_env_float("HEBBRIX_SCHEDULE_CHECK_SECONDS", 60.0),
        cleanup_grace_days=_env_int("HEBBRIX_CLEANUP_GRACE_DAYS", 7),
        cleanup_batch_size=_env_int("HEBBRIX_CLEANUP_BATCH_SIZE", 500),
        rl_min_feedback_rows=_env_int("HEBBRIX_RL_MIN_FEEDBACK_ROWS", 20),
        rl_min_feedback_queries=_env_int("HEBBRIX_RL_MIN_FEEDBACK_QUERIES", 10),
        artifact_dir=Path(_env("HEBBRIX_ARTIFACT_DIR", str(var_dir / "artifacts"))).resolve(),
        artifact_retention_days=_env_int("HEBBRIX_ARTIFACT_RETENTION_DAYS", 7),
        export_batch_size=_env_int("HEBBRIX_EXPORT_BATCH_SIZE", 1000),
        backup_batch_size=_env_int("HEBBRIX_BACKUP_BATCH_SIZE", 1000),
        backup_dir=Path(_env("HEBBRIX_BACKUP_DIR", str(var_dir / "backups"))).resolve(),
        backup_keep=_env_int("HEBBRIX_BACKUP_KEEP", 7),
        backup_s3_url=_env("HEBBRIX_BACKUP_S3_URL", ""),
        backup_s3_endpoint_url=_env("HEBBRIX_BACKUP_S3_ENDPOINT_URL", ""),
        backup_s3_region=_env("HEBBRIX_BACKUP_S3_REGION", "us-east-1"),
        api_host=api_host,
        api_port=api_port,
        flower_port=_env_int("HEBBRIX_FLOWER_PORT", 5555),
        flower_basic_auth=_env("HEBBRIX_FLOWER_BASIC_AUTH", ""),
        public_url=_env("HEBBRIX_PUBLIC_URL", f"http://{api_host}:{api_port}"),
        time_limits=_time_limits(),
    )


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def reload_settings() -> Settings:
    """Re-read the environment (the CLI and tests change it before starting)."""
    global _settings
    _settings = load_settings()
    return _settings
