"""Property-based fuzzing of the served OpenAPI document with schemathesis.

Every operation of ``/openapi.json`` is called with generated valid and invalid
input, authenticated with a real API key, against the real test database. What
must hold: no 5xx, and every response (status, content type, body) is one the
document declares. A failure is fixed in the schema or the code, never by
loosening the check.

No worker runs: jobs the fuzzer manages to create stay queued.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app import create_app
from app.auth import create_account
from app.db import session_scope
from app.models import Artifact, Collection, Document, Job, Memory, new_id, utcnow
from tests.helpers import Account

pytestmark = pytest.mark.fuzz

# Per operation and generation phase; raise it for a deeper run outside CI.
MAX_EXAMPLES = int(os.environ.get("HEBBRIX_FUZZ_EXAMPLES", "40"))
# Fixed seed and derandomized Hypothesis: CI sees the same cases on every run.
SEED = int(os.environ.get("HEBBRIX_FUZZ_SEED", "20250401"))

_config = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            # NUL bytes are exactly the input PostgreSQL text refuses; keep them.
            "allow-x00": True,
        },
    }
)
# The document as the running service serves it, not a copy of it.
schema = schemathesis.openapi.from_wsgi(
    "/openapi.json", create_app({"TESTING": True}), config=_config
)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]

# Figures for the report: examples per operation and the server errors seen.
EXAMPLES: Counter[str] = Counter()
SERVER_ERRORS: Counter[str] = Counter()


class Seeded:
    """An account that owns one of each resource, so generated requests also reach
    the 200 branches of the by-id operations, not only their 404s."""

    def __init__(self, account: Account, ids: dict[str, str]) -> None:
        self.account = account
        self.ids = ids


def _seed() -> Seeded:
    with session_scope() as session:
        acc, key = create_account(session, "fuzz")
        collection = Collection(id=new_id("col"), account_id=acc.id, name="fuzz")
        session.add(collection)
        session.flush()
        document = Document(
            id=new_id("doc"),
            account_id=acc.id,
            collection_id=collection.id,
            source_url="http://127.0.0.1/a.txt",
            name="a.txt",
            content_type="text/plain",
            bytes=3,
            sha256="0" * 64,
        )
        session.add(document)
        session.flush()
        memory = Memory(
            id=new_id("mem"),
            account_id=acc.id,
            collection_id=collection.id,
            document_id=document.id,
            content="fuzzing seed memory",
            importance=0.5,
            metadata_={"k": "v"},
        )
        job = Job(
            id=new_id("job"),
            account_id=acc.id,
            type="cleanup",
            status="completed",
            progress=100.0,
            parameters={},
            metadata_={},
            result={"memories_purged": 0},
            queue="cleanup",
            attempts=1,
            finished_at=utcnow(),
        )
        session.add_all([memory, job])
        session.flush()
        artifact = Artifact(
            id=new_id("art"),
            account_id=acc.id,
            job_id=job.id,
            kind="export",
            filename="export.zip",
            content_type="application/zip",
            location=f"{acc.id}/missing.zip",
            bytes=10,
            sha256="0" * 64,
        )
        session.add(artifact)
        ids = {
            "collection_id": collection.id,
            "document_id": document.id,
            "memory_id": memory.id,
            "job_id": job.id,
            "artifact_id": artifact.id,
        }
        return Seeded(Account(acc.id, key), ids)


@pytest.fixture(scope="module")
def seeded(database: str) -> Seeded:
    return _seed()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize="HEBBRIX_FUZZ_SEED" not in os.environ,
    database=None,
    # One slow example (a large generated body) must not fail the run; the
    # pytest timeout below bounds each operation, the example count the file.
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@pytest.mark.timeout(120)
def test_operation_conforms_to_its_schema(case: schemathesis.Case, seeded: Seeded) -> None:
    label = case.operation.label
    attempts = [case]
    known = {name: seeded.ids[name] for name in case.path_parameters if name in seeded.ids}
    if known:
        # The same generated query and body against a resource that exists.
        attempts.append(
            case.operation.Case(
                path_parameters={**case.path_parameters, **known},
                query=case.query,
                headers=case.headers,
                body=case.body,
                media_type=case.media_type,
            )
        )
    for attempt in attempts:
        EXAMPLES[label] += 1
        response = attempt.call(headers=seeded.account.headers)
        if response.status_code >= 500:
            SERVER_ERRORS[label] += 1
        attempt.validate_response(response, checks=CHECKS, headers=seeded.account.headers)


def test_every_operation_was_fuzzed(request: pytest.FixtureRequest, fault_ledger: Any) -> None:
    ran = {
        item.name
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_operation_conforms_to_its_schema"
    }
    if not ran:
        pytest.skip("the fuzz tests were not selected")
    operations = [
        op.ok().label for op in schema.get_all_operations() if hasattr(op, "ok")
    ]
    print(
        f"\nfuzzed {len(EXAMPLES)}/{len(operations)} operations, "
        f"{sum(EXAMPLES.values())} requests, {sum(SERVER_ERRORS.values())} server errors"
    )
    for label in operations:
        print(f"  {EXAMPLES[label]:5d}  {label}")
    if len(ran) == len(operations):
        assert set(EXAMPLES) == set(operations)
    # Into the suite's table of figures (the README's).
    fault_ledger.record(
        f"API fuzzing, {len(EXAMPLES)} operations (schemathesis)",
        bad_inputs=sum(EXAMPLES.values()),
        server_errors=sum(SERVER_ERRORS.values()),
    )
    assert not SERVER_ERRORS
