"""The OpenAI Files and Batches API on a workload's address, kept in the store.

``POST …/v1/files`` (multipart, ``purpose=batch``) keeps a JSONL of requests, checked
line by line on upload; ``POST …/v1/batches`` turns each line into a job of the
workload (``jobs.batch_id``), so batch lines run through the same queue, claims and
restarts as async jobs, on several gateways at once (``gateway.jobs``). A batch is
finalized (its output and error files written, its counts kept) by whichever gateway
finishes its last line, or by the sweep every gateway runs (``sweep``), which also
expires the lines still queued when a batch's completion window closes.

A file or batch belongs to the workload whose data key made it: another workload's
key gets 404 for it, as it would for a job.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import undefer

from autoscaler.store.models import Batch, Job, StoredFile
from gateway import batch_format as fmt
from gateway.errors import GatewayError
from gateway.jobs import (
    CANCELLED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    close_lines_of_closed_batches,
    queued_job,
)
from gateway.routes import WorkloadRef

FILE_PURPOSES = ("batch",)
#: Line statuses counted as ``failed`` in a batch's ``request_counts``: as OpenAI's do,
#: lines cancelled or expired count there, so completed + failed reach the total.
UNANSWERED = (FAILED, CANCELLED, EXPIRED)
LIST_LIMIT_MAX = 100


def _unix(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


def file_view(f: StoredFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.size,
        "created_at": _unix(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def facts_of(batch: Batch) -> fmt.BatchFacts:
    return fmt.BatchFacts(
        in_progress_at=batch.in_progress_at,
        cancelling_at=batch.cancelling_at,
        finalizing_at=batch.finalizing_at,
        completed_at=batch.completed_at,
        expired_at=batch.expired_at,
        cancelled_at=batch.cancelled_at,
        failed_at=batch.failed_at,
    )


async def batch_view(s: AsyncSession, batch: Batch) -> dict[str, Any]:
    if batch.completed is not None and batch.failed is not None:
        completed, failed = batch.completed, batch.failed
    else:
        counts = await _line_counts(s, batch.id)
        completed = counts.get(SUCCEEDED, 0)
        failed = sum(counts.get(status, 0) for status in UNANSWERED)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": fmt.batch_status(facts_of(batch)),
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _unix(batch.created_at),
        "in_progress_at": _unix(batch.in_progress_at),
        "expires_at": _unix(batch.expires_at),
        "finalizing_at": _unix(batch.finalizing_at),
        "completed_at": _unix(batch.completed_at),
        "failed_at": _unix(batch.failed_at),
        "expired_at": _unix(batch.expired_at),
        "cancelling_at": _unix(batch.cancelling_at),
        "cancelled_at": _unix(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": completed, "failed": failed},
        "metadata": batch.user_metadata,
    }


async def _line_counts(s: AsyncSession, batch_id: str) -> dict[str, int]:
    rows = await s.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    )
    return {status: int(n) for status, n in rows}


# -- files ---------------------------------------------------------------------------


async def create_file(
    s: AsyncSession,
    *,
    ref: WorkloadRef,
    purpose: str,
    filename: str,
    content: bytes,
    now: datetime,
) -> StoredFile:
    if purpose not in FILE_PURPOSES:
        raise GatewayError(
            400,
            f"purpose {purpose!r} is not one of {list(FILE_PURPOSES)}: files here are batch inputs",
            param="purpose",
        )
    try:
        fmt.parse_input(content)
    except fmt.BatchFormatError as exc:
        raise GatewayError(
            400, f"{filename}: {exc.message}", code="invalid_batch_input", param=exc.param
        ) from None
    return _add_file(s, ref=ref, purpose=purpose, filename=filename, content=content, now=now)


def _add_file(
    s: AsyncSession,
    *,
    ref: WorkloadRef,
    purpose: str,
    filename: str,
    content: bytes,
    now: datetime,
) -> StoredFile:
    stored = StoredFile(
        id="file-" + secrets.token_hex(12),
        project=ref[0],
        workload_slug=ref[1],
        purpose=purpose,
        filename=filename[:255],
        size=len(content),
        content=content,
        created_at=now,
    )
    s.add(stored)
    return stored


async def get_file(
    s: AsyncSession, *, ref: WorkloadRef, file_id: str, content: bool = False
) -> StoredFile:
    """The file; its ``content`` (deferred) is loaded only if ``content``."""
    options = [undefer(StoredFile.content)] if content else []
    stored = await s.get(StoredFile, file_id, options=options)
    if stored is None or (stored.project, stored.workload_slug) != ref:
        raise GatewayError(404, f"no file {file_id!r} in this workload", code="file_not_found")
    return stored


async def list_files(
    s: AsyncSession, *, ref: WorkloadRef, purpose: str | None, page: Page
) -> dict[str, Any]:
    query = select(StoredFile).where(
        StoredFile.project == ref[0], StoredFile.workload_slug == ref[1]
    )
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if page.after is not None:
        after = await get_file(s, ref=ref, file_id=page.after)
        query = query.where(_before(StoredFile, after.created_at, after.id))
    rows = list(
        await s.scalars(
            query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(page.limit + 1)
        )
    )
    return _list([file_view(f) for f in rows[: page.limit]], has_more=len(rows) > page.limit)


def _before(table: type[StoredFile] | type[Batch], at: datetime, ident: str) -> Any:
    """Rows listed after (older than) the one made at ``at`` with id ``ident``."""
    return or_(table.created_at < at, and_(table.created_at == at, table.id < ident))


def _list(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@dataclass(frozen=True, slots=True)
class Page:
    after: str | None
    limit: int


def parse_page(query: Mapping[str, str]) -> Page:
    raw = query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise GatewayError(
            400, f"limit {raw!r} is not a whole number from 1 to {LIST_LIMIT_MAX}", param="limit"
        )
    return Page(after=query.get("after") or None, limit=limit)


# -- batches -------------------------------------------------------------------------


async def create_batch(
    s: AsyncSession, *, ref: WorkloadRef, request: fmt.BatchRequest, now: datetime
) -> Batch:
    """Store the batch and queue one job per line of its input file."""
    source = await get_file(s, ref=ref, file_id=request.input_file_id, content=True)
    if source.purpose != "batch":
        raise GatewayError(
            400,
            f"file {source.id!r} has purpose {source.purpose!r}, not 'batch'",
            param="input_file_id",
        )
    try:
        lines = fmt.parse_input(source.content)
        fmt.check_endpoint(lines, request.endpoint)
    except fmt.BatchFormatError as exc:
        raise GatewayError(
            400, f"{source.filename}: {exc.message}", code="invalid_batch_input", param=exc.param
        ) from None
    batch = Batch(
        id="batch_" + secrets.token_hex(12),
        project=ref[0],
        workload_slug=ref[1],
        endpoint=request.endpoint,
        input_file_id=source.id,
        completion_window=request.completion_window,
        user_metadata=request.metadata,
        total=len(lines),
        completed=None,
        failed=None,
        output_file_id=None,
        error_file_id=None,
        created_at=now,
        # Checked above, whole, before the batch exists: it never waits in "validating".
        in_progress_at=now,
        expires_at=now + timedelta(seconds=request.window_sec),
        cancelling_at=None,
        finalizing_at=None,
        completed_at=None,
        expired_at=None,
        cancelled_at=None,
        failed_at=None,
    )
    s.add(batch)
    route = fmt.ENDPOINTS[request.endpoint]
    s.add_all(
        queued_job(
            ref,
            route=route,
            body=line.body,
            now=now,
            batch_id=batch.id,
            custom_id=line.custom_id,
            batch_line=line.line,
        )
        for line in lines
    )
    await s.flush()
    return batch


async def get_batch(s: AsyncSession, *, ref: WorkloadRef, batch_id: str) -> Batch:
    batch = await s.get(Batch, batch_id)
    if batch is None or (batch.project, batch.workload_slug) != ref:
        raise GatewayError(404, f"no batch {batch_id!r} in this workload", code="batch_not_found")
    return batch


async def list_batches(s: AsyncSession, *, ref: WorkloadRef, page: Page) -> dict[str, Any]:
    query = select(Batch).where(Batch.project == ref[0], Batch.workload_slug == ref[1])
    if page.after is not None:
        after = await get_batch(s, ref=ref, batch_id=page.after)
        query = query.where(_before(Batch, after.created_at, after.id))
    rows = list(
        await s.scalars(
            query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(page.limit + 1)
        )
    )
    data = [await batch_view(s, b) for b in rows[: page.limit]]
    return _list(data, has_more=len(rows) > page.limit)


async def cancel_batch(s: AsyncSession, *, batch: Batch, now: datetime) -> None:
    """Mark the batch cancelling and its queued lines cancelled; lines already running
    finish, and the batch is finalized (cancelled) after the last of them."""
    status = fmt.batch_status(facts_of(batch))
    if status not in ("validating", "in_progress", "cancelling"):
        raise GatewayError(
            409,
            f"batch {batch.id!r} is {status}: only a batch in progress can be cancelled",
            code="batch_not_cancellable",
        )
    if batch.cancelling_at is None:
        batch.cancelling_at = now
    await s.execute(
        update(Job)
        .where(Job.batch_id == batch.id, Job.status == QUEUED)
        .values(status=CANCELLED, finished_at=now)
    )


async def finalize_if_done(
    sessions: async_sessionmaker[AsyncSession], *, batch_id: str, now: datetime
) -> bool:
    """Write the batch's output and error files once no line is queued or running.

    Safe on several gateways at once: the conditional update of ``finalizing_at`` lets
    one of them write, in the same transaction as the files. Returns whether it did."""
    async with sessions() as s, s.begin():
        # EXISTS, not a count: run after every line, it stops at the first open one.
        open_line = await s.scalar(
            select(
                select(Job.id)
                .where(Job.batch_id == batch_id, Job.status.in_((QUEUED, RUNNING)))
                .exists()
            )
        )
        if open_line:
            return False
        taken = await s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.finalizing_at.is_(None))
            .values(finalizing_at=now)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return False
        batch = await s.get(Batch, batch_id)
        assert batch is not None
        await _write_results(s, batch=batch, now=now)
    return True


async def _write_results(s: AsyncSession, *, batch: Batch, now: datetime) -> None:
    jobs = await s.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_line))
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    completed = failed = 0
    for job in jobs:
        line = result_line(job)
        status_code = line["response"]["status_code"] if line["response"] else None
        if job.status == SUCCEEDED and status_code is not None and status_code < 400:
            output.append(line)
            completed += 1
        else:
            errors.append(line)
            failed += 1
    ref = (batch.project, batch.workload_slug)
    stem = batch.id
    if output:
        out = _add_file(
            s, ref=ref, purpose="batch_output", filename=f"{stem}_output.jsonl",
            content=fmt.jsonl(output), now=now,
        )  # fmt: skip
        batch.output_file_id = out.id
    if errors:
        err = _add_file(
            s, ref=ref, purpose="batch_output", filename=f"{stem}_error.jsonl",
            content=fmt.jsonl(errors), now=now,
        )  # fmt: skip
        batch.error_file_id = err.id
    batch.completed, batch.failed = completed, failed
    if batch.cancelling_at is not None:
        batch.cancelled_at = now
    elif any(line["error"] and line["error"]["code"] == "batch_expired" for line in errors):
        batch.expired_at = now
    else:
        batch.completed_at = now


def result_line(job: Job) -> dict[str, Any]:
    """The job's line in the batch's output or error file."""
    custom_id = job.custom_id or ""
    if job.status == EXPIRED:
        return fmt.unanswered_line(
            job_id=job.id, custom_id=custom_id, code="batch_expired", message=fmt.EXPIRED_MESSAGE
        )
    if job.status == CANCELLED:
        return fmt.unanswered_line(
            job_id=job.id,
            custom_id=custom_id,
            code="batch_cancelled",
            message=fmt.CANCELLED_MESSAGE,
        )
    result = job.result
    if result is None:
        return fmt.unanswered_line(
            job_id=job.id,
            custom_id=custom_id,
            code="server_error",
            message=job.error or "the request failed",
        )
    body: object = result.get("body")
    if "body_base64" in result:
        body = base64.b64decode(result["body_base64"]).decode("utf-8", "replace")
    return fmt.answered_line(
        job_id=job.id, custom_id=custom_id, status_code=int(result["status_code"]), body=body
    )


async def sweep(sessions: async_sessionmaker[AsyncSession], *, now: datetime) -> None:
    """Expire the queued lines of batches past their window, cancel those of cancelled
    batches (lines queued again after the cancel), then finalize every open batch with
    no line left (also those whose last line's gateway died before it could)."""
    async with sessions() as s, s.begin():
        open_batches = list(await s.execute(select(Batch.id).where(Batch.finalizing_at.is_(None))))
        # A cancelled batch's line queued again after the cancel (its replica refused,
        # its gateway stopped or died) is cancelled too.
        await close_lines_of_closed_batches(s, now=now)
    for (batch_id,) in open_batches:
        await finalize_if_done(sessions, batch_id=batch_id, now=now)


# -- HTTP ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    """What a handler made: the answer, and whether jobs were queued."""

    response: web.Response
    queued: bool = False


async def handle(
    request: web.Request,
    *,
    tail: str,
    ref: WorkloadRef,
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
) -> Created:
    """``files…`` and ``batches…`` under a workload's ``/v1``."""
    parts = tail.split("/")
    method = request.method
    if parts[0] == "files":
        return Created(await _files(request, parts=parts, ref=ref, sessions=sessions, now=now))
    if parts == ["batches"] and method == "POST":
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(413, "request body is too large", code="request_too_large") from None
        try:
            parsed = fmt.parse_create(body)
        except fmt.BatchFormatError as exc:
            raise GatewayError(400, exc.message, param=exc.param) from None
        async with sessions() as s, s.begin():
            batch = await create_batch(s, ref=ref, request=parsed, now=now)
            view = await batch_view(s, batch)
        return Created(web.json_response(view), queued=True)
    if parts == ["batches"] and method == "GET":
        page = parse_page(request.query)
        async with sessions() as s:
            return Created(web.json_response(await list_batches(s, ref=ref, page=page)))
    if len(parts) == 2 and method == "GET":
        async with sessions() as s:
            batch = await get_batch(s, ref=ref, batch_id=parts[1])
            return Created(web.json_response(await batch_view(s, batch)))
    if len(parts) == 3 and parts[2] == "cancel" and method == "POST":
        async with sessions() as s, s.begin():
            batch = await get_batch(s, ref=ref, batch_id=parts[1])
            await cancel_batch(s, batch=batch, now=now)
        await finalize_if_done(sessions, batch_id=batch.id, now=now)
        async with sessions() as s:
            batch = await get_batch(s, ref=ref, batch_id=parts[1])
            return Created(web.json_response(await batch_view(s, batch)))
    raise _no_route(method, tail)


def _no_route(method: str, tail: str) -> GatewayError:
    return GatewayError(404, f"no route {method} /v1/{tail}", code="unknown_route")


async def _files(
    request: web.Request,
    *,
    parts: list[str],
    ref: WorkloadRef,
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
) -> web.Response:
    method = request.method
    if parts == ["files"] and method == "POST":
        purpose, filename, content = await _upload(request)
        async with sessions() as s, s.begin():
            stored = await create_file(
                s, ref=ref, purpose=purpose, filename=filename, content=content, now=now
            )
            return web.json_response(file_view(stored))
    if parts == ["files"] and method == "GET":
        page = parse_page(request.query)
        async with sessions() as s:
            listed = await list_files(s, ref=ref, purpose=request.query.get("purpose"), page=page)
            return web.json_response(listed)
    if len(parts) == 2 and method == "GET":
        async with sessions() as s:
            return web.json_response(file_view(await get_file(s, ref=ref, file_id=parts[1])))
    if len(parts) == 2 and method == "DELETE":
        async with sessions() as s, s.begin():
            await s.delete(await get_file(s, ref=ref, file_id=parts[1]))
        return web.json_response({"id": parts[1], "object": "file", "deleted": True})
    if len(parts) == 3 and parts[2] == "content" and method == "GET":
        async with sessions() as s:
            stored = await get_file(s, ref=ref, file_id=parts[1], content=True)
            return web.Response(body=stored.content, content_type="application/jsonl")
    raise _no_route(method, "/".join(parts))


async def _upload(request: web.Request) -> tuple[str, str, bytes]:
    """``purpose`` and ``file`` of a multipart upload."""
    if not request.content_type.startswith("multipart/form-data"):
        raise GatewayError(
            400,
            f"POST /v1/files takes multipart/form-data with 'file' and 'purpose', not "
            f"{request.content_type!r}",
        )
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(
            413, "the file is over the gateway's max_body_bytes", code="request_too_large"
        ) from None
    except ValueError as exc:
        raise GatewayError(400, f"the multipart body could not be read: {exc}") from None
    purpose = form.get("purpose")
    upload = form.get("file")
    if not isinstance(purpose, str):
        raise GatewayError(400, "the form field 'purpose' is required ('batch')", param="purpose")
    if not isinstance(upload, web.FileField):
        raise GatewayError(400, "the form field 'file' (a JSONL file) is required", param="file")
    return purpose, upload.filename or "upload.jsonl", upload.file.read()
