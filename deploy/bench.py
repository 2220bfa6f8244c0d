"""Performance benchmarks of SPEC section 11, each figure beside a baseline of the same run.

    python deploy/bench.py post      # POST /v1/jobs vs a bare Celery send_task loop
    python deploy/bench.py e2e       # jobs/s end to end and dispatch latency vs a bare task
    python deploy/bench.py import    # bulk_import memories/s vs a bare executemany; worker RSS
    python deploy/bench.py list      # GET /v1/jobs over a million job rows vs a thousand
    python deploy/bench.py all       # all four, then one summary table

Each run creates a throwaway database on the PostgreSQL server of ``--pg`` (dropped at the
end) and uses a Redis key prefix of its own on ``--redis`` (its keys deleted at the end), and
starts and stops its own Celery worker processes. Figures are measured, never asserted: the
target of each is printed beside it. ``--help`` lists the sizes and flags for bigger runs; the
defaults keep each subcommand under about two minutes on a two-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from celery import Celery
from flask import Flask
from psycopg.types.json import Json
from sqlalchemy import Engine, event, insert

from app import create_app, migrate
from app.auth import KEY_PREFIX, hash_key
from app.db import get_engine, reset_engine, session_scope
from app.models import Account, ApiKey, new_id
from app.pagination import encode_cursor
from app.search import index_row
from config import get_settings, reload_settings
from config.celery import celery_config

REPO = Path(__file__).resolve().parents[1]
LOCOMO_DIRS = (REPO.parent / "shared" / "corpus" / "locomo", REPO / "tests" / "data")
PING = "hebbrix.system.ping"
TERMINAL = ("completed", "failed", "cancelled")
# The lightest real job: a cleanup dry run of an empty account (three counts).
# cleanup is a singleton per account, so every job gets an account of its own.
LIGHT_JOB = {"type": "cleanup", "parameters": {"dry_run": True}}
# Rows per statement of bulk_import (tasks/bulk_import.BATCH_SIZE).
IMPORT_BATCH = 500

DEFAULT_PG = os.environ.get("HEBBRIX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DEFAULT_REDIS = os.environ.get("HEBBRIX_BENCH_REDIS", "redis://127.0.0.1:6379/0")


# --- reporting ------------------------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    label: str
    ours: float
    baseline: float | None
    unit: str
    target: str = ""

    def ratio(self) -> str:
        if self.baseline is None or self.baseline == 0:
            return ""
        return f"{100.0 * self.ours / self.baseline:.0f}%"


SUMMARY: list[Figure] = []


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(section: str, figures: Sequence[Figure]) -> None:
    width = max(len(f.label) for f in figures)
    print(f"\n== {section}")
    print(f"  {'figure':<{width}}  {'ours':>10}  {'baseline':>10}  {'ours/base':>9}  target")
    for f in figures:
        print(
            f"  {f.label:<{width}}  {_num(f.ours):>10}  {_num(f.baseline):>10}  "
            f"{f.ratio():>9}  {f.target}".rstrip()
            + f"   [{f.unit}]"
        )
        SUMMARY.append(f)


def note(text: str) -> None:
    print(f"  - {text}")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the throwaway environment ----------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class Worker:
    """A ``celery worker`` child in its own process group, logging to a file."""

    def __init__(
        self, workdir: Path, queues: Sequence[str], concurrency: int, env: dict[str, str]
    ) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        self.log_path = workdir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        args = [
            sys.executable, "-m", "celery", "-A", "tasks.worker", "worker",
            "--queues", ",".join(queues), "--concurrency", str(concurrency),
            "--pool", "prefork", "--hostname", f"{self.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--task-events",
        ]
        self.popen = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while "ready." not in self.log_path.read_text(errors="replace"):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def children(self) -> list[int]:
        """The prefork pool processes of this worker."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # After the parenthesised command name: state, then the parent pid.
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.popen.pid:
                found.append(int(entry.name))
        return found

    def cpu_seconds(self) -> float:
        """CPU time used so far by the worker and its pool processes."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in (self.popen.pid, *self.children()):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()


class Environment:
    """A fresh database and Redis key prefix, the process pointed at both."""

    def __init__(self, args: argparse.Namespace) -> None:
        run_id = uuid.uuid4().hex[:8]
        self.keep: bool = args.keep
        self.admin_url: str = args.pg
        self.database = f"hebbrix_bench_{run_id}"
        self.database_url = _with_database(args.pg, self.database)
        self.redis_url: str = args.redis
        self.prefix = f"hebbrix-bench-{run_id}:"
        self.workdir = Path(tempfile.mkdtemp(prefix="hebbrix-bench-"))
        self.workers: list[Worker] = []

    def __enter__(self) -> Environment:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        os.environ.update(
            DATABASE_URL=self.database_url,
            CELERY_BROKER_URL=self.redis_url,
            HEBBRIX_BROKER_KEY_PREFIX=self.prefix,
            HEBBRIX_VAR_DIR=str(self.workdir),
            HEBBRIX_IMPORT_ALLOWED_HOSTS="127.0.0.1",
            HEBBRIX_RESULT_BACKEND="",
        )
        reload_settings()
        reset_engine()
        try:
            migrate.upgrade()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for worker in self.workers:
            worker.stop()
        reset_engine()
        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
            client.delete(key)
        client.close()
        if self.keep:
            print(f"  (kept database {self.database} and logs in {self.workdir})")
            return
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start_worker(
        self, queues: Sequence[str], concurrency: int, env: dict[str, str] | None = None
    ) -> Worker:
        worker = Worker(self.workdir, queues, concurrency, {**os.environ, **(env or {})})
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: Worker) -> None:
        worker.stop()
        self.workers.remove(worker)

    def set_synchronous_commit(self, on: bool) -> None:
        """Switch the throwaway database's commits between durable and asynchronous
        (a crash of the server may lose the last commits; nothing is corrupted).

        Connections opened afterwards use it: the API's pool is reset here, and
        workers started afterwards connect anew."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                f'ALTER DATABASE "{self.database}" SET synchronous_commit = '
                + ("on" if on else "off")
            )
        reset_engine()

    def connect(self) -> psycopg.Connection[Any]:
        """A plain autocommit connection, for watching rows and for bare baselines."""
        return psycopg.connect(self.database_url, autocommit=True)

    def result_celery(self) -> Celery:
        """A client of the same broker with a Redis result backend (for bare round trips).

        Kept apart from the API's client: with a result backend configured, every
        publish would also subscribe to its result, which the job path never needs.
        """
        settings = dataclasses.replace(get_settings(), result_backend=self.redis_url)
        client = Celery("hebbrix-bench")
        client.config_from_object(celery_config(settings))
        return client


