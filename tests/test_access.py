"""Who may call what, and how much: authentication on every endpoint, tenant
isolation on every resource, keys and secrets kept out of storage and logs,
request limits, Flower's login, and the API's answer while the database is down.

Endpoints are read from the Flask URL map, so a new one is covered (or fails
here until it is) without editing this file.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask

from app import create_app
from app.auth import create_key, revoke_key
from app.db import reset_engine, session_scope
from app.models import Artifact, Document, Job, Memory, MemoryFeedback, new_id
from config import get_settings, reload_settings
from tests.conftest import TEST_ENV
from tests.helpers import ROOT, Account, Proc, start_job

# --- the endpoints, from the URL map ------------------------------------------

# Path parameter -> the seeded resource it names. A new kind of id fails
# test_every_path_parameter_is_seeded until it is added here and to _seed().
RESOURCE_PARAMS = ("job_id", "collection_id", "memory_id", "document_id", "artifact_id")

# A valid body per endpoint that takes one, so a request reaches the ownership
# check instead of stopping at validation.
VALID_BODIES: dict[str, Any] = {
    "memories.MemoryFeedbackView": {"query": "what is it?", "reward": 1.0},
}


class Endpoint:
    def __init__(self, method: str, rule: str, endpoint: str, args: tuple[str, ...]) -> None:
        self.method, self.rule, self.endpoint, self.args = method, rule, endpoint, args

    def url(self, ids: dict[str, str]) -> str:
        path = self.rule
        for arg in self.args:
            path = path.replace(f"<{arg}>", ids[arg])
        return path

    def __repr__(self) -> str:
        return f"{self.method} {self.rule}"


def api_endpoints(app: Flask) -> list[Endpoint]:
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/"):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append(Endpoint(method, rule.rule, rule.endpoint, tuple(sorted(rule.arguments))))
    assert found, "no /v1 endpoints in the URL map"
    return found


def call(client: Any, ep: Endpoint, ids: dict[str, str], headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if ep.method == "POST":
        kwargs["json"] = VALID_BODIES.get(ep.endpoint, {})
    return client.open(ep.url(ids), method=ep.method, **kwargs)


SECRET_CONTENT = "owner-only memory text 7f3a"
SECRET_NAME = "owner-only collection 9c1e"


def _seed(client: Any, account: Account) -> dict[str, str]:
    """One resource of every kind, owned by ``account``."""
    h = account.headers
    col = client.post("/v1/collections", json={"name": SECRET_NAME}, headers=h).json["id"]
    mem = client.post(
        "/v1/memories", json={"collection_id": col, "content": SECRET_CONTENT}, headers=h
    ).json["id"]
    job = start_job(client, account, "bulk_import",
                    source_url="http://127.0.0.1:9/x.txt", collection_id=col)["id"]
    with session_scope() as session:
        doc = Document(id=new_id("doc"), account_id=account.id, collection_id=col,
                       name="owner.txt", content_type="text/plain", bytes=1, sha256="0" * 64)
        session.add(doc)
        session.flush()
        art = Artifact(id=new_id("art"), account_id=account.id, job_id=job, kind="export",
                       filename="owner.zip", content_type="application/zip",
                       location=f"{account.id}/owner.zip", bytes=1, sha256="0" * 64)
        session.add(art)
        session.get(Memory, mem).document_id = doc.id
    return {"collection_id": col, "memory_id": mem, "job_id": job,
            "document_id": doc.id, "artifact_id": art.id}


@pytest.fixture()
def owner(client: Any, make_account: Callable[[str], Account]) -> tuple[Account, dict[str, str]]:
    account = make_account("owner")
    return account, _seed(client, account)


def _assert_401(resp: Any, what: str) -> None:
    assert resp.status_code == 401, (what, resp.status_code, resp.get_data()[:300])
    assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), what
    body = resp.json
    assert body["code"] == 401 and body["status"] and body["message"], what


# --- authentication -------------------------------------------------------------


def test_every_path_parameter_is_seeded(flask_app: Flask) -> None:
    unknown = {arg for ep in api_endpoints(flask_app) for arg in ep.args} - set(RESOURCE_PARAMS)
    assert not unknown, f"seed a resource for {unknown} in tests/test_access.py"


def test_every_endpoint_refuses_missing_malformed_wrong_and_revoked_keys(
    client: Any, flask_app: Flask, owner: tuple[Account, dict[str, str]],
    make_account: Callable[[str], Account],
) -> None:
    account, ids = owner
    revoked = make_account("revoked")
    with session_scope() as session:
        assert revoke_key(session, revoked.key)
    # The revoked key's account keeps working with its other keys.
    with session_scope() as session:
        spare = create_key(session, revoked.id)
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {spare}"}).status_code == 200

    bad_headers: dict[str, dict[str, str]] = {
        "no key": {},
        "empty header": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "blank key": {"Authorization": "Bearer    "},
        "basic auth": {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()},
        "no scheme": {"Authorization": account.key},
        "other scheme": {"Authorization": f"Token {account.key}"},
        "key with junk": {"Authorization": f"Bearer {account.key}x"},
        "key truncated": {"Authorization": f"Bearer {account.key[:-1]}"},
        "wrong key": {"Authorization": "Bearer hbx_" + "A" * 43},
        "huge key": {"Authorization": "Bearer " + "k" * 10_000},
        "revoked key": {"Authorization": f"Bearer {revoked.key}"},
    }
    endpoints = api_endpoints(flask_app)
    for ep in endpoints:
        for what, headers in bad_headers.items():
            resp = call(client, ep, ids, headers)
            _assert_401(resp, f"{ep} with {what}")
            assert SECRET_CONTENT.encode() not in resp.get_data()
    # Nothing above changed the owner's data.
    job = client.get(f"/v1/jobs/{ids['job_id']}", headers=account.headers).json
    assert job["status"] == "queued"
    memory = client.get(f"/v1/memories/{ids['memory_id']}", headers=account.headers).json
    assert memory["deleted_at"] is None


def test_scheme_is_case_insensitive_and_a_valid_key_works_everywhere(
    client: Any, owner: tuple[Account, dict[str, str]]
) -> None:
    account, _ = owner
    resp = client.get("/v1/jobs", headers={"Authorization": f"bearer {account.key}"})
    assert resp.status_code == 200


# --- tenant isolation -----------------------------------------------------------


def test_another_accounts_key_gets_404_on_every_resource_and_changes_nothing(
    client: Any, flask_app: Flask, owner: tuple[Account, dict[str, str]],
    make_account: Callable[[str], Account],
) -> None:
    account, ids = owner
    intruder = make_account("intruder")
    by_id = [ep for ep in api_endpoints(flask_app) if ep.args]
    for ep in by_id:
        resp = call(client, ep, ids, intruder.headers)
        assert resp.status_code == 404, (ep, resp.status_code, resp.get_data()[:300])
        body = resp.get_data()
        assert SECRET_CONTENT.encode() not in body and SECRET_NAME.encode() not in body, ep
        assert resp.json["code"] == 404

    # The owner's resources are as they were: not cancelled, deleted or rated.
    h = account.headers
    assert client.get(f"/v1/jobs/{ids['job_id']}", headers=h).json["status"] == "queued"
    memory = client.get(f"/v1/memories/{ids['memory_id']}", headers=h).json
    assert memory["deleted_at"] is None and memory["content"] == SECRET_CONTENT
    with session_scope() as session:
        assert session.query(MemoryFeedback).filter_by(memory_id=ids["memory_id"]).count() == 0

    # The ids are real: the owner reads every one of them.
    for ep in by_id:
        if ep.method == "GET" and not ep.rule.endswith("/download"):
            resp = call(client, ep, ids, h)
            assert resp.status_code == 200, (ep, resp.status_code, resp.json)


def test_another_accounts_lists_searches_and_references_show_nothing(
    client: Any, flask_app: Flask, owner: tuple[Account, dict[str, str]],
    make_account: Callable[[str], Account],
) -> None:
    _, ids = owner
    intruder = make_account("intruder")
    h = intruder.headers
    lists = [ep for ep in api_endpoints(flask_app) if ep.method == "GET" and not ep.args]
    assert lists
    for ep in lists:
        resp = client.get(ep.rule, headers=h)
        assert resp.status_code == 200, ep
        assert resp.json["data"] == [], ep
    for query in (f"collection_id={ids['collection_id']}", f"document_id={ids['document_id']}",
                  "include_deleted=true"):
        assert client.get(f"/v1/memories?{query}", headers=h).json["data"] == []
    assert client.get(
        f"/v1/documents?collection_id={ids['collection_id']}", headers=h
    ).json["data"] == []

    resp = client.post("/v1/memories/search", json={"query": "owner-only memory"}, headers=h)
    assert resp.status_code == 200 and resp.json["data"] == []
    resp = client.post(
        "/v1/memories/search",
        json={"query": "owner-only memory", "collection_id": ids["collection_id"]},
        headers=h,
    )
    assert resp.status_code == 404
    # Writing into the owner's collection is refused as if it did not exist.
    resp = client.post(
        "/v1/memories",
        json={"collection_id": ids["collection_id"], "content": "planted"},
        headers=h,
    )
    assert resp.status_code == 404
    resp = client.post(
        "/v1/jobs",
        json={"type": "bulk_import", "parameters": {
            "source_url": "http://127.0.0.1:9/x.txt", "collection_id": ids["collection_id"]}},
        headers=h,
    )
    assert resp.status_code == 422
    assert "No such collection." in str(resp.json["errors"])


# --- keys and secrets -----------------------------------------------------------


def test_api_keys_are_stored_only_as_hashes(make_account: Callable[[str], Account]) -> None:
    account = make_account("hashed")
    secret_part = account.key.removeprefix("hbx_")
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        cursor = conn.execute("SELECT * FROM api_keys WHERE account_id = %s", (account.id,))
        columns = [c.name for c in cursor.description or ()]
        rows = cursor.fetchall()
    assert len(rows) == 1
    for name, value in zip(columns, rows[0], strict=True):
        text = str(value)
        assert account.key not in text and secret_part not in text, name
    stored = dict(zip(columns, rows[0], strict=True))
    # The stored prefix helps an operator recognise a key; it is far too short to use.
    assert len(stored["prefix"]) <= 10 and account.key.startswith(stored["prefix"])


# Short, as real ones are: SQLAlchemy's echo cuts long parameters, not short ones.
PDF_PASSWORD = "pw-51d2!q"


def test_keys_and_passwords_never_reach_the_logs_or_the_job_resource(
    client: Any, collection: str, account: Account, make_account: Callable[[str], Account],
    caplog: pytest.LogCaptureFixture,
) -> None:
    revoked = make_account("revoked")
    with session_scope() as session:
        revoke_key(session, revoked.key)
    # Everything at DEBUG, as an operator chasing a problem would set it, and the
    # SQL echo with its parameters (SQLAlchemy keeps its loggers at WARNING unless
    # told; its DEBUG level dumps result rows, i.e. the stored data itself).
    for name in (None, "celery", "kombu", "werkzeug"):
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    h = account.headers
    resp = client.post(
        "/v1/jobs",
        json={"type": "bulk_import", "parameters": {
            "source_url": "http://h/a.pdf", "collection_id": collection,
            "password": PDF_PASSWORD}},
        headers=h,
    )
    assert resp.status_code == 202, resp.json
    job_id = resp.json["id"]
    responses = [
        resp,
        client.get(f"/v1/jobs/{job_id}", headers=h),
        client.get("/v1/jobs", headers=h),
        client.get("/v1/jobs?type=bulk_import&limit=1", headers=h),
        client.post(f"/v1/jobs/{job_id}/cancel", headers=h),
    ]
    for r in responses:
        assert PDF_PASSWORD.encode() not in r.get_data(), r.request.path
    assert responses[1].json["parameters"]["password"] == "***"
    assert responses[4].json["parameters"]["password"] == "***"
    # A bad password in a rejected request is not echoed back either.
    bad = client.post(
        "/v1/jobs",
        json={"type": "bulk_import", "parameters": {
            "source_url": "ftp://nope", "collection_id": collection, "password": PDF_PASSWORD}},
        headers=h,
    )
    assert bad.status_code == 422 and PDF_PASSWORD.encode() not in bad.get_data()
    for headers in ({"Authorization": f"Bearer {revoked.key}"},
                    {"Authorization": f"Bearer {account.key}x"}):
        assert client.get("/v1/jobs", headers=headers).status_code == 401
    client.get("/v1/jobs/%00", headers=h)
    client.post("/v1/memories", json={"collection_id": collection, "content": "x"}, headers=h)

    assert caplog.records, "nothing was logged at DEBUG: the check would prove nothing"
    logged = "\n".join(
        [caplog.text]
        + [f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
           for record in caplog.records]
    )
    for secret in (account.key, revoked.key, account.key.removeprefix("hbx_"), PDF_PASSWORD):
        assert secret not in logged, "a secret reached the logs"


@pytest.fixture()
def embedded_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Account]]:
    """An app on the embedded profile (SQLite and the filesystem broker in a temp
    dir), with an account; the test profile is restored afterwards."""
    from app import migrate
    from app.auth import create_account

    try:
        with monkeypatch.context() as patch:
            patch.delenv("DATABASE_URL")
            patch.delenv("CELERY_BROKER_URL")
            patch.setenv("HEBBRIX_VAR_DIR", str(tmp_path / "var"))
            reload_settings()
            reset_engine()
            migrate.upgrade()
            with session_scope() as session:
                acc, key = create_account(session, "embedded")
                account = Account(acc.id, key)
            yield create_app({"TESTING": True}).test_client(), account
            reset_engine()
    finally:
        reload_settings()
        reset_engine()


def test_sql_echo_never_prints_parameters_in_the_embedded_profile(
    embedded_profile: tuple[Any, Account], caplog: pytest.LogCaptureFixture
) -> None:
    client, account = embedded_profile
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    col = client.post("/v1/collections", json={"name": "c"}, headers=account.headers).json["id"]
    resp = client.post(
        "/v1/jobs",
        json={"type": "bulk_import", "parameters": {
            "source_url": "http://h/a.pdf", "collection_id": col, "password": PDF_PASSWORD}},
        headers=account.headers,
    )
    assert resp.status_code == 202, resp.json
    assert any("INSERT INTO jobs" in r.getMessage() for r in caplog.records)
    assert PDF_PASSWORD not in caplog.text


# --- limits -----------------------------------------------------------------------


def test_every_post_endpoint_answers_413_with_the_error_body_over_the_body_limit(
    client: Any, flask_app: Flask, owner: tuple[Account, dict[str, str]],
) -> None:
    account, ids = owner
    limit = get_settings().max_body_bytes
    assert flask_app.config["MAX_CONTENT_LENGTH"] == limit
    body = '{"content": "' + "a" * limit + '"}'
    posts = [ep for ep in api_endpoints(flask_app) if ep.method == "POST"]
    assert posts
    with session_scope() as session:
        jobs_before = session.query(Job).filter_by(account_id=account.id).count()
    for ep in posts:
        resp = client.open(ep.url(ids), method="POST", data=body,
                           headers={**account.headers, "Content-Type": "application/json"})
        assert resp.status_code == 413, (ep, resp.status_code)
        assert resp.is_json, ep
        assert resp.json["code"] == 413 and resp.json["status"] and resp.json["message"], ep
    # Just under the limit is read (and judged on its content, not its size).
    under = '{"query": "' + "q" * (limit - 100) + '"}'
    resp = client.post("/v1/memories/search", data=under,
                       headers={**account.headers, "Content-Type": "application/json"})
    assert resp.status_code == 422
    with session_scope() as session:
        assert session.query(Job).filter_by(account_id=account.id).count() == jobs_before


@pytest.fixture()
def quota(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    import dataclasses

    import config

    def set_quota(n: int) -> None:
        monkeypatch.setattr(
            config, "_settings", dataclasses.replace(config.get_settings(), max_active_jobs=n)
        )

    return set_quota


def _import(collection: str) -> dict[str, Any]:
    return {"type": "bulk_import",
            "parameters": {"source_url": "http://127.0.0.1:9/x.txt", "collection_id": collection}}


def test_quota_is_429_with_retry_after_per_account_and_frees_up_when_jobs_end(
    client: Any, account: Account, collection: str, make_account: Callable[[str], Account],
    quota: Callable[[int], None],
) -> None:
    quota(2)
    first = [start_job(client, account, "bulk_import", **_import(collection)["parameters"])
             for _ in range(2)]
    resp = client.post("/v1/jobs", json=_import(collection), headers=account.headers)
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert resp.json["code"] == 429 and "2 active jobs" in resp.json["message"]

    # Another account has its own quota.
    other = make_account("other")
    col = client.post("/v1/collections", json={"name": "x"}, headers=other.headers).json["id"]
    assert client.post("/v1/jobs", json=_import(col), headers=other.headers).status_code == 202

    # A cancelled job no longer counts.
    client.post(f"/v1/jobs/{first[0]['id']}/cancel", headers=account.headers)
    assert client.post("/v1/jobs", json=_import(collection), headers=account.headers).status_code \
        == 202


def test_concurrent_posts_cannot_exceed_the_quota_or_a_singleton(
    client: Any, account: Account, collection: str, make_account: Callable[[str], Account],
    quota: Callable[[int], None],
) -> None:
    quota(3)

    def burst(acc: Account, body: dict[str, Any], n: int) -> list[int]:
        barrier = threading.Barrier(n)
        codes: list[int] = []

        def post() -> None:
            barrier.wait()
            codes.append(client.post("/v1/jobs", json=body, headers=acc.headers).status_code)

        threads = [threading.Thread(target=post) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return codes

    codes = burst(account, _import(collection), 12)
    assert codes.count(202) == 3 and codes.count(429) == 9, codes

    singleton = make_account("singleton")
    codes = burst(singleton, {"type": "cleanup"}, 8)
    assert codes.count(202) == 1 and codes.count(409) == 7, codes


def test_page_size_is_bounded_on_every_list(
    client: Any, flask_app: Flask, account: Account
) -> None:
    lists = [ep for ep in api_endpoints(flask_app) if ep.method == "GET" and not ep.args]
    for ep in lists:
        for bad in ("0", "-1", "101", "abc", "1.5", "", "99999999999999999999999"):
            resp = client.get(ep.rule, query_string={"limit": bad}, headers=account.headers)
            assert resp.status_code == 422, (ep, bad, resp.status_code)
            assert "limit" in resp.json["errors"]["query"], (ep, bad)
        for good in ("1", "100"):
            resp = client.get(ep.rule, query_string={"limit": good}, headers=account.headers)
            assert resp.status_code == 200, (ep, good)
    for bad in (0, -1, 101, "abc"):
        resp = client.post("/v1/memories/search", json={"query": "q", "limit": bad},
                           headers=account.headers)
        assert resp.status_code == 422, bad
    resp = client.post("/v1/memories/search", json={"query": "q", "limit": 100},
                       headers=account.headers)
    assert resp.status_code == 200


def test_a_full_page_of_100_is_returned_with_a_cursor(
    client: Any, account: Account, collection: str
) -> None:
    with session_scope() as session:
        for i in range(101):
            session.add(Memory(id=new_id("mem"), account_id=account.id, collection_id=collection,
                               content=f"m{i}", importance=0.5, metadata_={}))
    page = client.get("/v1/memories?limit=100", headers=account.headers).json
    assert len(page["data"]) == 100 and page["has_more"] and page["next_cursor"]
    rest = client.get(f"/v1/memories?limit=100&after={page['next_cursor']}",
                      headers=account.headers).json
    assert len(rest["data"]) == 1 and not rest["has_more"]


# --- odd input: 4xx, never 5xx ------------------------------------------------------


def test_unstorable_text_and_deep_nesting_are_client_errors(
    client: Any, flask_app: Flask, account: Account, collection: str,
    owner: tuple[Account, dict[str, str]],
) -> None:
    h = account.headers
    # Any path parameter holding a NUL names nothing.
    for ep in api_endpoints(flask_app):
        if ep.args:
            ids = {arg: "x%00y" for arg in ep.args}
            resp = call(client, ep, ids, h)
            assert resp.status_code == 404, (ep, resp.status_code)
    json_h = {**h, "Content-Type": "application/json"}
    cases = [
        ("/v1/collections", {"name": "a\x00b"}),
        ("/v1/memories", {"collection_id": collection, "content": "a\x00b"}),
        ("/v1/memories", {"collection_id": "col_\x00", "content": "ab"}),
        ("/v1/memories", {"collection_id": collection, "content": "ok",
                          "metadata": {"k\x00": "v"}}),
        ("/v1/memories/search", {"query": "a\x00"}),
        ("/v1/jobs", {"type": "cleanup", "metadata": {"deep": [["\x00"]]}}),
        ("/v1/jobs", {"type": "data_export", "parameters": {"collection_ids": ["c\x00"]}}),
        ("/v1/jobs", {"type": "bulk_import", "parameters": {
            "source_url": "http://127.0.0.1:9/x", "collection_id": "c\x00"}}),
    ]
    for path, body in cases:
        resp = client.post(path, json=body, headers=h)
        assert resp.status_code == 422, (path, body, resp.status_code, resp.json)
    raw = [
        # A lone surrogate is legal JSON, and has no UTF-8 form.
        ("/v1/memories", f'{{"collection_id": "{collection}", "content": "\\ud800"}}', 422),
        ("/v1/jobs", '{"type": "cleanup", "metadata": ' + '{"a": ' * 40 + "1" + "}" * 41, 422),
        ("/v1/jobs", '{"type": "cleanup", "metadata": ' + "[" * 50_000 + "]" * 50_000 + "}",
         400),
        (f"/v1/memories/{owner[1]['memory_id']}/feedback",
         '{"query": "q", "reward": 1' + "0" * 400 + "}", 422),
        ("/v1/jobs", '{"type": "cleanup", "parameters": {"older_than_days": 1' + "0" * 400
         + "}}", 422),
    ]
    for path, data, want in raw:
        resp = client.post(path, data=data, headers=json_h)
        assert resp.status_code == want, (path, data[:80], resp.status_code, resp.json)
        assert resp.json["code"] == want
    forged = base64.urlsafe_b64encode(b'["2020-01-01T00:00:00", "a\\u0000"]').decode()
    for path in ("/v1/jobs", "/v1/memories", "/v1/collections", "/v1/documents"):
        resp = client.get(path, query_string={"after": forged, "collection_id": "ok"}
                          if path == "/v1/documents" else {"after": forged}, headers=h)
        assert resp.status_code == 422, (path, resp.status_code)
        resp = client.get(path, query_string={"after": "x\x00"}, headers=h)
        assert resp.status_code == 422, (path, resp.status_code)


# --- Flower -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _wait_for_http(url: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            _http_status(url)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer:\n{proc.log()[-3000:]}")


def _assert_flower_requires(base: str, user: str, password: str) -> None:
    for path in ("/", "/api/workers"):
        assert _http_status(base + path) == 401, path
        assert _http_status(base + path, (user, "wrong")) == 401, path
        assert _http_status(base + path, ("nobody", password)) == 401, path
        assert _http_status(base + path, (user, password)) == 200, path


@pytest.fixture()
def flower_proc(log_dir: Path) -> Iterator[Callable[[list[str], dict[str, str]], Proc]]:
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc("flower", args, env, log_dir)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.mark.timeout(90)
def test_flower_with_basic_auth_refuses_requests_without_the_login(
    database: str, flower_proc: Callable[[list[str], dict[str, str]], Proc]
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    proc = flower_proc(
        [sys.executable, "-m", "celery", "-A", "tasks.worker", "flower", f"--port={port}",
         "--address=127.0.0.1", "--basic-auth=u:p"],
        env,
    )
    base = f"http://127.0.0.1:{port}"
    _wait_for_http(base + "/", proc)
    _assert_flower_requires(base, "u", "p")


def _run_command(port: int, flower_port: int) -> list[str]:
    return [sys.executable, "-m", "app.cli", "run", "--port", str(port),
            "--flower-port", str(flower_port), "--concurrency", "1"]


@pytest.mark.timeout(60)
def test_run_in_production_without_flower_auth_refuses_before_starting_anything(
    database: str, tmp_path: Path
) -> None:
    port, flower_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "HEBBRIX_FLOWER"))}
    env.update(TEST_ENV, HEBBRIX_VAR_DIR=str(tmp_path / "var"))
    for auth in ("", "nopassword", "user:"):
        env["HEBBRIX_FLOWER_BASIC_AUTH"] = auth
        started = time.monotonic()
        done = subprocess.run(_run_command(port, flower_port), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0, done.stdout
        assert "HEBBRIX_FLOWER_BASIC_AUTH" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert time.monotonic() - started < 20
        # Nothing was started, not even the var dir or the API.
        assert not (tmp_path / "var").exists()
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
            assert sock.connect_ex(("127.0.0.1", flower_port)) != 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_in_production_starts_flower_behind_the_configured_login(
    database: str, tmp_path: Path, log_dir: Path,
    flower_proc: Callable[[list[str], dict[str, str]], Proc],
) -> None:
    port, flower_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(TEST_ENV, HEBBRIX_VAR_DIR=str(tmp_path / "var"),
               HEBBRIX_FLOWER_BASIC_AUTH="ops:s3cret-flower")
    proc = flower_proc(_run_command(port, flower_port), env)
    proc.wait_for("API key:", timeout=60)
    base = f"http://127.0.0.1:{flower_port}"
    _wait_for_http(base + "/", proc)
    _assert_flower_requires(base, "ops", "s3cret-flower")
    # The password is handed over in the environment, never on a command line.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "s3cret-flower" not in ps


# --- the database down --------------------------------------------------------------


class _SilentServer:
    """Accepts TCP connections and never answers: a database host that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(60)
