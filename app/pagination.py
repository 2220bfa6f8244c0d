"""Keyset (cursor) pagination, newest first, over ``(created_at, id)``."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from flask_smorest import abort
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(row_id, str) or "\x00" in row_id:
            # A forged cursor; PostgreSQL would refuse the NUL in the comparison.
            raise ValueError("invalid cursor id")
        return datetime.fromisoformat(created), row_id
    except (ValueError, TypeError):
        abort(422, message="Invalid cursor.", errors={"query": {"after": ["Invalid cursor."]}})
        raise  # unreachable: abort raises


def paginate(
    session: Session, stmt: Select[Any], model: Any, limit: int, after: str | None
) -> dict[str, Any]:
    """One page of ``stmt`` (a select of ``model``) as ``{data, has_more, next_cursor}``.

    Reads ``limit + 1`` rows through the (created_at, id) index: no OFFSET and
    no COUNT, so a page costs the same on the millionth row as on the first.
    """
    if after:
        created_at, row_id = decode_cursor(after)
        # The redundant `created_at <= cursor` is what the index can seek to; the OR
        # alone is only a filter, and the scan would walk every newer row first.
        stmt = stmt.where(
            model.created_at <= created_at,
            or_(
                model.created_at < created_at,
                and_(model.created_at == created_at, model.id < row_id),
            ),
        )
    rows = list(
        session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return {"data": rows, "has_more": has_more, "next_cursor": next_cursor}
