"""The ``hebbrix-jobs`` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click
from sqlalchemy import select

from app import migrate
from app.auth import create_account, create_key, revoke_key
from app.backups import BackupError, list_backups, restore_backup
from app.db import reset_engine, session_scope
from app.models import Account
from config import reload_settings
from config.celery import ALL_QUEUES


@click.group()
def main() -> None:
    """Hebbrix Jobs: the background-jobs service of the Hebbrix memory store."""
    reload_settings()


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the migrations to the configured database."""
    migrate.upgrade(revision=revision)
    click.echo(f"database is at {revision}")


@main.group()
def accounts() -> None:
    """Accounts and their API keys."""


@accounts.command("create")
@click.argument("name")
def accounts_create(name: str) -> None:
    """Create an account; its API key is the last line printed (shown once)."""
    with session_scope() as session:
        account, key = create_account(session, name)
        account_id = account.id
    click.echo(f"account {account_id} ({name})")
    click.echo(key)


@accounts.command("list")
def accounts_list() -> None:
    """List accounts."""
    with session_scope() as session:
        for account in session.scalars(select(Account).order_by(Account.created_at)):
            click.echo(f"{account.id}\t{account.name}\t{account.created_at.isoformat()}")


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.argument("account_id")
def keys_create(account_id: str) -> None:
    """Add an API key to an account; the key is the last line printed."""
    with session_scope() as session:
        if session.get(Account, account_id) is None:
            raise click.ClickException(f"no account {account_id}")
        key = create_key(session, account_id)
    click.echo(key)


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke an API key (given as the key itself)."""
    with session_scope() as session:
        if not revoke_key(session, key):
            raise click.ClickException("no such live key")
    click.echo("revoked")


@main.group()
def backups() -> None:
    """Account backups (made by the backup job)."""


@backups.command("list")
@click.argument("account_id")
def backups_list(account_id: str) -> None:
    """List an account's backups, newest first."""
    with session_scope() as session:
        if session.get(Account, account_id) is None:
            raise click.ClickException(f"no account {account_id}")
        rows = list_backups(session, account_id)
    for backup in rows:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(backup.counts.items()))
        click.echo(
            f"{backup.id}\t{backup.created_at.isoformat()}\t{backup.bytes}\t{backup.sha256}"
            f"\t{backup.location}\t{counts}"
        )


@backups.command("restore")
@click.argument("backup_id")
@click.option(
    "--into",
    "into",
    metavar="NEW_ACCOUNT_NAME",
    default=None,
    help="Restore into a new account of this name (fresh ids) instead of in place.",
)
def backups_restore(backup_id: str, into: str | None) -> None:
    """Restore a backup after verifying its checksums.

    In place, the account's collections, documents, memories, index entries,
    feedback and policies are replaced by the backup's, in one transaction.
    With --into, a new account gets a copy; its API key is printed once.
    """
    with session_scope() as session:
        try:
            result = restore_backup(session, backup_id, into_account_name=into)
        except BackupError as exc:
            raise click.ClickException(str(exc)) from None
    where = "in place" if result.in_place else "into a new account"
    click.echo(f"restored {backup_id} {where}: account {result.account_id}")
    for name, count in result.counts.items():
        click.echo(f"  {name}: {count}")
    if result.api_key:
        click.echo(result.api_key)


def _local_key() -> tuple[str, str]:
    """A new API key for the "local" account (made on first run), and its id."""
    with session_scope() as session:
        account = session.scalar(select(Account).where(Account.name == "local").limit(1))
        if account is None:
            account, key = create_account(session, "local")
            return key, account.id
        return create_key(session, account.id), account.id


