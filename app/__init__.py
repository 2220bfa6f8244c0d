"""The Flask application: ``create_app()`` builds it, with its Celery client."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify
from flask_smorest import Api
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from app.db import new_session
from config import get_settings
from tasks.celery_app import make_celery

log = logging.getLogger(__name__)


def _error_body(code: int, status: str, message: str) -> dict[str, Any]:
    return {"code": code, "status": status, "message": message}


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    settings = get_settings()
    app = Flask(__name__)
    app.config.update(
        API_TITLE="Hebbrix Jobs",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH=None,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {
                    "bearerAuth": {"type": "http", "scheme": "bearer"},
                }
            },
            "security": [{"bearerAuth": []}],
        },
    )
    app.config.update(overrides or {})
    # Publishing only: the API sends tasks by name and never imports them.
    app.extensions["celery"] = make_celery()

    api = Api(app)
    from app.api import collections, documents, jobs, memories

    for module in (jobs, collections, memories, documents):
        api.register_blueprint(module.blp)

    @app.before_request
    def _open_session() -> None:
        g.db = new_session()

    @app.teardown_request
    def _close_session(_exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def _database_unavailable(exc: Exception) -> Any:
        # The database is down or restarting: say so, and let the client retry.
        log.warning("database unavailable: %s", type(exc).__name__)
        body = _error_body(
            503, "Service Unavailable", "The database is unavailable; try again shortly."
        )
        return jsonify(body), 503, {"Retry-After": "5"}

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return api.handle_http_exception(exc)
        log.exception("unhandled error")
        return jsonify(_error_body(500, "Internal Server Error", "Internal error.")), 500

    @app.get("/healthz")
    def _health() -> Any:
        return {"status": "ok"}

    return app
