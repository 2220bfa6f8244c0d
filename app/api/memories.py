"""/v1/memories: create, list, read, soft-delete, search, and rate memories."""

from __future__ import annotations

from typing import Any

from flask import g
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select, update

from app.api import get_owned
from app.api.collections import get_owned_collection
from app.auth import authenticate
from app.models import Memory, MemoryFeedback, new_id, utcnow
from app.pagination import paginate
from app.schemas import (
    FeedbackCreateSchema,
    FeedbackSchema,
    MemoryCreateSchema,
    MemoryListQuerySchema,
    MemoryPageSchema,
    MemorySchema,
    SearchRequestSchema,
    SearchResultSchema,
)
from app.store import (
    consolidation_sources,
    insert_memories,
    latest_policy,
    rerank_hits,
    search_memories,
)

blp = Blueprint("memories", __name__, url_prefix="/v1/memories", description="Memories.")
blp.before_request(authenticate)


def get_owned_memory(memory_id: str) -> Memory:
    return get_owned(Memory, memory_id, "memory")


@blp.route("")
class Memories(MethodView):
    @blp.arguments(MemoryCreateSchema)
    @blp.response(201, MemorySchema)
    @blp.alt_response(404, description="No such collection.")
    def post(self, body: dict[str, Any]) -> Memory:
        """Create a memory"""
        collection = get_owned_collection(body["collection_id"])
        memory_id = new_id("mem")
        insert_memories(
            g.db,
            [
                {
                    "id": memory_id,
                    "account_id": g.account_id,
                    "collection_id": collection.id,
                    "content": body["content"],
                    "importance": body["importance"],
                    "metadata": body["metadata"],
                }
            ],
        )
        g.db.commit()
        return g.db.get(Memory, memory_id)

    @blp.arguments(MemoryListQuerySchema, location="query")
    @blp.response(200, MemoryPageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List memories, newest first

        Soft-deleted memories are left out unless `include_deleted` is true.
        """
        stmt = select(Memory).where(Memory.account_id == g.account_id)
        if "collection_id" in query:
            stmt = stmt.where(Memory.collection_id == query["collection_id"])
        if "document_id" in query:
            stmt = stmt.where(Memory.document_id == query["document_id"])
        if not query["include_deleted"]:
            stmt = stmt.where(Memory.deleted_at.is_(None))
        return paginate(g.db, stmt, Memory, query["limit"], query.get("after"))


@blp.route("/<memory_id>")
class MemoryById(MethodView):
    @blp.response(200, MemorySchema)
    def get(self, memory_id: str) -> Memory:
        """Get a memory"""
        return get_owned_memory(memory_id)

    @blp.response(204)
    def delete(self, memory_id: str) -> None:
        """Delete a memory (soft)

        It disappears from lists and search at once; `cleanup` purges it after
        the grace period.
        """
        get_owned_memory(memory_id)
        g.db.execute(
            update(Memory)
            .where(Memory.id == memory_id, Memory.deleted_at.is_(None))
            .values(deleted_at=utcnow())
        )
        g.db.commit()


@blp.route("/search")
class MemorySearch(MethodView):
    @blp.arguments(SearchRequestSchema)
    @blp.response(200, SearchResultSchema)
    @blp.alt_response(404, description="No such collection.")
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Search memories

        Ranks the account's live memories (or one collection's) against the query.
        With `rerank`, the account's newest `rl_training` policy orders the best
        candidates; with `resolve_sources`, a consolidated hit lists the memories
        merged into it.
        """
        if "collection_id" in body:
            get_owned_collection(body["collection_id"])
        limit = body["limit"]
        # Only the caller's own policy: another account's feedback never shapes this.
        policy = latest_policy(g.db, g.account_id) if body["rerank"] else None
        candidates = max(limit, policy.features.get("candidates", limit)) if policy else limit
        hits = search_memories(
            g.db,
            g.account_id,
            body["query"],
            collection_id=body.get("collection_id"),
            limit=limit,
            candidates=candidates,
        )
        data: list[dict[str, Any]] = []
        if policy is not None:
            for memory, hit, policy_score in rerank_hits(policy, body["query"], hits)[:limit]:
                data.append({"score": hit.score, "policy_score": policy_score, "memory": memory})
        else:
            data = [{"score": hit.score, "memory": memory} for memory, hit in hits[:limit]]
        if body["resolve_sources"]:
            sources = consolidation_sources(g.db, g.account_id, [d["memory"].id for d in data])
            for item in data:
                if item["memory"].id in sources:
                    item["sources"] = sources[item["memory"].id]
        result: dict[str, Any] = {"data": data}
        if body["rerank"]:
            result["policy_id"] = policy.id if policy else None
        return result


@blp.route("/<memory_id>/feedback")
class MemoryFeedbackView(MethodView):
    @blp.arguments(FeedbackCreateSchema)
    @blp.response(201, FeedbackSchema)
    def post(self, body: dict[str, Any], memory_id: str) -> MemoryFeedback:
        """Rate a memory as an answer to a query

        Feedback is what `rl_training` learns a ranking policy from.
        """
        get_owned_memory(memory_id)
        feedback = MemoryFeedback(
            account_id=g.account_id,
            memory_id=memory_id,
            query=body["query"],
            reward=body["reward"],
        )
        g.db.add(feedback)
        g.db.commit()
        return feedback
