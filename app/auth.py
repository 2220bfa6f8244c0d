"""API keys: creation (shown once), hashing, and the Bearer check of every request."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import g, request
from flask_smorest import abort
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Account, ApiKey, new_id, utcnow

KEY_PREFIX = "hbx_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_account(session: Session, name: str) -> tuple[Account, str]:
    """Create an account with one API key; returns the key itself, never stored."""
    account = Account(id=new_id("acc"), name=name)
    session.add(account)
    session.flush()
    return account, create_key(session, account.id)


def create_key(session: Session, account_id: str) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"),
            account_id=account_id,
            key_hash=hash_key(key),
            prefix=key[: len(KEY_PREFIX) + 6],
        )
    )
    return key


def revoke_key(session: Session, key: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def account_for_key(session: Session, key: str) -> str | None:
    """The account of a live key, or None. The lookup is by hash, and the stored
    hash is compared again in constant time."""
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey.account_id, ApiKey.key_hash, ApiKey.revoked_at).where(
            ApiKey.key_hash == digest
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return row.account_id if hmac.compare_digest(row.key_hash, digest) else None


def _unauthorized(message: str) -> None:
    abort(401, message=message, headers={"WWW-Authenticate": 'Bearer realm="hebbrix"'})


def authenticate() -> None:
    """before_request hook of the API blueprints: sets ``g.account_id``."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    account_id = account_for_key(g.db, key.strip())
    if account_id is None:
        _unauthorized("The API key is not valid.")
    g.account_id = account_id
