"""The management API: workloads by slug, their data keys, project tokens.

Every route needs a control token (``ik_sdk_…``): an admin token for any project, or a
project token for its own. A data key (``ik_live_…``) is for the gateway only and gets
401 here. Handlers are thin: validation is the spec's, state changes are the store's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

import autoscaler
from autoscaler.admission import runnable_problems, secret_problems, worker_problems
from autoscaler.api import contract
from autoscaler.api.boot import router as boot_router
from autoscaler.api.deps import ApiState, Caller, Project, Session, Slug, State
from autoscaler.api.errors import ApiError, handle_api_error
from autoscaler.api.secrets import router as secrets_router
from autoscaler.api.views import (
    FAILURE_KINDS,
    DataKeyCreate,
    TokenCreate,
    decision_view,
    instance_view,
    signals_view,
    token_view,
    workload_status,
    workload_view,
)
from autoscaler.api.workers import router as workers_router
from autoscaler.labels import SELECTOR_PATTERN, LabelError, Selector
from autoscaler.spec import (
    APPLY,
    OnDrift,
    WorkloadSpec,
    deprecations,
    describe_errors,
    limit_errors,
    merge_patch,
)
from autoscaler.store import records, tokens, workloads
from autoscaler.store import secrets as secrets_store
from autoscaler.store import workers as workers_store
from autoscaler.store.models import Workload, WorkloadSignals
from autoscaler.store.tokens import TokenKind

router = APIRouter()


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(
        title="GPU autoscaler management API",
        version=autoscaler.__version__,
        description="Declare GPU serving workloads; manage their data keys.",
    )
    app.state.api = state
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.include_router(router)
    app.include_router(workers_router)
    app.include_router(secrets_router)
    app.include_router(boot_router)
    contract.install(app)
    return app


@router.get("/healthz", tags=["meta"])
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": autoscaler.__version__}


@router.put("/v1/projects/{project}/workloads/{slug}", tags=["workloads"])
async def ensure(
    project: Project,
    slug: Slug,
    request: Request,
    s: Session,
    state: State,
    on_drift: Annotated[OnDrift, Query()] = OnDrift.RECONCILE,
) -> JSONResponse:
    raw = await _json_object(request)
    raw.setdefault("slug", slug)
    if raw["slug"] != slug:
        raise ApiError(
            409,
            "slug_mismatch",
            f"the body's slug {raw['slug']!r} is not the path's {slug!r}",
            details=[{"path": "slug", "message": "must equal the path", "value": raw["slug"]}],
        )
    return await _store(s, state, project=project, raw=raw, on_drift=on_drift)


MERGE_PATCH = "application/merge-patch+json"


@router.patch("/v1/projects/{project}/workloads/{slug}", tags=["workloads"])
async def patch(
    project: Project,
    slug: Slug,
    request: Request,
    s: Session,
    state: State,
    on_drift: Annotated[OnDrift, Query()] = OnDrift.RECONCILE,
) -> JSONResponse:
    """Change part of a workload: a JSON merge patch (RFC 7396) on its stored spec, then
    the same validation and reconcile as a PUT of the whole spec."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (MERGE_PATCH, "application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"PATCH takes a JSON merge patch ({MERGE_PATCH}), not {media or 'no content type'!r}",
        )
    changes = await _json_object(request)
    known = WorkloadSpec.known_keys()
    unknown = {k: v for k, v in changes.items() if k not in known}
    if unknown:
        # A null on a key the spec does not have would merge to nothing and answer
        # "unchanged"; it is refused like the same key in a PUT, naming what is allowed.
        _validate_spec(unknown, max_replicas=state.max_replicas)
    row = await _existing(s, project, slug)
    raw = merge_patch(row.spec, changes)
    if raw.get("slug", slug) != slug:
        raise ApiError(
            409,
            "slug_mismatch",
            f"a patch cannot change the slug ({slug!r} -> {raw['slug']!r})",
            details=[{"path": "slug", "message": "cannot change", "value": raw["slug"]}],
        )
    raw["slug"] = slug
    return await _store(s, state, project=project, raw=raw, on_drift=on_drift)