@dataclasses.dataclass(frozen=True)
class BenchAccount:
    id: str
    headers: dict[str, str]


def make_accounts(count: int) -> list[BenchAccount]:
    """``count`` accounts with one API key each, written in two batched statements."""
    made, accounts, keys = [], [], []
    for i in range(count):
        account_id, key = new_id("acc"), KEY_PREFIX + secrets.token_urlsafe(32)
        accounts.append({"id": account_id, "name": f"bench-{i}"})
        keys.append(
            {
                "id": new_id("key"),
                "account_id": account_id,
                "key_hash": hash_key(key),
                "prefix": key[: len(KEY_PREFIX) + 6],
            }
        )
        made.append(BenchAccount(account_id, {"Authorization": f"Bearer {key}"}))
    with session_scope() as session:
        session.execute(insert(Account), accounts)
        session.execute(insert(ApiKey), keys)
    return made


class SqlCounter:
    """Counts what the API sends to the database while ``active``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.active = False
        self.statements: Counter[str] = Counter()
        self.captured: list[tuple[str, Any]] = []
        self.commits = 0
        self.checkouts = 0
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine.pool, "checkout", self._on_checkout)

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if self.active:
            self.statements[statement.split(None, 1)[0].upper()] += 1
            self.captured.append((statement, params))

    def _on_commit(self, _conn: Any) -> None:
        if self.active:
            self.commits += 1

    def _on_checkout(self, *_: Any) -> None:
        if self.active:
            self.checkouts += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[SqlCounter]:
        self.statements.clear()
        self.captured.clear()
        self.commits = self.checkouts = 0
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on_execute)
        event.remove(self.engine, "commit", self._on_commit)
        event.remove(self.engine.pool, "checkout", self._on_checkout)


def api_app() -> Flask:
    return create_app({"TESTING": True})


def post_job(client: Any, account: BenchAccount, body: dict[str, Any] = LIGHT_JOB) -> str:
    resp = client.post("/v1/jobs", json=body, headers=account.headers)
    if resp.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs answered {resp.status_code}: {resp.get_json()}")
    return str(resp.get_json()["id"])


def wait_terminal(conn: psycopg.Connection[Any], ids: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = ANY(%s)",
            (ids, list(TERMINAL)),
        ).fetchone()
        if row is not None and row[0] >= len(ids):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - (row[0] if row else 0)} jobs never finished")
        time.sleep(0.005)


def statuses(conn: psycopg.Connection[Any], ids: list[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY status", (ids,)
    ).fetchall()
    return {status: count for status, count in rows}


# --- 1. POST /v1/jobs throughput ------------------------------------------------------------


def _commit_floor(env: Environment, celery: Celery, count: int) -> tuple[float, float]:
    """The floor of any design that commits a row before it publishes: a bare psycopg
    INSERT + COMMIT of one small row, then send_task, ``count`` times.

    Returns (loops per second, milliseconds per commit alone)."""
    with env.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (id text PRIMARY KEY, at timestamptz)")
    with psycopg.connect(env.database_url) as conn:
        commit_seconds = 0.0
        started = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_probe VALUES (%s, now())", (uuid.uuid4().hex,))
            conn.commit()
            commit_seconds += time.perf_counter() - t0
            celery.send_task(PING, retry=False)
        elapsed = time.perf_counter() - started
    return count / elapsed, 1000 * commit_seconds / count


def _post_round(
    app: Flask, accounts: Iterator[BenchAccount], count: int, clients: int = 1
) -> float:
    """POST ``count`` jobs from ``clients`` threads, each with a test client; jobs/s."""
    chunks = [[next(accounts) for _ in range(count // clients)] for _ in range(clients)]

    def post_all(chunk: list[BenchAccount]) -> None:
        client = app.test_client()
        for account in chunk:
            post_job(client, account)

    return _threaded(post_all, chunks)


def _send_round(celery: Celery, count: int, clients: int = 1) -> float:
    def send_all(n: int) -> None:
        for _ in range(n):
            celery.send_task(PING, retry=False)

    return _threaded(send_all, [count // clients] * clients)


def _threaded(work: Callable[[Any], None], shares: list[Any]) -> float:
    total = sum(len(s) if isinstance(s, list) else s for s in shares)
    if len(shares) == 1:
        started = time.perf_counter()
        work(shares[0])
        return total / (time.perf_counter() - started)
    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total / (time.perf_counter() - started)


def bench_post(env: Environment, args: argparse.Namespace) -> None:
    """POST /v1/jobs (no worker consumes) vs send_task of a no-op on the same app and broker."""
    n, rounds, warmup = args.jobs, args.rounds, 50
    figures: list[Figure] = []
    notes: list[str] = []
    profile = ""
    for durable in (True, False):
        if not durable:
            env.set_synchronous_commit(False)
        app = api_app()
        celery = app.extensions["celery"]
        mode = "" if durable else " [synchronous_commit=off]"
        per_mode = rounds if durable else max(1, rounds - 1)
        need = warmup + n * per_mode + (n + args.sql_sample + min(n, 500) if durable else 0)
        accounts = iter(make_accounts(need))
        _post_round(app, accounts, warmup)
        _send_round(celery, warmup)
        ours, bare = [], []
        for _ in range(per_mode):
            ours.append(_post_round(app, accounts, n))
            bare.append(_send_round(celery, n))
        floor_rate, commit_ms = _commit_floor(env, celery, max(100, n // 4))
        figures.append(Figure(f"POST /v1/jobs vs send_task loop{mode}", statistics.median(ours),
                              statistics.median(bare), "jobs/s", ">= 60%"))
        figures.append(Figure(f"POST /v1/jobs vs bare INSERT+COMMIT+send_task{mode}",
                              statistics.median(ours), floor_rate, "jobs/s"))
        notes.append(f"rounds{mode}: POST {', '.join(f'{r:,.0f}' for r in ours)} jobs/s; "
                     f"send_task {', '.join(f'{r:,.0f}' for r in bare)} tasks/s; one bare "
                     f"INSERT+COMMIT {commit_ms:.2f} ms")
        if not durable:
            continue
        if args.clients > 1:
            figures.append(Figure(
                f"POST /v1/jobs, {args.clients} client threads vs send_task, {args.clients} "
                "threads", _post_round(app, accounts, n, args.clients),
                _send_round(celery, n, args.clients), "jobs/s",
            ))
        client = app.test_client()
        started = time.perf_counter()
        for _ in range(n):
            client.get("/healthz")
        figures.append(Figure("GET /healthz (the test client's floor) vs send_task",
                              n / (time.perf_counter() - started), statistics.median(bare),
                              "requests/s"))
        counter = SqlCounter(get_engine())
        with counter.counting():
            _post_round(app, accounts, args.sql_sample)
        counter.close()
        per_post = {k: v / args.sql_sample for k, v in sorted(counter.statements.items())}
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in per_post.items())
        notes.append(f"SQL statements per POST: {sum(per_post.values()):.1f} ({kinds}); "
                     f"commits {counter.commits / args.sql_sample:.1f}; pool checkouts "
                     f"{counter.checkouts / args.sql_sample:.1f}, each with a ping "
                     f"(pool_pre_ping); over {args.sql_sample} POSTs")
        if args.profile:
            profile = _profile_posts(app, accounts, min(n, 500))
        if args.verbose:
            seen: dict[str, int] = Counter(s for s, _ in counter.captured)
            for statement, times in seen.items():
                notes.append(f"{times / args.sql_sample:.1f}x  {' '.join(statement.split())[:200]}")
    report(f"POST /v1/jobs throughput ({n} jobs a round, median of rounds; no worker consuming; "
           "type cleanup, one account per job)", figures)
    for text in notes:
        note(text)
    if profile:
        print(profile)


def _profile_posts(app: Flask, accounts: Iterator[BenchAccount], count: int) -> str:
    """Where a POST spends its time: a pyinstrument profile of ``count`` of them."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return "  - --profile needs pyinstrument (pip install pyinstrument)"
    profiler = Profiler(interval=0.0005)
    profiler.start()
    _post_round(app, accounts, count)
    profiler.stop()
    return str(profiler.output_text(unicode=False, color=False))