def test_api_answers_503_with_a_clear_body_while_the_database_is_unreachable(
    make_account: Callable[[str], Account], monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = make_account("outage")
    silent = _SilentServer()
    closed = _free_port()
    try:
        for label, port, within in (("refused", closed, 3.0), ("silent", silent.port, 8.0)):
            with monkeypatch.context() as patch:
                patch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/gone")
                reload_settings()
                reset_engine()
                client = create_app({"TESTING": True}).test_client()
                for method, path, body in (("GET", "/v1/jobs", None),
                                           ("POST", "/v1/jobs", {"type": "cleanup"})):
                    started = time.monotonic()
                    resp = client.open(path, method=method, json=body, headers=account.headers)
                    elapsed = time.monotonic() - started
                    what = (label, method, path)
                    assert resp.status_code == 503, (what, resp.status_code, resp.get_data())
                    assert elapsed < within, (what, elapsed)
                    assert int(resp.headers["Retry-After"]) > 0, what
                    body_json = resp.json
                    assert set(body_json) == {"code", "status", "message"}, what
                    assert body_json["code"] == 503 and "database" in body_json["message"]
                    assert "Traceback" not in resp.get_data(as_text=True)
            reload_settings()
            reset_engine()
    finally:
        silent.close()
        reload_settings()
        reset_engine()
    # And the API is back once the database is.
    client = create_app({"TESTING": True}).test_client()
    assert client.get("/v1/jobs", headers=account.headers).status_code == 200
