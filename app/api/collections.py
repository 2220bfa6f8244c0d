"""/v1/collections: the named groups memories live in."""

from __future__ import annotations

from typing import Any

from flask import g
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from app.api import get_owned
from app.auth import authenticate
from app.models import Collection, new_id
from app.pagination import paginate
from app.schemas import (
    CollectionCreateSchema,
    CollectionPageSchema,
    CollectionSchema,
    PageQuerySchema,
)

blp = Blueprint(
    "collections", __name__, url_prefix="/v1/collections", description="Collections of memories."
)
blp.before_request(authenticate)


def get_owned_collection(collection_id: str) -> Collection:
    return get_owned(Collection, collection_id, "collection")


@blp.route("")
class Collections(MethodView):
    @blp.arguments(CollectionCreateSchema)
    @blp.response(201, CollectionSchema)
    def post(self, body: dict[str, Any]) -> Collection:
        """Create a collection"""
        collection = Collection(id=new_id("col"), account_id=g.account_id, name=body["name"])
        g.db.add(collection)
        g.db.commit()
        return collection

    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, CollectionPageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """List collections, newest first"""
        stmt = select(Collection).where(Collection.account_id == g.account_id)
        return paginate(g.db, stmt, Collection, query["limit"], query.get("after"))


@blp.route("/<collection_id>")
class CollectionById(MethodView):
    @blp.response(200, CollectionSchema)
    def get(self, collection_id: str) -> Collection:
        """Get a collection"""
        return get_owned_collection(collection_id)