# --- 2. end to end and dispatch latency -----------------------------------------------------


def _e2e_run(env: Environment, args: argparse.Namespace, mode: str) -> list[Figure]:
    app = api_app()
    client = app.test_client()
    bare = env.result_celery()
    worker = env.start_worker(
        ("cleanup", "system"), args.concurrency, {"HEBBRIX_RESULT_BACKEND": env.redis_url}
    )
    watch = env.connect()
    m, k = args.e2e_jobs, args.latency_samples
    accounts = iter(make_accounts(20 + m + k))

    # Warm up: every pool child imports, connects and runs each kind once or more.
    warm = [post_job(client, next(accounts)) for _ in range(20)]
    for result in [bare.send_task(PING, ignore_result=False) for _ in range(20)]:
        result.get(timeout=60)
    wait_terminal(watch, warm)

    # Throughput: publish m as fast as one client can, until the last is done.
    batch = [next(accounts) for _ in range(m)]
    worker_cpu, client_cpu = worker.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    ids = [post_job(client, account) for account in batch]
    posted = time.perf_counter()
    wait_terminal(watch, ids)
    ours_rate = m / (time.perf_counter() - started)
    post_rate = m / (posted - started)
    ours_cpu = (worker.cpu_seconds() - worker_cpu, time.process_time() - client_cpu)
    outcome = statuses(watch, ids)

    worker_cpu, client_cpu = worker.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    results = [bare.send_task(PING, ignore_result=False) for _ in range(m)]
    sent = time.perf_counter()
    for result in results:
        result.get(timeout=120)
    bare_rate = m / (time.perf_counter() - started)
    send_rate = m / (sent - started)
    bare_cpu = (worker.cpu_seconds() - worker_cpu, time.process_time() - client_cpu)

    # Latency with idle workers: one job at a time.
    claimed, visible, responded, created, published = [], [], [], [], []
    for _ in range(k):
        account = next(accounts)
        time.sleep(args.idle)
        wall, t0 = time.time(), time.perf_counter()
        job_id = post_job(client, account)
        responded.append(1000 * (time.perf_counter() - t0))
        while True:
            row = watch.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
            if row is not None and row[0] != "queued":
                break
            time.sleep(0.0005)
        visible.append(1000 * (time.perf_counter() - t0))
        wait_terminal(watch, [job_id])
        row = watch.execute(
            "SELECT extract(epoch FROM created_at), extract(epoch FROM dispatched_at),"
            " extract(epoch FROM attempt_started_at) FROM jobs WHERE id = %s",
            (job_id,),
        ).fetchone()
        assert row is not None
        created.append(1000 * (float(row[0]) - wall))
        published.append(1000 * (float(row[1]) - wall))
        claimed.append(1000 * (float(row[2]) - wall))
    bare_start = []
    for _ in range(k):
        time.sleep(args.idle)
        wall = time.time()
        ran_at = bare.send_task(PING, ignore_result=False).get(timeout=60)
        bare_start.append(1000 * (float(ran_at) - wall))
    watch.close()
    env.stop_worker(worker)

    label = mode.strip(" []") or "durable commits"
    note(f"{label}: job outcomes {outcome}; while workers ran, POST published "
         f"{post_rate:,.0f} jobs/s and send_task {send_rate:,.0f} tasks/s")
    note(f"{label}: CPU ms per job, worker (all processes) {1000 * ours_cpu[0] / m:.1f} vs "
         f"no-op {1000 * bare_cpu[0] / m:.1f}; client {1000 * ours_cpu[1] / m:.1f} vs "
         f"{1000 * bare_cpu[1] / m:.1f}")
    note(f"{label}: idle dispatch, p50 ms after the client's t0: row created "
         f"{statistics.median(created):.1f}, published (dispatched_at) "
         f"{statistics.median(published):.1f}, claimed {statistics.median(claimed):.1f}; "
         f"POST response {statistics.median(responded):.1f} (p95 {pct(responded, 0.95):.1f})")
    return [
        Figure(f"jobs/s, POST until completed vs no-op round trip{mode}", ours_rate, bare_rate,
               "jobs/s", ">= 50%"),
        Figure(f"dispatch p50, POST -> claimed (attempt_started_at){mode}",
               statistics.median(claimed), statistics.median(bare_start), "ms", "p50 < 15 ms"),
        Figure(f"dispatch p95, POST -> claimed{mode}", pct(claimed, 0.95),
               pct(bare_start, 0.95), "ms"),
        Figure(f"dispatch p50, POST -> 'running' seen by a 0.5 ms poller{mode}",
               statistics.median(visible), statistics.median(bare_start), "ms", "p50 < 15 ms"),
        Figure(f"dispatch p95, POST -> 'running' seen{mode}", pct(visible, 0.95),
               pct(bare_start, 0.95), "ms"),
    ]


