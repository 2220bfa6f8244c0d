"""Pieces the tests share: child processes, a local file server, job polling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).with_name("data")


class Account:
    def __init__(self, account_id: str, key: str) -> None:
        self.id = account_id
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}


class Proc:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not print {text!r}:\n{self.log()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()


class FileServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        handler = partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def add(self, name: str, data: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return self.url(name)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def wait_for_job(
    client: Any,
    account: Account,
    job_id: str,
    statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
    timeout: float = 90,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/v1/jobs/{job_id}", headers=account.headers)
        assert resp.status_code == 200, resp.json
        job = resp.json
        if on_poll:
            on_poll(job)
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job stayed {job['status']}: {job}")
        time.sleep(0.05)


def start_job(client: Any, account: Account, job_type: str, **parameters: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/jobs", json={"type": job_type, "parameters": parameters}, headers=account.headers
    )
    assert resp.status_code == 202, resp.json
    return resp.json


class TrickleServer:
    """Serves one generated body slowly: ``chunks`` pieces, ``delay`` seconds apart.

    It makes an import that is still downloading when the test acts on it.
    """

    def __init__(self, chunks: list[bytes], delay: float, content_type: str) -> None:
        body_chunks, pause, ctype = chunks, delay, content_type

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(sum(len(c) for c in body_chunks)))
                self.end_headers()
                try:
                    for chunk in body_chunks:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str = "slow.jsonl") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def locomo_jsonl(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, str]]:
    """A LoCoMo conversation as JSONL (one memory per turn), its questions, and
    the text of each turn by dia_id."""
    conversation = json.loads(path.read_text())
    convo = conversation.get("conversation", conversation)
    lines = []
    texts: dict[str, str] = {}
    session = 1
    while f"session_{session}" in convo:
        for turn in convo[f"session_{session}"]:
            content = f"{turn['speaker']}: {turn['text']}"
            texts[turn["dia_id"]] = content
            lines.append(json.dumps({
                "content": content,
                "metadata": {"dia_id": turn["dia_id"], "session": session},
            }))
        session += 1
    return "\n".join(lines) + "\n", conversation["qa"], texts
