"""Whole stacks of real processes for the fault suite, each on services of its own.

A fault test breaks things: so it gets its own redis-server on a free port and,
where it breaks the database, its own throwaway PostgreSQL cluster. The API runs
under gunicorn, workers and beat as Celery processes, all driven over HTTP on
loopback, never the machine's shared services.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg

from config.celery import ALL_QUEUES
from tests.helpers import ROOT, Proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30, up: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            if up:
                return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'}")


class RedisServer:
    """A private redis-server that a test may stop and start again on one port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        wait_port(self.port, up=False)


def _pg_bin(name: str) -> str:
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
        candidate = Path(bindir) / name
        if candidate.exists():
            return str(candidate)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: PostgreSQL server binaries are needed")
    return found


def _runuser() -> str:
    # It lives in sbin, which a minimal PATH may leave out.
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if not found:
        raise RuntimeError("runuser not found: needed to run PostgreSQL as a non-root user")
    return found


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb in a temp dir) on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hebbrix-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        # PostgreSQL refuses to run as root; run it as the postgres user then.
        self.prefix = [_runuser(), "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(self.dir, "postgres")
        subprocess.run(
            [*self.prefix, _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True,
        )
        self.start()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE hebbrix")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/hebbrix"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, _pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "30", *args],
            check=True, capture_output=True,
        )

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=200", "-l", str(self.dir / "log"), "start")
        wait_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "stop")

    def terminate_backends(self, database: str) -> int:
        """Kill every client connection to ``database``, server-side."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
            ).fetchall()
        return len(rows)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Http:
    """A tiny JSON client for the API under test, with bounded timeouts."""

    def __init__(self, base: str, key: str | None = None) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = None,
             timeout: float = 15) -> tuple[int, Any, dict[str, str]]:
        headers = {"Content-Type": "application/json"}
        if key or self.key:
            headers["Authorization"] = f"Bearer {key or self.key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return err.code, body, dict(err.headers)

    def job(self, job_id: str) -> dict[str, Any]:
        status, body, _ = self.call("GET", f"/v1/jobs/{job_id}")
        assert status == 200, (status, body)
        return body

    def start(self, job_type: str, **parameters: Any) -> dict[str, Any]:
        status, body, _ = self.call("POST", "/v1/jobs",
                                    {"type": job_type, "parameters": parameters})
        assert status == 202, (status, body)
        return body

    def wait(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
             timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.job(job_id)
            except (AssertionError, OSError):
                time.sleep(0.2)
                continue
            if last["status"] in statuses:
                return last
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} stayed {last.get('status')}: {last}")


class Stack:
    """API (gunicorn), workers and beat against a given database and broker."""

    def __init__(self, *, database_url: str, broker_url: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
        self.env = {
            **base,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "HEBBRIX_BROKER_KEY_PREFIX": f"faults-{uuid.uuid4().hex[:8]}:",
            **(env or {}),
        }
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.cli("db", "upgrade")
        self.key = self.cli("accounts", "create", "faults").strip().splitlines()[-1]
        self.api_port = free_port()
        self.http = Http(f"http://127.0.0.1:{self.api_port}", self.key)

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"hebbrix-jobs {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def _proc(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, {**self.env, **(env or {})}, self.log_dir)
        self.procs.append(proc)
        return proc

    def start_api(self, workers: int = 2) -> Proc:
        proc = self._proc("api", [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.api_port}",
            "--workers", str(workers), "--threads", "4", "--timeout", "60",
            "--graceful-timeout", "5", "app.wsgi:app",
        ])
        wait_port(self.api_port)
        return proc

    def start_worker(self, queues: tuple[str, ...] = ALL_QUEUES, concurrency: int = 1,
                     env: dict[str, str] | None = None, pool: str = "prefork") -> Proc:
        name = f"worker-{uuid.uuid4().hex[:6]}"
        proc = self._proc(name, [
            sys.executable, "-m", "celery", "-A", "tasks.worker", "worker",
            "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", pool,
            "--hostname", f"{name}@%h", "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "--task-events",
        ], env)
        proc.wait_for("ready.", timeout=60)
        return proc

    def start_beat(self, name: str = "beat") -> Proc:
        schedule = self.log_dir / f"{name}-{uuid.uuid4().hex[:6]}-schedule"
        proc = self._proc(name, [
            sys.executable, "-m", "celery", "-A", "tasks.worker", "beat", "--loglevel", "INFO",
            "--schedule", str(schedule),
        ])
        proc.wait_for("beat: Starting", timeout=30)
        return proc

    def child_pids(self, worker: Proc) -> list[int]:
        """The prefork pool children of a worker."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker.popen.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_children(self, worker: Proc, sig: int = signal.SIGKILL) -> list[int]:
        pids = self.child_pids(worker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=15)
            except Exception:  # noqa: BLE001 - tear everything down regardless
                proc.kill()


class Ledger:
    """What the fault suite did and found, printed as the README's table."""

    COLUMNS = (
        ("faults", "faults injected"),
        ("jobs", "jobs created"),
        ("lost", "jobs lost"),
        ("stuck", "jobs non-terminal after recovery"),
        ("duplicates", "duplicate side effects"),
        ("bad_inputs", "bad inputs tried"),
        ("server_errors", "server errors"),
    )

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, fault: str, **counts: int) -> None:
        self.rows.append({"fault": fault, **{k: counts.get(k, 0) for k, _ in self.COLUMNS}})

    def table(self) -> str:
        head = "| fault | " + " | ".join(label for _, label in self.COLUMNS) + " |"
        sep = "|---" * (len(self.COLUMNS) + 1) + "|"
        lines = [head, sep]
        for row in self.rows:
            lines.append(f"| {row['fault']} | "
                         + " | ".join(str(row[k]) for k, _ in self.COLUMNS) + " |")
        totals = {k: sum(r[k] for r in self.rows) for k, _ in self.COLUMNS}
        lines.append("| **total** | " + " | ".join(f"**{totals[k]}**" for k, _ in self.COLUMNS)
                     + " |")
        return "\n".join(lines)


def audit(database_url: str, expected: dict[str, int | None]) -> dict[str, int]:
    """Check jobs after recovery: each exists and is terminal, and each import
    wrote exactly its expected number of memories (None: don't count)."""
    counts = {"lost": 0, "stuck": 0, "duplicates": 0}
    with psycopg.connect(database_url) as conn:
        for job_id, want in expected.items():
            row = conn.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
            if row is None:
                counts["lost"] += 1
                continue
            if row[0] not in ("completed", "failed", "cancelled"):
                counts["stuck"] += 1
            if want is not None:
                have = conn.execute(
                    "SELECT count(*), count(DISTINCT m.content) FROM memories m "
                    "JOIN documents d ON d.id = m.document_id WHERE d.job_id = %s", (job_id,)
                ).fetchone()
                counts["duplicates"] += max(0, have[0] - want) + (have[0] - have[1])
    return counts