def bench_e2e(env: Environment, args: argparse.Namespace) -> None:
    """POST then wait for the row to complete, vs a no-op task round trip, same worker."""
    print(f"\n== end to end ({args.e2e_jobs} jobs, cleanup dry runs; worker: prefork "
          f"x{args.concurrency}, prefetch 1, acks_late; {args.latency_samples} latency samples)")
    figures = _e2e_run(env, args, "")
    env.set_synchronous_commit(False)
    figures += _e2e_run(env, args, " [synchronous_commit=off]")
    report("end to end vs a bare no-op task", figures)
    note("latency baseline: send_task -> the no-op's body starts (it returns time.time()); "
         "jobs/s baseline: send_task m no-ops, then .get() each (Redis result backend)")


# --- 3. bulk_import insert rate and memory ----------------------------------------------------


def _locomo_turns() -> list[str]:
    for folder in LOCOMO_DIRS:
        files = sorted(folder.glob("*.json")) if folder.exists() else []
        turns: list[str] = []
        for path in files:
            data = json.loads(path.read_text())
            convo = data.get("conversation", data)
            if not isinstance(convo, dict):
                continue
            session = 1
            while isinstance(convo.get(f"session_{session}"), list):
                for turn in convo[f"session_{session}"]:
                    turns.append(f"{turn['speaker']}: {turn['text']}")
                session += 1
        if turns:
            return turns
    raise RuntimeError("no LoCoMo conversation found for the import corpus")


