"""The error responses every API operation can give, added to the OpenAPI document.

Each view documents what is particular to it (409 on a conflict, 410 on an
expired artifact). What follows from the service's shape is added here, once,
so a new endpoint is documented correctly without repeating it: every ``/v1``
operation authenticates (401), can fail (500) and reads the database (503 while
it is down);
one with a path parameter can name nothing (404); one with a body can send bad
JSON (400) or too much of it (413). Every error response carries the error
body, and the headers a client needs to react (``WWW-Authenticate``,
``Retry-After``).
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec, BasePlugin
from flask_smorest.error_handler import ErrorSchema

_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer", "minimum": 0},
}

_RESPONSES: dict[str, dict[str, Any]] = {
    "BadRequestBody": {"description": "The body is not valid JSON."},
    "Unauthorized": {
        "description": "No API key, or one that is not valid (or revoked).",
        "headers": {
            "WWW-Authenticate": {
                "description": "The Bearer challenge.",
                "schema": {"type": "string"},
            }
        },
    },
    "NotFound": {"description": "No such resource in this account."},
    "TooLarge": {"description": "The body is larger than the service accepts."},
    "TooManyActiveJobs": {
        "description": "Over the account's active-job quota.",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
    "InternalError": {"description": "A fault of the service; the body never holds details."},
    "DatabaseUnavailable": {
        "description": "The database is unreachable; try again shortly.",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
}


class CommonResponses(BasePlugin):
    """An apispec plugin; pass it to ``Api`` in ``spec_kwargs["extra_plugins"]``."""

    def __init__(self, prefix: str = "/v1") -> None:
        self.prefix = prefix
        self.error_content: dict[str, Any] = {}

    def init_spec(self, spec: APISpec) -> None:
        super().init_spec(spec)
        for name, response in _RESPONSES.items():
            body = {"content": {"application/json": {"schema": ErrorSchema}}}
            spec.components.response(name, {**response, **body})
        # The marshmallow plugin has resolved the schema to its reference by now.
        self.error_content = spec.components.responses["Unauthorized"]["content"]

    def operation_helper(
        self, path: str | None = None, operations: dict[str, Any] | None = None, **_: Any
    ) -> None:
        if not path or not operations or not path.startswith(self.prefix):
            return
        for operation in operations.values():
            responses: dict[Any, Any] = operation.setdefault("responses", {})
            # The codes are listed one by one instead of flask-smorest's catch-all
            # "default", so a client (and schemathesis) can tell an undocumented one.
            responses.pop("default", None)
            common = {401: "Unauthorized", 500: "InternalError", 503: "DatabaseUnavailable"}
            if "{" in path:
                common[404] = "NotFound"
            if "requestBody" in operation:
                common[400] = "BadRequestBody"
                common[413] = "TooLarge"
            for code, name in common.items():
                if code not in responses and str(code) not in responses:
                    responses[code] = name
            for code, response in list(responses.items()):
                if not str(code).isdigit() or int(code) < 400 or not isinstance(response, dict):
                    continue
                if int(code) == 429:
                    # The quota's answer always says when to come back.
                    responses[code] = "TooManyActiveJobs"
                elif "content" not in response:
                    # A view's own error (409, 410...) has the same body as every error.
                    response["content"] = self.error_content
