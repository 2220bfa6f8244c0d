"""The job API's contract: status codes, validation, scoping, pagination.

No worker runs here: jobs stay queued, which is what most of these need.
"""

from __future__ import annotations

from typing import Any

from app.db import session_scope
from app.models import Job
from tests.helpers import Account, start_job


def test_requests_without_a_valid_key_are_401_with_bearer_challenge(client: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        resp = client.get("/v1/jobs", headers=headers)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.json["code"] == 401 and resp.json["message"]


def test_post_job_is_202_queued_with_location(client: Any, account: Account) -> None:
    resp = client.post(
        "/v1/jobs",
        json={"type": "cleanup", "parameters": {"dry_run": True}, "metadata": {"k": "v"}},
        headers=account.headers,
    )
    assert resp.status_code == 202, resp.json
    job = resp.json
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert job["status"] == "queued" and job["progress"] == 0.0
    assert job["queue"] == "cleanup" and job["metadata"] == {"k": "v"}
    assert resp.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    got = client.get(f"/v1/jobs/{job['id']}", headers=account.headers)
    assert got.status_code == 200 and got.json["id"] == job["id"]


def test_unknown_fields_and_bad_parameters_are_422_with_field_errors(
    client: Any, account: Account, collection: str
) -> None:
    resp = client.post("/v1/jobs", json={"type": "cleanup", "bogus": 1}, headers=account.headers)
    assert resp.status_code == 422
    assert "bogus" in resp.json["errors"]["json"]

    resp = client.post(
        "/v1/jobs",
        json={"type": "cleanup", "parameters": {"dry_run": "maybe", "extra": 1}},
        headers=account.headers,
    )
    assert resp.status_code == 422
    errors = resp.json["errors"]["json"]["parameters"]
    assert set(errors) == {"dry_run", "extra"}

    resp = client.post(
        "/v1/jobs",
        json={
            "type": "bulk_import",
            "parameters": {"source_url": "ftp://x/y", "collection_id": collection,
                           "chunk_size": 5},
        },
        headers=account.headers,
    )
    assert resp.status_code == 422
    assert set(resp.json["errors"]["json"]["parameters"]) == {"source_url", "chunk_size"}

    resp = client.post(
        "/v1/jobs",
        json={"type": "bulk_import",
              "parameters": {"source_url": "http://example.com/a.pdf", "collection_id": "col_x"}},
        headers=account.headers,
    )
    assert resp.status_code == 422
    assert resp.json["errors"]["json"]["parameters"] == {"collection_id": ["No such collection."]}

    resp = client.post("/v1/jobs", json={"type": "teleport"}, headers=account.headers)
    assert resp.status_code == 422 and "type" in resp.json["errors"]["json"]


def test_every_type_refuses_unknown_parameters_with_field_errors(
    client: Any, account: Account
) -> None:
    from config import JOB_TYPES

    for job_type in JOB_TYPES:
        resp = client.post(
            "/v1/jobs",
            json={"type": job_type, "parameters": {"no_such_parameter": 1}},
            headers=account.headers,
        )
        assert resp.status_code == 422, job_type
        assert "no_such_parameter" in resp.json["errors"]["json"]["parameters"], job_type


def test_bad_json_is_400_and_large_body_is_413(client: Any, account: Account) -> None:
    resp = client.post(
        "/v1/jobs", data="{not json", headers={**account.headers,
                                               "Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    big = '{"type": "cleanup", "metadata": {"x": "' + "a" * (2 * 1024 * 1024) + '"}}'
    resp = client.post(
        "/v1/jobs", data=big, headers={**account.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == 413
    with session_scope() as session:
        assert session.query(Job).filter_by(account_id=account.id).count() == 0


def test_another_accounts_job_is_404_everywhere(
    client: Any, account: Account, make_account: Any
) -> None:
    job = start_job(client, account, "cleanup")
    other = make_account("other")
    for method, path in (
        ("get", f"/v1/jobs/{job['id']}"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("delete", f"/v1/jobs/{job['id']}"),
    ):
        resp = getattr(client, method)(path, headers=other.headers)
        assert resp.status_code == 404, (method, path)
    listed = client.get("/v1/jobs", headers=other.headers).json
    assert listed["data"] == []


def test_cancel_and_delete_conflicts(client: Any, account: Account) -> None:
    job = start_job(client, account, "cleanup")
    resp = client.delete(f"/v1/jobs/{job['id']}", headers=account.headers)
    assert resp.status_code == 409  # still queued

    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 200 and resp.json["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert again.status_code == 200 and again.json["status"] == "cancelled"
    with session_scope() as session:
        from app.models import JobEvent

        events = session.query(JobEvent).filter_by(job_id=job["id"], to_status="cancelled")
        assert events.count() == 1

    with session_scope() as session:
        session.get(Job, job["id"]).status = "completed"
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 409

    resp = client.delete(f"/v1/jobs/{job['id']}", headers=account.headers)
    assert resp.status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=account.headers).status_code == 404


def test_singleton_type_is_409_naming_the_active_job(client: Any, account: Account) -> None:
    first = start_job(client, account, "cleanup")
    resp = client.post("/v1/jobs", json={"type": "cleanup"}, headers=account.headers)
    assert resp.status_code == 409
    assert first["id"] in resp.json["message"]


def test_active_job_quota_is_429_with_retry_after(
    client: Any, account: Account, collection: str, monkeypatch: Any
) -> None:
    import dataclasses

    import config

    monkeypatch.setattr(
        config, "_settings", dataclasses.replace(config.get_settings(), max_active_jobs=2)
    )
    params = {"source_url": "http://127.0.0.1:9/x.txt", "collection_id": collection}
    for _ in range(2):
        start_job(client, account, "bulk_import", **params)
    resp = client.post(
        "/v1/jobs", json={"type": "bulk_import", "parameters": params}, headers=account.headers
    )
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) > 0


def test_list_is_newest_first_with_cursor_pagination_and_filters(
    client: Any, account: Account, collection: str
) -> None:
    params = {"source_url": "http://127.0.0.1:9/x.txt", "collection_id": collection}
    ids = [start_job(client, account, "bulk_import", **params)["id"] for _ in range(5)]
    cleanup = start_job(client, account, "cleanup")["id"]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=account.headers)

    seen: list[str] = []
    after = None
    while True:
        query = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", query_string=query, headers=account.headers).json
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == [cleanup, *reversed(ids)]

    by_type = client.get("/v1/jobs?type=cleanup", headers=account.headers).json["data"]
    assert [j["id"] for j in by_type] == [cleanup]
    cancelled = client.get("/v1/jobs?status=cancelled", headers=account.headers).json["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]

    for bad in ("status=done", "type=nope", "limit=0", "limit=1000", "after=%%%"):
        assert client.get(f"/v1/jobs?{bad}", headers=account.headers).status_code == 422, bad


def test_openapi_document_is_served(client: Any) -> None:
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}/cancel" in spec["paths"]