def write_jsonl(path: Path, lines: int, turns: list[str]) -> int:
    """``lines`` memories made of conversation turns; returns the file's size."""
    base = datetime(2024, 1, 1, tzinfo=UTC)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(
                json.dumps(
                    {
                        "content": turns[i % len(turns)],
                        "importance": round(0.1 + (i % 9) / 10, 2),
                        "metadata": {"line": i, "source": "bench"},
                        "created_at": (base + timedelta(seconds=i)).isoformat(),
                    }
                )
                + "\n"
            )
    return path.stat().st_size


def _proc_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """The largest resident set of a process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = _proc_kib(pid, "VmRSS")
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak_kib = max(self.peak_kib, _proc_kib(self.pid, "VmRSS"))

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak_kib


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:
        pass


def _truncate_store(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE index_entries, memories, documents")


_MEMORY_COLUMNS = (
    "id, account_id, collection_id, document_id, content, importance, metadata, created_at,"
    " access_count"
)
_ENTRY_COLUMNS = "memory_id, account_id, collection_id, terms, vector, created_at"


def _bare_insert(
    env: Environment,
    path: Path,
    account_id: str,
    collection_id: str,
    *,
    with_index: bool,
    copy: bool = False,
) -> tuple[float, int, float]:
    """The rows bulk_import writes for ``path``, inserted in batches of IMPORT_BATCH with a
    commit each, by executemany (or COPY); only the database calls are timed.

    Returns (database seconds, rows, seconds spent computing index rows)."""
    memories_sql = f"INSERT INTO memories ({_MEMORY_COLUMNS}) VALUES ({', '.join(['%s'] * 9)})"
    entries_sql = f"INSERT INTO index_entries ({_ENTRY_COLUMNS}) VALUES ({', '.join(['%s'] * 6)})"
    document_id = new_id("doc")
    now = datetime.now(UTC)
    db_seconds = index_seconds = 0.0
    count = 0
    with psycopg.connect(env.database_url) as conn:
        conn.execute(
            "INSERT INTO documents (id, account_id, collection_id, content_type, bytes, sha256,"
            " status, created_at) VALUES (%s, %s, %s, 'application/jsonl', 0, '', 'ready', %s)",
            (document_id, account_id, collection_id, now),
        )
        conn.commit()

        def flush(memories: list[tuple[Any, ...]], entries: list[tuple[Any, ...]]) -> float:
            started = time.perf_counter()
            with conn.cursor() as cur:
                if copy:
                    for table, columns, rows in (
                        ("memories", _MEMORY_COLUMNS, memories),
                        ("index_entries", _ENTRY_COLUMNS, entries),
                    ):
                        if rows:
                            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as sink:
                                for row in rows:
                                    sink.write_row(row)
                else:
                    cur.executemany(memories_sql, memories)
                    if entries:
                        cur.executemany(entries_sql, entries)
            conn.commit()
            return time.perf_counter() - started

        memories: list[tuple[Any, ...]] = []
        entries: list[tuple[Any, ...]] = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                obj = json.loads(line)
                memory_id = f"mem_{i:024x}"
                memories.append((
                    memory_id, account_id, collection_id, document_id, obj["content"],
                    obj["importance"], Json(obj["metadata"]),
                    datetime.fromisoformat(obj["created_at"]), 0,
                ))
                if with_index:
                    started = time.perf_counter()
                    entry = index_row(obj["content"])
                    index_seconds += time.perf_counter() - started
                    entries.append(
                        (memory_id, account_id, collection_id, entry.terms, entry.vector, now)
                    )
                if len(memories) >= IMPORT_BATCH:
                    db_seconds += flush(memories, entries)
                    count += len(memories)
                    memories, entries = [], []
        if memories:
            db_seconds += flush(memories, entries)
            count += len(memories)
    return db_seconds, count, index_seconds


def bench_import(env: Environment, args: argparse.Namespace) -> None:
    """A real bulk_import of JSONL sources of two sizes vs a bare batched insert of its rows."""
    app = api_app()
    client = app.test_client()
    (account,) = make_accounts(1)
    resp = client.post("/v1/collections", json={"name": "bench"}, headers=account.headers)
    collection_id = resp.get_json()["id"]
    turns = _locomo_turns()
    served = env.workdir / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    watch = env.connect()
    runs: list[dict[str, Any]] = []
    sizes = sorted(args.import_lines)
    try:
        for lines in sizes:
            name = f"memories-{lines}.jsonl"
            size = write_jsonl(served / name, lines, turns)
            _truncate_store(watch)
            # A fresh worker each time: its child's peak RSS (VmHWM) is this import's.
            worker = env.start_worker(
                ("bulk_import",), 1, {"HEBBRIX_IMPORT_MAX_BYTES": str(max(size * 2, 1 << 28))}
            )
            (child,) = worker.children()
            idle_kib = _proc_kib(child, "VmRSS")
            sampler = RssSampler(child)
            url = f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
            body = {
                "type": "bulk_import",
                "parameters": {"source_url": url, "collection_id": collection_id,
                               "format": "jsonl"},
            }
            job_id = post_job(client, account, body)
            wait_terminal(watch, [job_id], timeout=3600)
            hwm_kib = _proc_kib(child, "VmHWM")
            sampled_kib = sampler.stop()
            env.stop_worker(worker)
            row = watch.execute(
                "SELECT status, extract(epoch FROM finished_at - started_at), result,"
                " error_message FROM jobs WHERE id = %s",
                (job_id,),
            ).fetchone()
            assert row is not None
            status, seconds, result, error = row
            if status != "completed":
                raise RuntimeError(f"import of {lines} lines {status}: {error}")
            runs.append({
                "lines": lines, "bytes": size, "seconds": float(seconds),
                "memories": result["memories_created"], "idle": idle_kib, "hwm": hwm_kib,
                "sampled": sampled_kib,
            })
        largest = served / f"memories-{sizes[-1]}.jsonl"
        _truncate_store(watch)
        bare_s, bare_n, _ = _bare_insert(
            env, largest, account.id, collection_id, with_index=False
        )
        _truncate_store(watch)
        both_s, both_n, index_s = _bare_insert(
            env, largest, account.id, collection_id, with_index=True
        )
        _truncate_store(watch)
        copy_s, copy_n, _ = _bare_insert(
            env, largest, account.id, collection_id, with_index=True, copy=True
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        watch.close()

    bare_rate = bare_n / bare_s
    figures = [
        Figure(f"bulk_import {r['lines']:,} lines, started -> finished",
               r["memories"] / r["seconds"], bare_rate, "memories/s", ">= 50%")
        for r in runs
    ]
    figures.append(
        Figure("bare executemany, memories + index entries", both_n / both_s, bare_rate,
               "memories/s")
    )
    figures.append(
        Figure("bare COPY, memories + index entries", copy_n / copy_s, bare_rate, "memories/s")
    )
    for r in runs:
        figures.append(
            Figure(f"worker child peak RSS, {r['lines']:,} lines ({r['bytes'] / 1e6:.0f} MB)",
                   r["hwm"] / 1024, runs[0]["hwm"] / 1024, "MiB", "flat in source size")
        )
    report(f"bulk_import (JSONL, batches of {IMPORT_BATCH}; baseline: bare executemany of "
           f"the {bare_n:,} rows into memories)", figures)
    note(f"index_row() (terms + vector) costs {1e6 * index_s / both_n:.0f} us per memory, "
         "CPU in the worker, not in the database")
    for r in runs:
        note(f"{r['lines']:,} lines: {r['memories']:,} memories in {r['seconds']:.1f} s; "
             f"child RSS idle {r['idle'] / 1024:.0f} MiB, sampled peak "
             f"{r['sampled'] / 1024:.0f} MiB, VmHWM {r['hwm'] / 1024:.0f} MiB")


# --- 4. listing over millions of job rows -------------------------------------------------------

_LOAD_JOBS = """
INSERT INTO jobs (id, account_id, type, status, progress, parameters, metadata, result,
                  error_message, queue, attempts, created_at, dispatched_at, started_at,
                  attempt_started_at, finished_at, updated_at, expires_at)
