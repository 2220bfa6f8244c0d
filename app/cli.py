"""The ``hebbrix-jobs`` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click
from sqlalchemy import select

from app import migrate
from app.auth import create_account, create_key, revoke_key
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


def _local_key() -> str:
    with session_scope() as session:
        account = session.scalar(select(Account).where(Account.name == "local").limit(1))
        if account is None:
            _, key = create_account(session, "local")
            return key
        return create_key(session, account.id)


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
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade()
    key = _local_key()
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
        if settings.flower_basic_auth:
            flower.append(f"--basic-auth={settings.flower_basic_auth}")
        elif settings.embedded:
            # A local demo: let Flower's HTTP API answer without a login too.
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
        else:
            raise click.ClickException(
                "Flower needs HEBBRIX_FLOWER_BASIC_AUTH=user:password outside the embedded "
                "profile (or pass --no-flower)."
            )
        children["flower"] = _spawn(flower, env)
        flower_url = f"http://{settings.api_host}:{settings.flower_port}"

    profile = "embedded" if settings.embedded else "production"
    click.echo(f"Hebbrix Jobs is running ({profile} profile, data in {settings.var_dir})")
    click.echo(f"API:     {settings.public_url}  (OpenAPI: {settings.public_url}/openapi.json)")
    if flower_url:
        click.echo(f"Flower:  {flower_url}")
    click.echo(f"API key: {key}")
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
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
