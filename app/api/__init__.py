"""The REST API, one blueprint per resource."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import g
from flask_smorest import abort

Row = TypeVar("Row")


def get_owned(model: type[Row], object_id: str, label: str) -> Row:
    """The caller's row of ``model`` with this id: 404 (never 403) for another
    account's, so ids of other accounts cannot be probed."""
    row: Any = g.db.get(model, object_id)
    if row is None or row.account_id != g.account_id:
        abort(404, message=f"No {label} {object_id}.")
    return row
