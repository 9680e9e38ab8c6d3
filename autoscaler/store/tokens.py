"""Credentials: control tokens (``ik_sdk_…``) and per-workload data keys (``ik_live_…``).

A secret is shown once, when it is made; only its SHA-256 is stored. Verification looks
the hash up and compares it in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.store.models import Token


class TokenKind(StrEnum):
    ADMIN = "admin"  # control token for every project
    SDK = "sdk"  # control token for one project
    LIVE = "live"  # data key for one workload


SECRET_PREFIX = {TokenKind.ADMIN: "ik_sdk_", TokenKind.SDK: "ik_sdk_", TokenKind.LIVE: "ik_live_"}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(kind: TokenKind) -> str:
    return SECRET_PREFIX[kind] + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just made: the row and the secret, which is never available again."""

    token: Token
    secret: str


async def issue_token(
    session: AsyncSession,
    *,
    kind: TokenKind,
    now: datetime,
    project: str | None = None,
    workload_slug: str | None = None,
    name: str = "",
    secret: str | None = None,
) -> IssuedToken:
    """Make and store a token; ``secret`` adopts a given one (an admin token from the env)."""
    if kind is not TokenKind.ADMIN and project is None:
        raise ValueError(f"a {kind.value} token belongs to a project")
    if (kind is TokenKind.LIVE) != (workload_slug is not None):
        raise ValueError("data keys, and only data keys, belong to a workload")
    secret = secret or new_secret(kind)
    token = Token(
        id="tok_" + secrets.token_hex(8),
        kind=kind.value,
        secret_hash=hash_secret(secret),
        prefix=secret[: len(SECRET_PREFIX[kind]) + 4],
        project=project,
        workload_slug=workload_slug,
        name=name,
        created_at=now,
        revoked_at=None,
    )
    session.add(token)
    await session.flush()
    return IssuedToken(token=token, secret=secret)


async def verify_secret(session: AsyncSession, secret: str) -> Token | None:
    """The live (unrevoked) token whose secret this is, or None."""
    digest = hash_secret(secret)
    token = await session.scalar(select(Token).where(Token.secret_hash == digest))
    if token is None or token.revoked_at is not None:
        return None
    return token if hmac.compare_digest(token.secret_hash, digest) else None


async def list_tokens(
    session: AsyncSession, *, project: str, workload_slug: str | None = None
) -> list[Token]:
    query = select(Token).where(Token.project == project).order_by(Token.created_at, Token.id)
    if workload_slug is not None:
        query = query.where(Token.workload_slug == workload_slug)
    return list(await session.scalars(query))


async def revoke_token(
    session: AsyncSession, *, token_id: str, project: str, now: datetime
) -> Token | None:
    token = await session.scalar(
        select(Token).where(Token.id == token_id, Token.project == project)
    )
    if token is not None and token.revoked_at is None:
        token.revoked_at = now
    return token


async def has_admin_token(session: AsyncSession) -> bool:
    found = await session.scalar(
        select(Token.id).where(Token.kind == TokenKind.ADMIN.value, Token.revoked_at.is_(None))
    )
    return found is not None
