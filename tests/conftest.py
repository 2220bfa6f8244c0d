"""Test harness: a throwaway PostgreSQL database, an isolated key prefix on the
machine's Redis, real Celery worker processes, and a local HTTP file server.

Nothing is mocked that runs on this machine. The environment is set before any
project module reads it.
"""

from __future__ import annotations

import os
import uuid

RUN_ID = uuid.uuid4().hex[:10]
PG_ADMIN_URL = os.environ.get("HEBBRIX_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HEBBRIX_TEST_REDIS", "redis://127.0.0.1:6379/0")
TEST_DB = f"hebbrix_test_{RUN_ID}"

TEST_ENV = {
    "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{TEST_DB}",
    "CELERY_BROKER_URL": REDIS_URL,
    "HEBBRIX_BROKER_KEY_PREFIX": f"hebbrix-test-{RUN_ID}:",
    "HEBBRIX_IMPORT_ALLOWED_HOSTS": "127.0.0.1",
    "HEBBRIX_PROGRESS_INTERVAL": "0.1",
    "HEBBRIX_HEARTBEAT_INTERVAL": "0.5",
    "HEBBRIX_HEARTBEAT_STALE_AFTER": "4",
    "HEBBRIX_SWEEP_INTERVAL": "1",
    "HEBBRIX_DISPATCH_AFTER_SECONDS": "1",
    "HEBBRIX_CANCEL_GRACE_SECONDS": "5",
    # Beat creates per-account scheduled jobs at its start and then hourly;
    # the schedule tests set their own interval.
    "HEBBRIX_SCHEDULE_CHECK_SECONDS": "3600",
}
os.environ.update(TEST_ENV)

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app import create_app, migrate
from app.auth import create_account
from app.db import reset_engine, session_scope
from config import reload_settings
from config.celery import ALL_QUEUES
from tests.helpers import DATA, Account, FileServer, Proc


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    _admin(f'CREATE DATABASE "{TEST_DB}"')
    reload_settings()
    reset_engine()
    migrate.upgrade()
    yield TEST_ENV["DATABASE_URL"]
    reset_engine()
    _admin(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')


@pytest.fixture(scope="session", autouse=True)
def broker_keys() -> Iterator[None]:
    """Leave nothing of this run in the shared Redis."""
    yield
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    prefix = TEST_ENV["HEBBRIX_BROKER_KEY_PREFIX"]
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@pytest.fixture(scope="session")
def flask_app(database: str) -> Any:
    return create_app({"TESTING": True})


@pytest.fixture()
def client(flask_app: Any) -> Any:
    return flask_app.test_client()


@pytest.fixture()
def make_account(database: str) -> Callable[[], Account]:
    def make(name: str = "test") -> Account:
        with session_scope() as session:
            account, key = create_account(session, name)
            return Account(account.id, key)

    return make


@pytest.fixture()
def account(make_account: Callable[[], Account]) -> Account:
    return make_account()


@pytest.fixture()
def collection(client: Any, account: Account) -> str:
    resp = client.post("/v1/collections", json={"name": "docs"}, headers=account.headers)
    assert resp.status_code == 201, resp.json
    return resp.json["id"]


@pytest.fixture(scope="session")
def log_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hebbrix-test-logs-"))
    yield path
    if os.environ.get("HEBBRIX_KEEP_TEST_LOGS") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def start_worker(database: str, log_dir: Path) -> Iterator[Callable[..., Proc]]:
    """Start real ``celery worker`` processes on the test broker and database."""
    procs: list[Proc] = []

    def start(
        queues: tuple[str, ...] = ALL_QUEUES,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
    ) -> Proc:
        name = f"worker-{uuid.uuid4().hex[:6]}"
        proc = Proc(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks.worker",
                "worker",
                "--queues",
                ",".join(queues),
                "--concurrency",
                str(concurrency),
                "--hostname",
                f"{name}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--task-events",
            ],
            {**os.environ, **(env or {})},
            log_dir,
        )
        procs.append(proc)
        proc.wait_for("ready.")
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture()
def worker(start_worker: Callable[..., Proc]) -> Proc:
    return start_worker()


@pytest.fixture()
def beat(database: str, log_dir: Path, tmp_path: Path) -> Iterator[Proc]:
    """A real beat process running the sweeps every second."""
    proc = Proc(
        "beat",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks.worker",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(tmp_path / "beat-schedule"),
        ],
        dict(os.environ),
        log_dir,
    )
    proc.wait_for("beat: Starting", timeout=30)
    yield proc
    proc.stop()


# --- a local HTTP server for imports ------------------------------------------


@pytest.fixture()
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    for item in DATA.iterdir():
        if item.is_file():
            shutil.copy(item, root / item.name)
    server = FileServer(root)
    yield server
    server.close()


# --- the fault suite ------------------------------------------------------------

_LEDGER: list[Any] = []


@pytest.fixture(scope="session")
def fault_ledger() -> Any:
    from tests.stack import Ledger

    ledger = Ledger()
    _LEDGER.append(ledger)
    return ledger


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for ledger in _LEDGER:
        if ledger.rows:
            terminalreporter.section("fault and attack suite")
            terminalreporter.write_line(ledger.table())
