"""Dependencies every management route shares: state, a session per request, the caller.

A session commits before the response is sent (dependency scope ``function``), so a
client that reads right after a write sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api.errors import ApiError
from autoscaler.spec import DEFAULT_MAX_REPLICAS
from autoscaler.store import tokens
from autoscaler.store.models import Token
from autoscaler.store.tokens import TokenKind

Slug = Annotated[str, Path(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]


@dataclass(frozen=True, slots=True)
class ApiState:
    sessions: async_sessionmaker[AsyncSession]
    now: Callable[[], datetime]
    on_change: Callable[[], None] = lambda: None  # tells in-process loops to look now
    gateway_url: str | None = None  # where callers reach the gateway, for endpoint URLs
    max_replicas: int = DEFAULT_MAX_REPLICAS  # per workload: replicas, max_workers


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


State = Annotated[ApiState, Depends(_state)]


async def _session(state: State) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as s, s.begin():
        yield s


# scope="function": commit before the response is sent, so a client that reads right
# after a write sees it.
Session = Annotated[AsyncSession, Depends(_session, scope="function")]


async def _caller(s: Session, authorization: Annotated[str | None, Header()] = None) -> Token:
    return await _authenticate(s, authorization)


Caller = Annotated[Token, Depends(_caller)]


def _project_access(project: Slug, token: Caller) -> str:
    if token.kind == TokenKind.ADMIN.value or token.project == project:
        return project
    raise ApiError(403, "forbidden", f"this token is not allowed on project {project!r}")


Project = Annotated[str, Depends(_project_access)]


async def _authenticate(s: AsyncSession, authorization: str | None) -> Token:
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "unauthorized", "missing bearer token (ik_sdk_…)", headers=unauthorized)
    secret = authorization[7:].strip()
    token = await tokens.verify_secret(s, secret)
    if token is None:
        raise ApiError(401, "unauthorized", "unknown or revoked token", headers=unauthorized)
    if token.kind == TokenKind.LIVE.value:
        raise ApiError(
            401,
            "unauthorized",
            "a data key (ik_live_…) is for the gateway; the management API takes ik_sdk_ tokens",
            headers=unauthorized,
        )
    return token
