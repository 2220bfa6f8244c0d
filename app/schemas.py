"""Request and response schemas, including the per-type job parameters."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from config import IMPORT_FORMATS, JOB_TYPES

MAX_PAGE_SIZE = 100


# Deeper JSON than this in a request is refused: no field needs it, and every
# reader of the stored value (exports, jobs, the database) would pay for it.
MAX_JSON_DEPTH = 32


def is_storable_text(value: str) -> bool:
    """PostgreSQL text cannot hold NUL, and a lone surrogate (which a JSON ``\\u``
    escape can produce) has no UTF-8 form: either would fail in the database."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unstorable(value: Any) -> str | None:
    """Why ``value`` (a loaded field, with nested dicts and lists) cannot be stored,
    or None. Iterative, so hostile nesting cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_storable_text(item):
                return "Text must not contain NUL characters or unpaired surrogates."
        elif isinstance(item, dict | list | tuple):
            if depth > MAX_JSON_DEPTH:
                return f"Nested too deeply (at most {MAX_JSON_DEPTH} levels)."
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


class StrictSchema(ma.Schema):
    """Unknown fields are an error, never silently dropped; a value the database
    could not store is a field error (422), not a database error."""

    class Meta:
        unknown = ma.RAISE

    @ma.validates_schema
    def _storable(self, data: dict[str, Any], **_: Any) -> None:
        # Checked on the loaded data, nested dicts (metadata, job parameters) included.
        problems = {name: _unstorable(value) for name, value in data.items()}
        bad = {name: [problem] for name, problem in problems.items() if problem}
        if bad:
            raise ma.ValidationError(bad)


def _percent_float(**kwargs: Any) -> fields.Float:
    return fields.Float(validate=validate.Range(0.0, 1.0), **kwargs)


# --- job parameters, one schema per type -----------------------------------


class BulkImportParameters(StrictSchema):
    source_url = fields.Url(
        required=True,
        schemes={"http", "https"},
        require_tld=False,
        metadata={"description": "http(s) URL of the source to import."},
    )
    collection_id = fields.String(required=True, validate=validate.Length(1, 40))
    format = fields.String(validate=validate.OneOf(IMPORT_FORMATS))
    chunk_size = fields.Integer(validate=validate.Range(100, 20_000))
    chunk_overlap = fields.Integer(validate=validate.Range(0, 5_000))
    password = fields.String(
        validate=validate.Length(1, 200),
        load_only=True,
        metadata={"description": "Password of an encrypted PDF."},
    )

    @ma.validates_schema
    def _overlap_below_size(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("chunk_overlap", 0) >= data.get("chunk_size", 1000):
            raise ma.ValidationError("Must be smaller than chunk_size.", "chunk_overlap")


class DataExportParameters(StrictSchema):
    collection_ids = fields.List(
        fields.String(validate=validate.Length(1, 40)), validate=validate.Length(1, 1000)
    )
    include = fields.List(
        fields.String(validate=validate.OneOf(("memories", "documents", "collections"))),
        validate=validate.Length(1, 3),
    )
    format = fields.String(validate=validate.OneOf(("jsonl",)))
    compression = fields.String(validate=validate.OneOf(("zip", "tar.gz")))
    include_deleted = fields.Boolean()


class BackupParameters(StrictSchema):
    compression = fields.String(validate=validate.OneOf(("tar.gz", "zip")))


class ConsolidationParameters(StrictSchema):
    collection_id = fields.String(validate=validate.Length(1, 40))
    older_than_days = fields.Integer(validate=validate.Range(0, 36_500))
    similarity_threshold = _percent_float()
    keep_importance_above = _percent_float()
    max_group_size = fields.Integer(validate=validate.Range(2, 100))
    dry_run = fields.Boolean()


class CleanupParameters(StrictSchema):
    older_than_days = fields.Integer(validate=validate.Range(0, 36_500))
    dry_run = fields.Boolean()


class RlTrainingParameters(StrictSchema):
    algorithm = fields.String(validate=validate.OneOf(("reinforce",)))
    epochs = fields.Integer(validate=validate.Range(1, 1000))
    learning_rate = fields.Float(validate=validate.Range(0.0, 10.0, min_inclusive=False))
    seed = fields.Integer(validate=validate.Range(0, 2**31 - 1))
    holdout_fraction = fields.Float(validate=validate.Range(0.05, 0.9))
    candidates = fields.Integer(validate=validate.Range(2, 200))


PARAMETER_SCHEMAS: dict[str, type[StrictSchema]] = {
    "bulk_import": BulkImportParameters,
    "data_export": DataExportParameters,
    "backup": BackupParameters,
    "consolidation": ConsolidationParameters,
    "cleanup": CleanupParameters,
    "rl_training": RlTrainingParameters,
}
assert set(PARAMETER_SCHEMAS) == set(JOB_TYPES)


# --- jobs -------------------------------------------------------------------


class JobCreateSchema(StrictSchema):
    type = fields.String(required=True, validate=validate.OneOf(JOB_TYPES))
    parameters = fields.Dict(keys=fields.String(), load_default=dict)
    metadata = fields.Dict(keys=fields.String(), load_default=dict)


class JobSchema(ma.Schema):
    id = fields.String()
    object = fields.Constant("job")
    type = fields.String()
    status = fields.String(
        validate=validate.OneOf(("queued", "running", "completed", "failed", "cancelled"))
    )
    progress = fields.Float()
    progress_message = fields.String(allow_none=True)
    parameters = fields.Dict()
    metadata = fields.Dict(attribute="metadata_")
    result = fields.Dict(allow_none=True)
    error_message = fields.String(allow_none=True)
    error_details = fields.Dict(allow_none=True)
    queue = fields.String()
    attempts = fields.Integer()
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime()
    cancel_requested_at = fields.DateTime(allow_none=True)
    expires_at = fields.DateTime(allow_none=True)

    @ma.post_dump(pass_original=True)
    def _hide_secrets(self, data: dict[str, Any], job: Any, **_: Any) -> dict[str, Any]:
        if "password" in data.get("parameters", {}):
            data["parameters"] = {**data["parameters"], "password": "***"}
        return data


class PageQuerySchema(StrictSchema):
    limit = fields.Integer(load_default=20, validate=validate.Range(1, MAX_PAGE_SIZE))
    after = fields.String(validate=validate.Length(1, 200))


class JobListQuerySchema(PageQuerySchema):
    status = fields.String(
        validate=validate.OneOf(("queued", "running", "completed", "failed", "cancelled"))
    )
    type = fields.String(validate=validate.OneOf(JOB_TYPES))


def page_schema(item: type[ma.Schema], name: str) -> type[ma.Schema]:
    """The ``{data, has_more, next_cursor}`` envelope of a list of ``item``."""
    return ma.Schema.from_dict(
        {
            "object": fields.Constant("list"),
            "data": fields.List(fields.Nested(item)),
            "has_more": fields.Boolean(),
            "next_cursor": fields.String(allow_none=True),
        },
        name=name,
    )


JobPageSchema = page_schema(JobSchema, "JobPage")


# --- the memory store -------------------------------------------------------


class CollectionCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=validate.Length(1, 200))


class CollectionSchema(ma.Schema):
    id = fields.String()
    object = fields.Constant("collection")
    name = fields.String()
    created_at = fields.DateTime()


CollectionPageSchema = page_schema(CollectionSchema, "CollectionPage")


class DocumentSchema(ma.Schema):
    id = fields.String()
    object = fields.Constant("document")
    collection_id = fields.String()
    job_id = fields.String(allow_none=True)
    source_url = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    title = fields.String(allow_none=True)
    content_type = fields.String()
    bytes = fields.Integer()
    sha256 = fields.String()
    pages = fields.Integer(allow_none=True)
    status = fields.String()
    created_at = fields.DateTime()


DocumentPageSchema = page_schema(DocumentSchema, "DocumentPage")


class DocumentListQuerySchema(PageQuerySchema):
    collection_id = fields.String(validate=validate.Length(1, 40))


class MemoryCreateSchema(StrictSchema):
    collection_id = fields.String(required=True, validate=validate.Length(1, 40))
    content = fields.String(required=True, validate=validate.Length(1, 100_000))
    importance = _percent_float(load_default=0.5)
    metadata = fields.Dict(keys=fields.String(), load_default=dict)


class MemorySchema(ma.Schema):
    id = fields.String()
    object = fields.Constant("memory")
    collection_id = fields.String()
    document_id = fields.String(allow_none=True)
    content = fields.String()
    importance = fields.Float()
    metadata = fields.Dict(attribute="metadata_")
    created_at = fields.DateTime()
    deleted_at = fields.DateTime(allow_none=True)
    consolidated_into = fields.String(allow_none=True)


MemoryPageSchema = page_schema(MemorySchema, "MemoryPage")


class MemoryListQuerySchema(PageQuerySchema):
    collection_id = fields.String(validate=validate.Length(1, 40))
    document_id = fields.String(validate=validate.Length(1, 40))
    include_deleted = fields.Boolean(load_default=False)


class SearchRequestSchema(StrictSchema):
    query = fields.String(required=True, validate=validate.Length(1, 2000))
    collection_id = fields.String(validate=validate.Length(1, 40))
    limit = fields.Integer(load_default=10, validate=validate.Range(1, MAX_PAGE_SIZE))
    resolve_sources = fields.Boolean(
        load_default=False,
        metadata={"description": "With each consolidated hit, the memories merged into it."},
    )
    rerank = fields.Boolean(
        load_default=False,
        metadata={"description": "Re-rank the candidates with the account's newest policy."},
    )


class SearchHitSchema(ma.Schema):
    score = fields.Float(metadata={"description": "The BM25 score."})
    policy_score = fields.Float(metadata={"description": "The policy's score, with rerank."})
    memory = fields.Nested(MemorySchema)
    sources = fields.List(
        fields.Nested(MemorySchema),
        metadata={"description": "With resolve_sources: what consolidation merged into it."},
    )


class SearchResultSchema(ma.Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(SearchHitSchema))
    policy_id = fields.String(
        allow_none=True,
        metadata={"description": "With rerank: the policy used, null when there is none."},
    )


class ArtifactSchema(ma.Schema):
    id = fields.String()
    object = fields.Constant("artifact")
    kind = fields.String()
    job_id = fields.String(allow_none=True)
    filename = fields.String()
    content_type = fields.String()
    bytes = fields.Integer()
    sha256 = fields.String()
    download_url = fields.String()
    created_at = fields.DateTime()
    expires_at = fields.DateTime(allow_none=True)


class FeedbackCreateSchema(StrictSchema):
    query = fields.String(required=True, validate=validate.Length(1, 2000))
    reward = fields.Float(required=True, validate=validate.Range(-1.0, 1.0))


class FeedbackSchema(ma.Schema):
    id = fields.Integer()
    object = fields.Constant("feedback")
    memory_id = fields.String()
    query = fields.String()
    reward = fields.Float()
    created_at = fields.DateTime()