async def _store(
    s: AsyncSession, state: ApiState, *, project: str, raw: dict[str, Any], on_drift: OnDrift
) -> JSONResponse:
    """Validate, admit and ensure one spec; the answer of PUT and PATCH."""
    slug = raw["slug"]
    spec = _validate_spec(raw, max_replicas=state.max_replicas)
    await _admit(s, project=project, spec=spec)
    try:
        result = await workloads.ensure_workload(
            s, project=project, spec=spec, on_drift=on_drift, now=state.now()
        )
    except workloads.DriftRefused as exc:
        raise ApiError(
            409,
            "drift_refused",
            f"{project}/{slug} differs from the stored spec and on_drift is 'fail'",
            details=exc.diff,
        ) from None
    body = {
        "action": result.action.value,
        "project": project,
        "workload": workload_view(result.workload),
        "generation": result.workload.generation,
        "diff": result.diff,
        "warnings": deprecations(raw),
    }
    if result.action in (workloads.EnsureAction.CREATED, workloads.EnsureAction.UPDATED):
        state.on_change()  # the same spec again (or drift ignored) wakes nothing
    status = 201 if result.action is workloads.EnsureAction.CREATED else 200
    return JSONResponse(body, status_code=status)


@router.get("/v1/projects/{project}/workloads", tags=["workloads"])
async def list_(
    project: Project,
    s: Session,
    state: State,
    label_selector: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="Only workloads whose labels match: `team=search,tier!=batch,gpu,!"
            "legacy` (all must hold).",
            json_schema_extra={"pattern": SELECTOR_PATTERN},
        ),
    ] = None,
) -> dict[str, Any]:
    try:
        selector = Selector.parse(label_selector or "")
    except LabelError as exc:
        detail = {"path": "label_selector", "message": str(exc), "value": label_selector}
        raise ApiError(422, "invalid_selector", str(exc), details=[detail]) from None
    rows = await workloads.list_workloads(s, project=project)
    chosen = [w for w in rows if selector.matches(w.spec.get("labels") or {})]
    return {"items": [await _with_status(s, w, state) for w in chosen]}


@router.get("/v1/projects/{project}/workloads/{slug}", tags=["workloads"])
async def get(project: Project, slug: Slug, s: Session, state: State) -> dict[str, Any]:
    return await _with_status(s, await _existing(s, project, slug), state)


async def _with_status(s: AsyncSession, row: Workload, state: ApiState) -> dict[str, Any]:
    instances = await records.instances_of(s, row.id)
    latest = await records.latest_decisions(s, row.id, kinds=("scale", "launch", *FAILURE_KINDS))
    status = workload_status(row, instances=instances, latest=latest, gateway_url=state.gateway_url)
    return {**workload_view(row), "status": status}


@router.get("/v1/projects/{project}/workloads/{slug}/replicas", tags=["workloads"])
async def replicas(project: Project, slug: Slug, s: Session, state: State) -> dict[str, Any]:
    row = await _existing(s, project, slug)
    now = state.now()
    deleted = row.deleted_at is not None
    return {
        "items": [
            instance_view(i, now, workload_deleted=deleted)
            for i in await records.instances_of(s, row.id)
        ]
    }


@router.get("/v1/projects/{project}/workloads/{slug}/signals", tags=["workloads"])
async def signals(project: Project, slug: Slug, s: Session) -> dict[str, Any]:
    """What the gateway and the engines last measured (the controller stores it on each
    engine scrape): TTFT percentiles of both, the engines' waiting and running requests
    and KV-cache use."""
    row = await _existing(s, project, slug)
    return signals_view(await s.get(WorkloadSignals, row.id))


