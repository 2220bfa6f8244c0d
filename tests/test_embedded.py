"""The embedded profile end to end, as a newcomer runs it: ``hebbrix-jobs run``
with nothing configured (SQLite and the filesystem broker under a var dir),
driven over real HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DATA, FileServer, Proc, TrickleServer

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, job = self.call("GET", f"/v1/jobs/{job_id}")
            assert status == 200
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.1)


@pytest.fixture()
def embedded_stack(tmp_path: Path, log_dir: Path) -> Any:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL") and not k.startswith("HEBBRIX_")}
    api_port, flower_port = _free_port(), _free_port()
    env.update(HEBBRIX_VAR_DIR=str(tmp_path / "var"), HEBBRIX_PROGRESS_INTERVAL="0.1")
    proc = Proc(
        "embedded",
        [sys.executable, "-m", "app.cli", "run", "--port", str(api_port),
         "--flower-port", str(flower_port)],
        env, log_dir,
    )
    try:
        proc.wait_for("API key:", timeout=60)
        key = re.search(r"API key: (\S+)", proc.log()).group(1)
        proc.wait_for("ready.", timeout=60)  # the worker
        yield Client(f"http://127.0.0.1:{api_port}", key), flower_port, tmp_path / "var"
    finally:
        proc.stop(timeout=40)


def test_embedded_profile_imports_a_pdf_cancels_an_import_and_shows_tasks_in_flower(
    embedded_stack: Any, tmp_path: Path
) -> None:
    client, flower_port, var = embedded_stack
    assert (var / "hebbrix.db").exists() and (var / "broker").is_dir()
    served = tmp_path / "served"
    served.mkdir()
    (served / "doc.pdf").write_bytes((DATA / "pdflatex-4-pages.pdf").read_bytes())
    files = FileServer(served)
    slow = TrickleServer([b'{"content": "slow line"}\n'] * 300, delay=0.05,
                         content_type="application/x-ndjson")
    try:
        status, collection = client.call("POST", "/v1/collections", {"name": "demo"})
        assert status == 201
        status, job = client.call("POST", "/v1/jobs", {
            "type": "bulk_import",
            "parameters": {"source_url": files.url("doc.pdf"), "collection_id": collection["id"]},
        })
        assert status == 202 and job["status"] == "queued"
        done = client.wait(job["id"], ("completed", "failed", "cancelled"))
        assert done["status"] == "completed", done
        assert done["result"]["pages_processed"] == 4

        status, hits = client.call("POST", "/v1/memories/search",
                                   {"query": "text without a meaning", "limit": 3})
        assert status == 200 and hits["data"]

        status, other = client.call("POST", "/v1/jobs", {
            "type": "bulk_import",
            "parameters": {"source_url": slow.url(), "collection_id": collection["id"]},
        })
        client.wait(other["id"], ("running",))
        status, cancelled = client.call("POST", f"/v1/jobs/{other['id']}/cancel")
        assert status == 200 and cancelled["status"] == "cancelled"
        time.sleep(2)
        status, after = client.call("GET", f"/v1/jobs/{other['id']}")
        assert after["status"] == "cancelled"
        assert after["error_details"] and after["error_details"]["code"] == "cancelled"

        # Flower saw the tasks through the filesystem broker's events.
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{flower_port}/api/tasks", timeout=5
                ) as resp:
                    tasks = json.loads(resp.read())
            except OSError:
                tasks = {}
            if job["id"] in tasks:
                break
            assert time.monotonic() < deadline, tasks
            time.sleep(0.5)
        assert tasks[job["id"]]["name"] == "hebbrix.jobs.bulk_import"
    finally:
        files.close()
        slow.close()
