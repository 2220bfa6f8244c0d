"""/v1/documents: the sources bulk_import turned into memories."""

from __future__ import annotations

from typing import Any

from flask import g
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from app.api import get_owned
from app.auth import authenticate
from app.models import Document
from app.pagination import paginate
from app.schemas import DocumentListQuerySchema, DocumentPageSchema, DocumentSchema

blp = Blueprint(
    "documents", __name__, url_prefix="/v1/documents", description="Imported documents."
)
blp.before_request(authenticate)


@blp.route("")
class Documents(MethodView):
    @blp.arguments(DocumentListQuerySchema, location="query")
    @blp.response(200, DocumentPageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List documents, newest first"""
        stmt = select(Document).where(Document.account_id == g.account_id)
        if "collection_id" in query:
            stmt = stmt.where(Document.collection_id == query["collection_id"])
        return paginate(g.db, stmt, Document, query["limit"], query.get("after"))


@blp.route("/<document_id>")
class DocumentById(MethodView):
    @blp.response(200, DocumentSchema)
    def get(self, document_id: str) -> Document:
        """Get a document"""
        return get_owned(Document, document_id, "document")