SELECT 'job_' || substr(md5(%(salt)s || i::text), 1, 24), %(account)s,
       (ARRAY['bulk_import','data_export','backup','consolidation','cleanup','rl_training'])
           [1 + i %% 6],
       CASE WHEN i %% 1000 = 0 THEN 'cancelled' WHEN i %% 100 = 0 THEN 'failed'
            ELSE 'completed' END,
       100.0, '{}', '{}',
       CASE WHEN i %% 100 = 0 THEN NULL ELSE '{"memories_created": 1}' END::json,
       CASE WHEN i %% 100 = 0 AND i %% 1000 <> 0 THEN 'The source could not be read.' END,
       (ARRAY['bulk_import','data_export','backup','consolidation','cleanup','rl_training'])
           [1 + i %% 6],
       1, ts, ts, ts, ts, ts + interval '1 second', ts + interval '1 second',
       now() + interval '3650 days'
FROM generate_series(1, %(n)s) AS i,
     -- two jobs per second, so the id breaks ties of created_at as in real traffic
     LATERAL (SELECT %(newest)s::timestamptz - (i / 2) * interval '1 second' AS ts) AS t
"""


def _load_jobs(conn: psycopg.Connection[Any], account_id: str, n: int) -> None:
    conn.execute(
        _LOAD_JOBS,
        {"salt": account_id, "account": account_id, "n": n, "newest": datetime.now(UTC)},
    )


def _cursor_at(
    conn: psycopg.Connection[Any], account_id: str, fraction: float, where: str = ""
) -> str:
    """A cursor ``fraction`` of the way into the account's rows (newest first).

    COUNT and OFFSET only here, to build a cursor deep in the set; the API uses neither.
    """
    row = conn.execute(
        f"SELECT count(*) FROM jobs WHERE account_id = %s {where}", (account_id,)
    ).fetchone()
    assert row is not None and row[0] > 0, "no rows to page through"
    row = conn.execute(
        f"SELECT created_at, id FROM jobs WHERE account_id = %s {where}"
        " ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
        (account_id, int(row[0] * fraction)),
    ).fetchone()
    assert row is not None
    return encode_cursor(row[0], row[1])


def bench_list(env: Environment, args: argparse.Namespace) -> None:
    """GET /v1/jobs and /v1/jobs/{id} on an account with millions of rows vs 1k rows."""
    app = api_app()
    client = app.test_client()
    big, small = make_accounts(2)
    sizes = {big.id: args.list_rows, small.id: args.list_small}
    conn = env.connect()
    started = time.perf_counter()
    for account_id, n in sizes.items():
        _load_jobs(conn, account_id, n)
    conn.execute("VACUUM ANALYZE jobs")
    load_seconds = time.perf_counter() - started
    limit, reps = args.page_size, args.reps

    def get(account: BenchAccount, url: str) -> dict[str, Any]:
        resp = client.get(url, headers=account.headers)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {url} answered {resp.status_code}: {resp.get_json()}")
        return dict(resp.get_json())

    def timed(account: BenchAccount, url: str) -> float:
        get(account, url)  # warm
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            get(account, url)
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    def walk(account: BenchAccount, pages: int) -> float:
        times, after = [], ""
        for _ in range(pages):
            t0 = time.perf_counter()
            page = get(account, f"/v1/jobs?limit={limit}{after}")
            times.append(1000 * (time.perf_counter() - t0))
            after = f"&after={page['next_cursor']}"
        return statistics.median(times[1:])

    def calls(account: BenchAccount) -> dict[str, str]:
        first = get(account, "/v1/jobs?limit=1")["data"][0]["id"]
        last_id = conn.execute(
            "SELECT id FROM jobs WHERE account_id = %s ORDER BY created_at, id LIMIT 1",
            (account.id,),
        ).fetchone()
        assert last_id is not None
        return {
            "first page": f"/v1/jobs?limit={limit}",
            "deep page (cursor at 90%)":
                f"/v1/jobs?limit={limit}&after={_cursor_at(conn, account.id, 0.9)}",
            "status=failed, first page": f"/v1/jobs?limit={limit}&status=failed",
            "status=failed, deep page": f"/v1/jobs?limit={limit}&status=failed&after="
                + _cursor_at(conn, account.id, 0.9, "AND status = 'failed'"),
            "type=backup, deep page": f"/v1/jobs?limit={limit}&type=backup&after="
                + _cursor_at(conn, account.id, 0.9, "AND type = 'backup'"),
            "status=queued (matches none)": f"/v1/jobs?limit={limit}&status=queued",
            "GET /v1/jobs/{id}, newest": f"/v1/jobs/{first}",
            "GET /v1/jobs/{id}, oldest": f"/v1/jobs/{last_id[0]}",
        }

    big_calls, small_calls = calls(big), calls(small)
    figures = []
    for label, url in big_calls.items():
        figures.append(
            Figure(label, timed(big, url), timed(small, small_calls[label]), "ms")
        )
    figures.insert(
        2,
        Figure(f"walking pages by next_cursor (median of {args.pages})", walk(big, args.pages),
               walk(small, args.pages), "ms"),
    )
    report(
        f"GET /v1/jobs: {args.list_rows:,} job rows in one account vs {args.list_small:,} "
        f"(limit {limit}, median of {reps}; in-process test client)",
        figures,
    )
    note(f"bulk load of {sum(sizes.values()):,} rows + VACUUM ANALYZE: {load_seconds:.1f} s")

    counter = SqlCounter(get_engine())
    for label in ("deep page (cursor at 90%)", "status=failed, deep page",
                  "type=backup, deep page"):
        with counter.counting():
            get(big, big_calls[label])
        page_sql = [(s, p) for s, p in counter.captured if "FROM jobs" in s and "ORDER BY" in s]
        statement, params = page_sql[-1]
        flat = " ".join(statement.split())
        note(f"{label}: SQL has OFFSET: {'OFFSET' in flat.upper()}; "
             f"COUNT: {'COUNT(' in flat.upper()}; statements in the request: "
             f"{sum(counter.statements.values())}")
        if args.verbose:
            note(flat)
        with get_engine().connect() as sa_conn:
            plan = sa_conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params
            ).fetchall()
        for (line,) in plan:
            print(f"      {line}")
    counter.close()
    conn.close()


# --- the command ------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[Environment, argparse.Namespace], None]] = {
    "post": bench_post,
    "e2e": bench_e2e,
    "import": bench_import,
    "list": bench_list,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("bench", choices=[*BENCHES, "all"])
    parser.add_argument("--pg", default=DEFAULT_PG,
                        help="PostgreSQL server (any database on it; env HEBBRIX_BENCH_PG)")
    parser.add_argument("--redis", default=DEFAULT_REDIS,
                        help="Redis for broker and results (env HEBBRIX_BENCH_REDIS)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the SQL too")
    parser.add_argument("--profile", action="store_true",
                        help="post: also print a pyinstrument profile of the POSTs")
    group = parser.add_argument_group("post")
    group.add_argument("--jobs", type=int, default=1000, help="POSTs per round")
    group.add_argument("--rounds", type=int, default=2)
    group.add_argument("--clients", type=int, default=4,
                       help="threads of the concurrent round (1: none)")
    group.add_argument("--sql-sample", type=int, default=50, help="POSTs whose SQL is counted")
    group = parser.add_argument_group("e2e")
    group.add_argument("--e2e-jobs", type=int, default=500)
    group.add_argument("--latency-samples", type=int, default=50)
    group.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    group.add_argument("--idle", type=float, default=0.05,
                       help="seconds between latency samples (workers idle)")
    group = parser.add_argument_group("import")
    group.add_argument("--import-lines", type=int, nargs="+", default=[50_000, 200_000],
                       help="JSONL sizes to import (lines); the largest is the baseline's")
    group = parser.add_argument_group("list")
    group.add_argument("--list-rows", type=int, default=1_000_000, help="rows of the big account")
    group.add_argument("--list-small", type=int, default=1000, help="rows of the baseline")
    group.add_argument("--page-size", type=int, default=20)
    group.add_argument("--pages", type=int, default=10, help="pages walked by next_cursor")
    group.add_argument("--reps", type=int, default=20, help="repetitions per timed call")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"hebbrix-jobs benchmarks on {os.cpu_count()} CPUs (load {load}); "
          f"PostgreSQL {urlsplit(args.pg).netloc}, Redis {urlsplit(args.redis).netloc}")
    for name in names:
        started = time.perf_counter()
        with Environment(args) as env:
            BENCHES[name](env, args)
        print(f"  ({name}: {time.perf_counter() - started:.0f} s)")
    if len(names) > 1:
        report("summary", list(SUMMARY))


if __name__ == "__main__":
    main()
