"""Data keys: ``Authorization: Bearer ik_live_…`` for one workload of one project.

A keyless or unknown-key caller learns nothing about which workloads exist: it gets 401
whatever the path. A valid key of the same project asking for a workload that does not
exist gets 404; a key of another workload or project gets 401.
"""

from __future__ import annotations

import hashlib

from gateway.errors import GatewayError
from gateway.routes import RouteTable, WorkloadRoute

BEARER = "bearer "


def bearer_secret(header: str | None) -> str | None:
    if header is None or header[: len(BEARER)].lower() != BEARER:
        return None
    secret = header[len(BEARER) :].strip()
    return secret or None


def digest(secret: str) -> str:
    """The SHA-256 hex digest the store keeps for a secret.

    A header with bytes that are not UTF-8 reaches here with surrogates in it: hashed as
    they are, it matches no key (keys are ASCII) and the caller gets a 401.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def authorize(
    table: RouteTable, *, authorization: str | None, project: str, slug: str
) -> WorkloadRoute:
    """The workload this caller may use, or the GatewayError to answer with."""
    secret = bearer_secret(authorization)
    if secret is None:
        raise GatewayError(
            401,
            "missing data key: send 'Authorization: Bearer ik_live_…' "
            "(a key of this workload, made with 'autoscaler keys create')",
            code="missing_api_key",
        )
    key = table.data_keys.get(digest(secret))
    if key is None or key.project != project:
        raise GatewayError(401, "invalid data key", code="invalid_api_key")
    route = table.workloads.get((project, slug))
    if route is None:
        raise GatewayError(
            404,
            f"no workload {slug!r} in project {project!r}",
            code="workload_not_found",
        )
    if key.workload_slug != slug:
        raise GatewayError(
            401,
            f"this data key belongs to another workload, not {slug!r}",
            code="invalid_api_key",
        )
    return route


def is_admin(table: RouteTable, authorization: str | None) -> bool:
    secret = bearer_secret(authorization)
    return secret is not None and digest(secret) in table.admin_hashes
