"""The Flask application: ``create_app()`` builds it, with its Celery client."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify, request
from flask_smorest import Api, abort
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from app.db import new_session
from app.openapi import CommonResponses
from app.schemas import is_storable_text
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

    api = Api(app, spec_kwargs={"extra_plugins": [CommonResponses()]})
    from app.api import artifacts, collections, documents, jobs, memories

    for module in (jobs, collections, memories, documents, artifacts):
        api.register_blueprint(module.blp)

    @app.url_value_preprocessor
    def _reject_unstorable_ids(_endpoint: str | None, values: dict[str, Any] | None) -> None:
        # No stored id holds a NUL (PostgreSQL text cannot), so such a path names
        # nothing: 404, rather than a query the database would refuse.
        if values and any(isinstance(v, str) and not is_storable_text(v) for v in values.values()):
            abort(404, message="No such resource.")

    @app.before_request
    def _refuse_oversized_body() -> None:
        # Up front, for every endpoint: one that never reads its body (cancel)
        # would otherwise accept any amount of it.
        limit = app.config["MAX_CONTENT_LENGTH"]
        if limit is not None and (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()

    @app.before_request
    def _open_session() -> None:
        g.db = new_session()

    @app.teardown_request
    def _close_session(_exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    # Only errors that mean "cannot reach or use the database now" are 503; any
    # other database error is a bug to see as a 500, not an outage to retry.
    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(PoolTimeoutError)
    def _database_unavailable(exc: Exception) -> Any:
        # The database is down or restarting: say so, and let the client retry.
        log.warning("database unavailable: %s", type(exc).__name__)
        body = _error_body(
            503, "Service Unavailable", "The database is unavailable; try again shortly."
        )
        return jsonify(body), 503, {"Retry-After": "5"}

    @app.errorhandler(RecursionError)
    def _too_deeply_nested(_exc: RecursionError) -> Any:
        # Only hostile input nests deeply enough to exhaust the JSON parser's stack.
        log.warning("request nested too deeply")
        body = _error_body(400, "Bad Request", "The request body is nested too deeply.")
        return jsonify(body), 400

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        payload, code, headers = api.handle_http_exception(exc)
        # Every error body says in words what went wrong, also those raised by
        # werkzeug and webargs rather than by our own abort() (400, 405, 413, 422).
        if "message" not in payload:
            if code == 413:
                limit = app.config["MAX_CONTENT_LENGTH"]
                payload["message"] = f"The request body is larger than {limit} bytes."
            elif code == 422:
                payload["message"] = "The request is not valid; see errors."
            else:
                payload["message"] = exc.description or exc.name
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers = {**headers, "Allow": ", ".join(exc.valid_methods)}
        return payload, code, headers

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return _http_error(exc)
        log.exception("unhandled error")
        return jsonify(_error_body(500, "Internal Server Error", "Internal error.")), 500

    @app.get("/healthz")
    def _health() -> Any:
        return {"status": "ok"}

    return app
