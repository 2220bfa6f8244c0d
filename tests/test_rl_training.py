"""rl_training against real PostgreSQL, Redis and worker processes, on LoCoMo.

Memories are the turns of conversation 26; feedback rates the evidence turns of
a training share of its questions (+1) and the top results that are not
evidence (-0.3), as a user would. The policy must beat plain BM25 on held-out
queries, resume from its epoch checkpoint after a killed worker, publish
nothing when cancelled, and shape only its own account's search.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete, select

from app.db import session_scope
from app.models import Job, MemoryFeedback, Policy, new_id, utcnow
from app.search import RANKING_FEATURES
from tests import locomo
from tests.helpers import Account, Proc, start_job, wait_for_job

pytestmark = pytest.mark.slow

FEEDBACK_SHARE = 0.6


def _split() -> tuple[list[locomo.Question], list[locomo.Question]]:
    questions = locomo.questions()
    random.Random(0).shuffle(questions)
    cut = round(FEEDBACK_SHARE * len(questions))
    return questions[:cut], questions[cut:]


def _search(client: Any, account: Account, query: str, **extra: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/memories/search",
        json={"query": query, "limit": 10, **extra},
        headers=account.headers,
    )
    assert resp.status_code == 200, resp.json
    return resp.json


def _rate_through_api(
    client: Any, account: Account, ids: dict[str, list[str]], questions: list[locomo.Question]
) -> int:
    rows = 0
    for question in questions:
        for dia in sorted(question.evidence):
            resp = client.post(
                f"/v1/memories/{ids[dia][0]}/feedback",
                json={"query": question.text, "reward": 1.0},
                headers=account.headers,
            )
            assert resp.status_code == 201, resp.json
            rows += 1
        hits = _search(client, account, question.text)["data"]
        wrong = [h for h in hits if h["memory"]["metadata"]["dia_id"] not in question.evidence]
        for hit in wrong[:3]:
            resp = client.post(
                f"/v1/memories/{hit['memory']['id']}/feedback",
                json={"query": question.text, "reward": -0.3},
                headers=account.headers,
            )
            assert resp.status_code == 201
            rows += 1
    return rows


def _rate_directly(account_id: str, ids: dict[str, list[str]], questions: list[Any]) -> None:
    with session_scope() as session:
        for question in questions:
            for dia in sorted(question.evidence):
                session.add(
                    MemoryFeedback(
                        account_id=account_id,
                        memory_id=ids[dia][0],
                        query=question.text,
                        reward=1.0,
                    )
                )


def _policies(account_id: str) -> list[Policy]:
    with session_scope() as session:
        rows = list(
            session.scalars(
                select(Policy).where(Policy.account_id == account_id).order_by(Policy.version)
            )
        )
        session.expunge_all()
        return rows


def _mrr(client: Any, account: Account, questions: list[locomo.Question], **extra: Any) -> float:
    total = 0.0
    for question in questions:
        hits = _search(client, account, question.text, **extra)["data"]
        for rank, hit in enumerate(hits):
            if hit["memory"]["metadata"]["dia_id"] in question.evidence:
                total += 1.0 / (rank + 1)
                break
    return total / len(questions)


def test_learns_a_policy_that_beats_bm25_on_held_out_queries(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    ids = locomo.import_turns(account.id, collection)
    asked, unseen = _split()
    rows = _rate_through_api(client, account, ids, asked)

    job = wait_for_job(client, account, start_job(client, account, "rl_training", seed=0)["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["policy_id"].startswith("pol_") and result["version"] == 1
    assert result["algorithm"] == "reinforce" and result["resumed_from_epoch"] == 0
    assert result["train_queries"] + result["heldout_queries"] == len(asked)
    assert rows > result["train_queries"]
    curve = result["training"]
    assert len(curve["mean_reward_per_epoch"]) == result["epochs"] == 40
    assert curve["last"] > curve["first"]  # it learnt something on the train queries
    untrained, trained = result["heldout"]["untrained"], result["heldout"]["trained"]
    assert untrained["queries"] == trained["queries"] > 0
    assert trained["recall@10"] > untrained["recall@10"] or trained["mrr"] > untrained["mrr"]

    (policy,) = _policies(account.id)
    assert policy.id == result["policy_id"] and policy.job_id == job["id"]
    assert set(policy.weights) == set(RANKING_FEATURES)

    # Search with rerank uses it; without, plain BM25 order.
    reordered = 0
    for question in unseen[:20]:
        plain = _search(client, account, question.text)
        ranked = _search(client, account, question.text, rerank=True)
        assert ranked["policy_id"] == policy.id and "policy_id" not in plain
        assert all("policy_score" in h for h in ranked["data"])
        reordered += [h["memory"]["id"] for h in plain["data"]] != [
            h["memory"]["id"] for h in ranked["data"]
        ]
    assert reordered > 0
    # On questions training never saw, the first right answer comes no later.
    assert _mrr(client, account, unseen, rerank=True) >= _mrr(client, account, unseen) - 0.01


def test_too_little_feedback_is_refused_with_what_is_needed(
    client: Any, account: Account, collection: str
) -> None:
    ids = locomo.import_turns(account.id, collection)
    questions = locomo.questions()
    resp = client.post("/v1/jobs", json={"type": "rl_training"}, headers=account.headers)
    assert resp.status_code == 422
    assert "at least 20 feedback" in resp.json["message"]
    assert "at least 10 distinct queries" in resp.json["message"]

    # Plenty of rows, too few queries.
    with session_scope() as session:
        for question in questions[:5]:
            for _ in range(5):
                session.add(
                    MemoryFeedback(
                        account_id=account.id,
                        memory_id=ids[min(question.evidence)][0],
                        query=question.text,
                        reward=1.0,
                    )
                )
    resp = client.post("/v1/jobs", json={"type": "rl_training"}, headers=account.headers)
    assert resp.status_code == 422 and "has 25 over 5" in resp.json["message"]

    _rate_directly(account.id, ids, questions[5:20])
    resp = client.post("/v1/jobs", json={"type": "rl_training"}, headers=account.headers)
    assert resp.status_code == 202, resp.json
    # No worker here; leave nothing queued for the next test's workers.
    client.post(f"/v1/jobs/{resp.json['id']}/cancel", headers=account.headers)


def test_handler_fails_clearly_when_the_feedback_is_gone(
    client: Any, account: Account, collection: str, start_worker: Callable[..., Proc]
) -> None:
    ids = locomo.import_turns(account.id, collection)
    _rate_directly(account.id, ids, locomo.questions()[:25])
    job = start_job(client, account, "rl_training")
    with session_scope() as session:
        session.execute(delete(MemoryFeedback).where(MemoryFeedback.account_id == account.id))
    start_worker(queues=("rl_training",), concurrency=1)
    job = wait_for_job(client, account, job["id"])
    assert job["status"] == "failed"
    assert job["error_details"]["code"] == "not_enough_feedback"
    assert "at least 20 feedback" in job["error_message"]
    assert _policies(account.id) == []


def test_bad_parameters_are_422(client: Any, account: Account) -> None:
    for parameters, field in (
        ({"algorithm": "ppo"}, "algorithm"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 100_000}, "epochs"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"seed": -1}, "seed"),
        ({"holdout_fraction": 0.95}, "holdout_fraction"),
        ({"candidates": 1}, "candidates"),
        ({"temperature": 1.0}, "temperature"),
    ):
        resp = client.post(
            "/v1/jobs",
            json={"type": "rl_training", "parameters": parameters},
            headers=account.headers,
        )
        assert resp.status_code == 422, parameters
        assert field in resp.json["errors"]["json"]["parameters"], resp.json


def test_rerank_uses_only_the_callers_own_policy(
    client: Any, account: Account, collection: str, make_account: Callable[..., Account]
) -> None:
    other = make_account("other")
    resp = client.post("/v1/collections", json={"name": "b"}, headers=other.headers)
    locomo.import_turns(account.id, collection)
    locomo.import_turns(other.id, resp.json["id"])
    # The account's policy turns BM25 upside down: impossible to miss if it leaked.
    upside_down = {name: 0.0 for name in RANKING_FEATURES} | {"bm25": -5.0}
    with session_scope() as session:
        session.add(
            Policy(
                id=new_id("pol"),
                account_id=account.id,
                version=1,
                algorithm="reinforce",
                features={"candidates": 50},
                weights=upside_down,
                metrics={},
                created_at=utcnow(),
            )
        )
    query = "What did Caroline research?"

    plain_other = _search(client, other, query)
    ranked_other = _search(client, other, query, rerank=True)
    assert ranked_other["policy_id"] is None
    assert [h["memory"]["content"] for h in ranked_other["data"]] == [
        h["memory"]["content"] for h in plain_other["data"]
    ]
    plain = _search(client, account, query)
    ranked = _search(client, account, query, rerank=True)
    assert ranked["policy_id"] is not None
    assert ranked["data"][0]["memory"]["id"] not in {h["memory"]["id"] for h in plain["data"]}

    # The other account's own policy is its own to use.
    keep_bm25 = {name: 0.0 for name in RANKING_FEATURES} | {"bm25": 1.0}
    own = new_id("pol")
    with session_scope() as session:
        session.add(
            Policy(
                id=own,
                account_id=other.id,
                version=1,
                algorithm="reinforce",
                features={"candidates": 50},
                weights=keep_bm25,
                metrics={},
                created_at=utcnow(),
            )
        )
    ranked_other = _search(client, other, query, rerank=True)
    assert ranked_other["policy_id"] == own
    assert [h["memory"]["id"] for h in ranked_other["data"]] == [
        h["memory"]["id"] for h in plain_other["data"]
    ]


# --- long runs: cancel and a killed worker ------------------------------------------


def _checkpoint(job_id: str) -> dict[str, Any]:
    with session_scope() as session:
        return session.scalar(select(Job.checkpoint).where(Job.id == job_id)) or {}


def _wait_for_epoch(job_id: str, epoch: int, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint(job_id).get("epoch", 0) < epoch:
        assert time.monotonic() < deadline, "training did not get going"
        time.sleep(0.02)


def test_cancel_stops_at_an_epoch_boundary_and_publishes_nothing(
    client: Any, account: Account, collection: str, worker: Proc
) -> None:
    ids = locomo.import_turns(account.id, collection)
    _rate_directly(account.id, ids, _split()[0])
    job = start_job(client, account, "rl_training", epochs=1000)
    _wait_for_epoch(job["id"], 3)
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 200 and resp.json["status"] == "cancelled"

    deadline = time.monotonic() + 20
    while not (job := client.get(f"/v1/jobs/{job['id']}", headers=account.headers).json)[
        "error_details"
    ]:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "cancelled"
    assert job["error_details"]["code"] == "cancelled"
    done = job["error_details"]["epochs_done"]
    assert 3 <= done < 1000
    time.sleep(0.5)
    assert _policies(account.id) == []
    # The last epoch's checkpoint stays with the job.
    saved = _checkpoint(job["id"])
    assert saved["epoch"] == done and len(saved["weights"]) == len(RANKING_FEATURES)
    assert len(saved["curve"]) == done


def test_killed_worker_resumes_at_its_epoch_and_publishes_once(
    client: Any,
    account: Account,
    collection: str,
    start_worker: Callable[..., Proc],
    beat: Proc,
) -> None:
    ids = locomo.import_turns(account.id, collection)
    _rate_directly(account.id, ids, _split()[0])
    epochs = 250
    first = start_worker(queues=("rl_training", "system"), concurrency=1)
    job = start_job(client, account, "rl_training", epochs=epochs, seed=7)
    _wait_for_epoch(job["id"], 20)
    first.kill()
    first.popen.wait(timeout=10)
    reached = _checkpoint(job["id"])["epoch"]
    start_worker(queues=("rl_training", "system"), concurrency=1)

    job = wait_for_job(client, account, job["id"], timeout=80)
    assert job["status"] == "completed", job
    assert job["attempts"] == 2
    result = job["result"]
    assert result["resumed_from_epoch"] == reached >= 20
    assert len(result["training"]["mean_reward_per_epoch"]) == epochs
    (policy,) = _policies(account.id)
    assert policy.id == result["policy_id"] and policy.version == 1
    assert policy.job_id == job["id"]

    # Resuming restored weights, optimiser and random state exactly: an
    # uninterrupted run with the same seed learns the very same policy.
    straight = start_job(client, account, "rl_training", epochs=epochs, seed=7)
    straight = wait_for_job(client, account, straight["id"], timeout=60)
    assert straight["result"]["version"] == 2 and straight["attempts"] == 1
    assert straight["result"]["weights"] == pytest.approx(policy.weights, abs=1e-9)
    assert straight["result"]["training"] == result["training"]