def _check_port_free(host: str, port: int, name: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise click.ClickException(
                f"{name} port {host}:{port} is in use; choose another with --port / "
                "--flower-port (or HEBBRIX_API_PORT / HEBBRIX_FLOWER_PORT)."
            ) from None


def _check_flower_auth(basic_auth: str, *, embedded: bool) -> None:
    """Flower can revoke and kill tasks: outside the embedded profile it must ask
    for a login, given as ``user:password`` (several separated by commas)."""
    if not basic_auth:
        if embedded:
            return
        raise click.ClickException(
            "Flower needs HEBBRIX_FLOWER_BASIC_AUTH=user:password outside the embedded "
            "profile (or pass --no-flower)."
        )
    for credential in basic_auth.split(","):
        user, _, password = credential.partition(":")
        if not user or not password:
            raise click.ClickException(
                "HEBBRIX_FLOWER_BASIC_AUTH must be user:password (several separated by commas)."
            )


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Each child leads its own process group so a stop reaches its workers too.
    return subprocess.Popen(args, env=env, start_new_session=True)


@main.command("run")
@click.option("--host", default=None, help="API address [HEBBRIX_API_HOST, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="API port [HEBBRIX_API_PORT, 8000].")
@click.option("--flower-port", type=int, default=None, help="[HEBBRIX_FLOWER_PORT, 5555].")
@click.option("--concurrency", type=int, default=2, show_default=True)
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
def run(
    host: str | None, port: int | None, flower_port: int | None, concurrency: int, no_flower: bool
) -> None:
    """Run the whole stack: API, a worker for every queue, beat and Flower."""
    if host:
        os.environ["HEBBRIX_API_HOST"] = host
    if port:
        os.environ["HEBBRIX_API_PORT"] = str(port)
    if flower_port:
        os.environ["HEBBRIX_FLOWER_PORT"] = str(flower_port)
    settings = reload_settings()
    if not no_flower:
        # Refused before anything starts: a half-started stack would be left running.
        _check_flower_auth(settings.flower_basic_auth, embedded=settings.embedded)
    ports = {"API": settings.api_port} | ({} if no_flower else {"Flower": settings.flower_port})
    for name, wanted in ports.items():
        _check_port_free(settings.api_host, wanted, name)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade()
    key, account_id = _local_key()
    reset_engine()  # the children open their own connections

    env = {**os.environ, "HEBBRIX_VAR_DIR": str(settings.var_dir)}
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "tasks.worker"]
    bind = f"{settings.api_host}:{settings.api_port}"
    children = {
        "api": _spawn(
            [python, "-m", "gunicorn", "--bind", bind, "--workers", "2", "--threads", "4",
             "--access-logfile", "-", "app.wsgi:app"],
            env,
        ),
        "worker": _spawn(
            [*celery, "worker", "--queues", ",".join(ALL_QUEUES), "--concurrency",
             str(concurrency), "--hostname", "local@%h", "--loglevel", "INFO",
             "--task-events"],
            env,
        ),
        "beat": _spawn(
            [*celery, "beat", "--loglevel", "INFO",
             "--schedule", str(settings.var_dir / "celerybeat-schedule")],
            env,
        ),
    }
    flower_url = None
    if not no_flower:
        flower = [*celery, "flower", f"--port={settings.flower_port}",
                  f"--address={settings.api_host}"]
        flower_env = dict(env)
        if settings.flower_basic_auth:
            # Through the environment, not --basic-auth: a command line is readable
            # by every local user (ps), the process environment is not.
            flower_env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
        else:
            # The embedded profile only (checked above): a local demo, so let
            # Flower's HTTP API answer without a login too.
            flower_env["FLOWER_UNAUTHENTICATED_API"] = "true"
        children["flower"] = _spawn(flower, flower_env)
        flower_url = f"http://{settings.api_host}:{settings.flower_port}"

    profile = "embedded" if settings.embedded else "production"
    click.echo(f"Hebbrix Jobs is running ({profile} profile, data in {settings.var_dir})")
    click.echo(f"API:     {settings.public_url}  (OpenAPI: {settings.public_url}/openapi.json)")
    if flower_url:
        click.echo(f"Flower:  {flower_url}")
    click.echo(f"API key: {key}  (account {account_id})")
    click.echo("Press Ctrl+C to stop.", err=True)
    sys.stdout.flush()

    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                click.echo(f"{name} exited with {child.returncode}; stopping", err=True)
                exit_code = 1
                stopping = True
                break
        time.sleep(0.5)
    for child in children.values():
        if child.poll() is None:
            # The leader only: a Celery worker's warm shutdown lets its pool
            # children finish their task, which a signal to the group would not.
            child.terminate()
    deadline = time.monotonic() + 30
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