@router.get("/v1/projects/{project}/workloads/{slug}/decisions", tags=["workloads"])
async def decisions(
    project: Project,
    slug: Slug,
    s: Session,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    row = await _existing(s, project, slug)
    found = await records.recent_decisions(s, row.id, limit=limit)
    return {"items": [decision_view(d) for d in found]}


@router.delete("/v1/projects/{project}/workloads/{slug}", tags=["workloads"])
async def delete(project: Project, slug: Slug, s: Session, state: State) -> dict[str, Any]:
    now = state.now()
    row = await workloads.delete_workload(s, project=project, slug=slug, now=now)
    if row is None:
        raise _not_found(project, slug)
    for key in await tokens.list_tokens(s, project=project, workload_slug=slug):
        await tokens.revoke_token(s, token_id=key.id, project=project, now=now)
    state.on_change()
    return {"deleted": True, "workload": workload_view(row)}


@router.post("/v1/projects/{project}/workloads/{slug}/keys", status_code=201, tags=["keys"])
async def create_key(
    project: Project, slug: Slug, s: Session, state: State, body: DataKeyCreate | None = None
) -> dict[str, Any]:
    await _existing(s, project, slug)
    issued = await tokens.issue_token(
        s,
        kind=TokenKind.LIVE,
        project=project,
        workload_slug=slug,
        name=body.name if body else "",
        now=state.now(),
    )
    state.on_change()
    return {**token_view(issued.token), "secret": issued.secret}


@router.get("/v1/projects/{project}/workloads/{slug}/keys", tags=["keys"])
async def list_keys(project: Project, slug: Slug, s: Session) -> dict[str, Any]:
    await _existing(s, project, slug)
    found = await tokens.list_tokens(s, project=project, workload_slug=slug)
    return {"items": [token_view(t) for t in found]}


@router.delete("/v1/projects/{project}/workloads/{slug}/keys/{key_id}", tags=["keys"])
async def revoke_key(
    project: Project, slug: Slug, key_id: str, s: Session, state: State
) -> dict[str, Any]:
    key = await tokens.revoke_token(s, token_id=key_id, project=project, now=state.now())
    if key is None or key.workload_slug != slug:
        raise ApiError(404, "key_not_found", f"no key {key_id!r} on {project}/{slug}")
    state.on_change()
    return token_view(key)


@router.post("/v1/projects/{project}/tokens", status_code=201, tags=["tokens"])
async def create_project_token(
    project: Slug,
    s: Session,
    state: State,
    token: Caller,
    body: TokenCreate | None = None,
) -> dict[str, Any]:
    if token.kind != TokenKind.ADMIN.value:
        raise ApiError(403, "forbidden", "only an admin token makes project tokens")
    await workloads.ensure_project(s, project=project, now=state.now())
    issued = await tokens.issue_token(
        s, kind=TokenKind.SDK, project=project, name=body.name if body else "", now=state.now()
    )
    return {**token_view(issued.token), "secret": issued.secret}


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise ApiError(400, "invalid_json", "the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object (a workload spec)")
    return body


def _validate_spec(raw: dict[str, Any], *, max_replicas: int) -> WorkloadSpec:
    try:
        spec = WorkloadSpec.model_validate(raw, context={APPLY: True})
    except ValidationError as exc:
        raise _invalid_spec(describe_errors(exc)) from None
    over = limit_errors(spec, max_replicas=max_replicas)
    if over:
        raise _invalid_spec(over)
    return spec


def _invalid_spec(details: list[dict[str, Any]]) -> ApiError:
    first = details[0]
    return ApiError(
        422,
        "invalid_spec",
        f"{first['path']}: {first['message']}"
        + (f" (and {len(details) - 1} more)" if len(details) > 1 else ""),
        details=details,
    )


async def _admit(s: AsyncSession, *, project: str, spec: WorkloadSpec) -> None:
    """Refuse a spec the controller could not run (422, nothing stored)."""
    registered = await workers_store.registered_ids(s, project=project)
    problems = runnable_problems(spec) + worker_problems(spec, registered=registered)
    problems += secret_problems(spec, stored=await secrets_store.secret_names(s, project=project))
    if problems:
        details = [p.as_detail() for p in problems]
        raise ApiError(
            422,
            "invalid_spec",
            f"{problems[0].path}: {problems[0].message}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            details=details,
        )


async def _existing(s: AsyncSession, project: str, slug: str) -> Any:
    row = await workloads.get_workload(s, project=project, slug=slug)
    if row is None:
        raise _not_found(project, slug)
    return row


def _not_found(project: str, slug: str) -> ApiError:
    return ApiError(404, "workload_not_found", f"no workload {slug!r} in project {project!r}")


async def _request_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"], "value": None}
        for e in exc.errors()
    ]
    return JSONResponse(
        {"error": {"code": "invalid_request", "message": "invalid request", "details": details}},
        status_code=422,
    )
