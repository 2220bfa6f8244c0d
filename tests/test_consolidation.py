"""consolidation against real PostgreSQL, Redis and worker processes, on LoCoMo.

What it must do: merge old, similar, unimportant memories into one that keeps
every distinct sentence, soft-delete the sources with ``consolidated_into``,
keep search recall, change nothing on a dry run, never touch important
memories, stop between groups when cancelled, and finish once after its
worker is killed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Job, Memory, new_id, utcnow
from app.search import terms
from app.store import insert_memories
from config import get_settings
from config.celery import beat_schedule
from tasks.consolidation import merge_contents
from tests import locomo
from tests.helpers import Account, Proc, start_job, wait_for_job

pytestmark = pytest.mark.slow


def _memories(account_id: str) -> list[Memory]:
    with session_scope() as session:
        rows = session.scalars(
            select(Memory).where(Memory.account_id == account_id).order_by(Memory.id)
        ).all()
        session.expunge_all()
        return list(rows)


def _assert_consistent(account_id: str) -> tuple[list[Memory], dict[str, list[Memory]]]:
    """Every merged memory is live and lists exactly the sources pointing at it."""
    memories = _memories(account_id)
    by_id = {m.id: m for m in memories}
    sources: dict[str, list[Memory]] = {}
    for memory in memories:
        if memory.consolidated_into is not None:
            assert memory.deleted_at is not None
            sources.setdefault(memory.consolidated_into, []).append(memory)
    merged = [m for m in memories if "consolidated_from" in (m.metadata_ or {})]
    assert {m.id for m in merged} == set(sources)
    for memory in merged:
        assert memory.deleted_at is None and memory.consolidated_into is None
        group = sources[memory.id]
        assert sorted(memory.metadata_["consolidated_from"]) == sorted(s.id for s in group)
        assert len(group) >= 2
        assert memory.importance == max(s.importance for s in group)
        assert memory.created_at == max(s.created_at for s in group)
        assert [by_id[i].metadata_ for i in memory.metadata_["consolidated_from"]] == (
            memory.metadata_["source_metadata"]
        )
    return merged, sources


def _recall(client: Any, account: Account, collection: str, resolve: bool) -> float:
    scores = []
    # Every other question keeps the test short; the benchmark asks them all.
    for question in locomo.questions()[::2]:
        resp = client.post(
            "/v1/memories/search",
            json={
                "query": question.text,
                "collection_id": collection,
                "limit": 10,
                "resolve_sources": resolve,
            },
            headers=account.headers,
        )
        assert resp.status_code == 200, resp.json
        found: set[str] = set()
        for hit in resp.json["data"]:
            found.add(hit["memory"]["metadata"].get("dia_id"))
            found |= {s["metadata"]["dia_id"] for s in hit.get("sources", [])}
        scores.append(len(found & question.evidence) / len(question.evidence))
    return sum(scores) / len(scores)


def test_merges_near_duplicates_of_locomo_and_keeps_recall(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    locomo.import_turns(account.id, collection)
    before = _memories(account.id)
    recall_before = _recall(client, account, collection, resolve=True)

    # Empty parameters, as the daily scheduled run has.
    job = wait_for_job(client, account, start_job(client, account, "consolidation")["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["groups"] > 0 and result["memories_created"] == result["groups"]
    assert result["memories_scanned"] == len(before)

    merged, sources = _assert_consistent(account.id)
    assert len(merged) == result["groups"]
    assert sum(len(g) for g in sources.values()) == result["memories_merged"]
    live = [m for m in _memories(account.id) if m.deleted_at is None]
    assert len(live) == len(before) - result["memories_merged"] + result["memories_created"]
    assert result["bytes_before"] == sum(
        len(s.content.encode()) for g in sources.values() for s in g
    )
    assert result["bytes_after"] == sum(len(m.content.encode()) for m in merged)
    assert result["bytes_after"] <= result["bytes_before"]
    for memory in merged:
        # Every word that carries meaning in a source is still in the merge.
        kept = set(terms(memory.content))
        for source in sources[memory.id]:
            assert set(terms(source.content)) <= kept, (source.content, memory.content)

    recall_after = _recall(client, account, collection, resolve=True)
    assert recall_after >= recall_before - 0.005, (recall_before, recall_after)

    # Run again: the merged memories are not merged again, nothing else is alike.
    again = wait_for_job(client, account, start_job(client, account, "consolidation")["id"])
    assert again["status"] == "completed" and again["result"]["groups"] == 0


def test_merged_content_keeps_each_distinct_sentence_once() -> None:
    merged = merge_contents(
        [
            "Caroline: Thanks, Melanie! I adopted a dog. His name is Max.",
            "Caroline: Thanks, Melanie. I adopted a dog! He is a golden retriever.",
            "Melanie: Thanks, Melanie!",
            "Caroline: I did not adopt a cat.",
            "Caroline: I did adopt a cat.",
        ]
    )
    assert merged.splitlines() == [
        "Caroline: Thanks, Melanie! I adopted a dog. His name is Max.",
        "Caroline: He is a golden retriever.",
        # Another speaker saying it is another fact.
        "Melanie: Thanks, Melanie!",
        "Caroline: I did not adopt a cat.",
        # A negation is not a repeat.
        "Caroline: I did adopt a cat.",
    ]


def test_dry_run_reports_groups_and_changes_nothing(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    locomo.import_turns(account.id, collection)
    before = [(m.id, m.deleted_at, m.consolidated_into, m.content) for m in _memories(account.id)]
    job = start_job(client, account, "consolidation", dry_run=True, collection_id=collection)
    job = wait_for_job(client, account, job["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["dry_run"] is True and result["groups"] > 0
    assert len(result["planned_groups"]) == result["groups"]
    assert sum(len(g) for g in result["planned_groups"]) == result["memories_merged"]
    known = {row[0] for row in before}
    assert all(len(g) >= 2 and set(g) <= known for g in result["planned_groups"])
    after = [(m.id, m.deleted_at, m.consolidated_into, m.content) for m in _memories(account.id)]
    assert after == before

    # The real run merges exactly the groups the dry run announced.
    real = wait_for_job(
        client, account, start_job(client, account, "consolidation", collection_id=collection)["id"]
    )
    _, sources = _assert_consistent(account.id)
    assert real["result"]["groups"] == result["groups"]
    assert sorted(sorted(s.id for s in g) for g in sources.values()) == sorted(
        sorted(g) for g in result["planned_groups"]
    )


def test_important_and_recent_memories_are_never_merged(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    old = utcnow() - timedelta(days=90)
    rows = []
    for label, importance, created_at, copies in (
        ("important", 0.9, old, 3),
        ("plain", 0.3, old, 3),
        ("recent", 0.3, utcnow(), 2),
    ):
        for i in range(copies):
            rows.append(
                {
                    "id": new_id("mem"),
                    "account_id": account.id,
                    "collection_id": collection,
                    "content": f"Alice: I moved to Lisbon in March for the new job ({label}).",
                    "importance": importance,
                    "metadata": {"label": label, "copy": i},
                    "created_at": created_at + timedelta(seconds=i),
                }
            )
    with session_scope() as session:
        insert_memories(session, rows)

    job = wait_for_job(client, account, start_job(client, account, "consolidation")["id"])
    assert job["status"] == "completed", job
    assert job["result"]["groups"] == 1 and job["result"]["memories_merged"] == 3
    merged, sources = _assert_consistent(account.id)
    (group,) = sources.values()
    assert {m.metadata_["label"] for m in group} == {"plain"}
    for memory in _memories(account.id):
        if memory.metadata_.get("label") in ("important", "recent"):
            assert memory.deleted_at is None and memory.consolidated_into is None
    assert merged[0].importance == 0.3
    assert merged[0].content == "Alice: I moved to Lisbon in March for the new job (plain)."

    # A threshold below every importance protects everything.
    job = wait_for_job(
        client,
        account,
        start_job(client, account, "consolidation", keep_importance_above=0.2, older_than_days=0)[
            "id"
        ],
    )
    assert job["result"]["groups"] == 0


def test_search_resolves_a_consolidated_hit_to_its_sources(
    client: Any,
    account: Account,
    collection: str,
    make_account: Callable[..., Account],
    worker: Proc,
) -> None:
    locomo.import_turns(account.id, collection)
    job = wait_for_job(client, account, start_job(client, account, "consolidation")["id"])
    merged, sources = _assert_consistent(account.id)
    target = merged[0]
    query = target.content.splitlines()[0]
    body = {"query": query, "collection_id": collection, "limit": 5}

    plain = client.post("/v1/memories/search", json=body, headers=account.headers).json
    assert plain["data"][0]["memory"]["id"] == target.id
    assert "sources" not in plain["data"][0]
    resolved = client.post(
        "/v1/memories/search", json={**body, "resolve_sources": True}, headers=account.headers
    ).json
    hit = resolved["data"][0]
    assert hit["memory"]["id"] == target.id
    assert [s["id"] for s in hit["sources"]] == [
        s.id for s in sorted(sources[target.id], key=lambda m: (m.created_at, m.id))
    ]
    assert all(s["consolidated_into"] == target.id for s in hit["sources"])
    assert job["status"] == "completed"

    other = make_account("other")
    resp = client.post(
        "/v1/memories/search",
        json={"query": query, "resolve_sources": True},
        headers=other.headers,
    )
    assert resp.status_code == 200 and resp.json["data"] == []


def test_bad_parameters_are_422(
    client: Any, account: Account, collection: str, make_account: Callable[..., Account]
) -> None:
    for parameters, field in (
        ({"similarity_threshold": 1.5}, "similarity_threshold"),
        ({"max_group_size": 1}, "max_group_size"),
        ({"keep_importance_above": -0.1}, "keep_importance_above"),
        ({"older_than_days": -1}, "older_than_days"),
        ({"dry_run": "perhaps"}, "dry_run"),
        ({"bogus": 1}, "bogus"),
    ):
        resp = client.post(
            "/v1/jobs",
            json={"type": "consolidation", "parameters": parameters},
            headers=account.headers,
        )
        assert resp.status_code == 422, parameters
        assert field in resp.json["errors"]["json"]["parameters"]
    other = make_account("other")
    resp = client.post(
        "/v1/jobs",
        json={"type": "consolidation", "parameters": {"collection_id": collection}},
        headers=other.headers,
    )
    assert resp.status_code == 422
    assert resp.json["errors"]["json"]["parameters"] == {"collection_id": ["No such collection."]}


def test_scheduled_daily_with_the_safe_defaults() -> None:
    entry = beat_schedule(get_settings())["consolidation-every-account"]
    assert entry["args"] == ("consolidation", "daily")


# --- long runs: cancel and a killed worker ------------------------------------------

# Each turn five times over, in groups of at most two: about a thousand groups,
# each its own transaction and checkpoint, so the run lasts some seconds.
LONG_RUN = {"max_group_size": 2, "similarity_threshold": 0.95}


def _groups_done(job_id: str) -> int:
    with session_scope() as session:
        checkpoint = session.scalar(select(Job.checkpoint).where(Job.id == job_id))
    return int(((checkpoint or {}).get("stats") or {}).get("groups", 0))


def _wait_for_groups(job_id: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _groups_done(job_id) < at_least:
        assert time.monotonic() < deadline, "the job did not get going"
        time.sleep(0.02)


def _merged_count(account_id: str) -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Memory)
                .where(Memory.account_id == account_id, Memory.consolidated_into.is_not(None))
            )
            or 0
        )


def test_cancel_stops_between_groups_and_leaves_them_whole(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    locomo.import_turns(account.id, collection, copies=5)
    job = start_job(client, account, "consolidation", **LONG_RUN)
    _wait_for_groups(job["id"], 20)
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 200 and resp.json["status"] == "cancelled"

    deadline = time.monotonic() + 20
    while True:
        job = client.get(f"/v1/jobs/{job['id']}", headers=account.headers).json
        if job["error_details"]:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "cancelled"
    details = job["error_details"]
    assert details["code"] == "cancelled" and details["groups"] >= 20
    time.sleep(0.5)  # nothing more is written after the stop
    merged, sources = _assert_consistent(account.id)
    assert 20 <= len(merged) == details["groups"]
    assert _merged_count(account.id) == details["memories_merged"]
    assert len(merged) < 419 * 5 // 2  # it stopped part way


def test_killed_worker_resumes_and_merges_each_group_once(
    client: Any,
    account: Account,
    collection: str,
    start_worker: Callable[..., Proc],
    beat: Proc,
) -> None:
    locomo.import_turns(account.id, collection, copies=5)
    first = start_worker(queues=("consolidation", "system"), concurrency=1)
    job = start_job(client, account, "consolidation", **LONG_RUN)
    _wait_for_groups(job["id"], 30)
    first.kill()
    first.popen.wait(timeout=10)
    start_worker(queues=("consolidation", "system"), concurrency=1)

    job = wait_for_job(client, account, job["id"], timeout=80)
    assert job["status"] == "completed", job
    assert job["attempts"] == 2
    result = job["result"]
    merged, sources = _assert_consistent(account.id)
    assert len(merged) == result["groups"] == result["memories_created"]
    assert _merged_count(account.id) == result["memories_merged"]
    # Five copies of each turn, in pairs: two pairs per turn, one copy left over.
    assert result["groups"] == 2 * 419
    for memory in merged:
        (dia,) = {s.metadata_["dia_id"] for s in sources[memory.id]}
    assert result["memories_scanned"] == 419 * 5
