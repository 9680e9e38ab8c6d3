"""Async jobs: submit now, fetch the result later. Kept in the ``jobs`` table.

``POST …/v1/jobs`` with ``{"route": "chat/completions", "body": {...}}`` (``route``
defaults by the workload's modality; reranker, classification and reward are served
only here) answers 202 with the job. ``GET …/v1/jobs/{id}`` answers its status
(``queued`` → ``running`` → ``succeeded`` | ``failed``) and, when finished, the
replica's answer. Workers in every gateway claim queued jobs with a conditional update,
so several gateways share one queue and a restart loses nothing: a gateway that stops
queues its running jobs again, and a job left ``running`` by a gateway that died is
queued again after ``job_timeout_sec``.

The lines of a batch (``gateway.batches``) are jobs too, with a ``batch_id``. Workers
take jobs submitted on their own first, and a batch line only while a replica has room
beyond the reserve kept for live traffic (``gateway.window.batch_reserve``). A batch
line whose replica failed before answering (a connection refused or cut) is queued
again, up to ``BATCH_LINE_ATTEMPTS`` claims in all; any job whose replica refused the
connection is queued again, and the replica rested for ``refused_cooldown_sec``. A line
of a batch that was cancelled or whose window closed is never claimed, and is cancelled
or expired instead of queued again. A job's outcome is written only while it is still
the writer's claim, so a job queued again and claimed elsewhere is left to its holder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import ColumnElement, and_, false, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.spec import TaskType
from autoscaler.store.models import Batch, Job
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.routes import WorkloadRef, WorkloadRoute

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
#: Batch lines only: not run because their batch was cancelled, or its window closed.
CANCELLED, EXPIRED = "cancelled", "expired"
#: How many times a batch line is claimed before a replica failure is its result.
BATCH_LINE_ATTEMPTS = 3
#: A job's request to its replica may take this share of ``job_timeout_sec``: it ends
#: before the job counts as stale (left by a gateway that died) and is claimed again.
JOB_REQUEST_SHARE = 0.9

#: Job route -> path on the replica (vLLM's pooling routes sit outside /v1).
JOB_ROUTES = {
    "chat/completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "images/generations": "/v1/images/generations",
    "audio/speech": "/v1/audio/speech",
    "rerank": "/v1/rerank",
    "score": "/v1/score",
    "classify": "/classify",
    "pooling": "/pooling",
}
DEFAULT_ROUTE = {
    TaskType.TEXT2TEXT: "chat/completions",
    TaskType.IMAGE2TEXT: "chat/completions",
    TaskType.EMBEDDING: "embeddings",
    TaskType.TEXT2IMAGE: "images/generations",
    TaskType.TEXT2AUDIO: "audio/speech",
    TaskType.RERANKER: "rerank",
    TaskType.CLASSIFICATION: "classify",
    TaskType.REWARD: "pooling",
}


@dataclass(frozen=True, slots=True)
class JobSubmission:
    route: str
    body: dict[str, Any]


def parse_submission(raw: bytes, *, route: WorkloadRoute) -> JobSubmission:
    """Validate a job request body; errors name the field and what is allowed."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise GatewayError(400, f"job request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "job request body must be a JSON object")
    unknown = set(data) - {"route", "body"}
    if unknown:
        raise GatewayError(
            400, f"unknown job field(s) {sorted(unknown)}: a job has 'route' and 'body'"
        )
    job_route = data.get("route", DEFAULT_ROUTE.get(route.task_type))
    if job_route not in JOB_ROUTES:
        raise GatewayError(
            400,
            f"job route {job_route!r} is not one of {sorted(JOB_ROUTES)}",
            code="invalid_job_route",
        )
    body = data.get("body")
    if not isinstance(body, dict):
        raise GatewayError(400, "job field 'body' must be a JSON object: the request to run")
    return JobSubmission(route=job_route, body=body)


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "job",
        "workload": job.workload_slug,
        "route": job.route,
        "status": job.status,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "result": job.result,
        "error": job.error,
    }


def queued_job(
    ref: WorkloadRef,
    *,
    route: str,
    body: dict[str, Any],
    now: datetime,
    batch_id: str | None = None,
    custom_id: str | None = None,
    batch_line: int | None = None,
) -> Job:
    """A new job row, queued: one submitted on its own, or a line of a batch."""
    return Job(
        id="job_" + secrets.token_hex(12),
        project=ref[0],
        workload_slug=ref[1],
        route=route,
        request=body,
        status=QUEUED,
        result=None,
        error=None,
        created_at=now,
        started_at=None,
        finished_at=None,
        batch_id=batch_id,
        custom_id=custom_id,
        batch_line=batch_line,
        attempts=0,
    )


async def submit_job(
    session: AsyncSession, *, ref: WorkloadRef, submission: JobSubmission, now: datetime
) -> Job:
    job = queued_job(ref, route=submission.route, body=submission.body, now=now)
    session.add(job)
    await session.flush()
    return job


async def get_job(session: AsyncSession, *, ref: WorkloadRef, job_id: str) -> Job:
    job = await session.get(Job, job_id)
    if job is None or (job.project, job.workload_slug) != ref:
        raise GatewayError(404, f"no job {job_id!r} in this workload", code="job_not_found")
    return job


@dataclass(frozen=True, slots=True)
class JobQueue:
    """One workload's queued jobs: how many, and when the oldest was submitted."""

    depth: int
    oldest_at: datetime


async def job_queues(session: AsyncSession) -> dict[WorkloadRef, JobQueue]:
    """The queued jobs of every workload that has any."""
    rows = await session.execute(
        select(Job.project, Job.workload_slug, func.count(), func.min(Job.created_at))
        .where(Job.status == QUEUED)
        .group_by(Job.project, Job.workload_slug)
    )
    return {(p, w): JobQueue(depth=int(n), oldest_at=_aware(oldest)) for p, w, n, oldest in rows}


def _aware(at: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; they are stored in UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class JobRunner:
    """Runs queued jobs against ready replicas: up to ``workers`` at once in this
    gateway, each on a lease like a live request's, claimed only while a replica of the
    job's workload has room and no live request waits for one (jobs fill free slots;
    they never queue ahead of callers). More replicas, or a larger ``per_worker``, run
    more jobs at once."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        client: aiohttp.ClientSession,
        routes: Callable[[], dict[WorkloadRef, WorkloadRoute]],
        queued: Callable[[], Mapping[WorkloadRef, int]],
        now: Callable[[], datetime],
        workers: int,
        poll_interval_sec: float,
        job_timeout_sec: float,
        on_batch_line_done: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._client = client
        self._routes = routes
        self._queued = queued
        self._now = now
        self._workers = workers
        self._poll = poll_interval_sec
        self._job_timeout = job_timeout_sec
        # Not the shared session's default (5 minutes in all): a job may generate for
        # longer, up to just short of ``job_timeout_sec``, past which it is stale and
        # another gateway may claim it; a connection still takes at most 30 s.
        self._request_timeout = aiohttp.ClientTimeout(
            total=job_timeout_sec * JOB_REQUEST_SHARE,
            sock_connect=min(30.0, job_timeout_sec * JOB_REQUEST_SHARE),
        )
        self._on_batch_line_done = on_batch_line_done
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        #: Jobs this runner has claimed and not finished, with their claim's start time
        #: (from the claim's update on, before its commit: a stop can cut in there).
        self._held: dict[str, datetime] = {}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._claim_loop())]

    async def stop(self) -> None:
        """Stop claiming, cut the running jobs short and queue them again, so another
        gateway (or this one, restarted) runs them at once instead of after
        ``job_timeout_sec``."""
        tasks = [*self._tasks, *self._running]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        cut, self._held = self._held, {}
        if cut:
            # Only our own claims: a claim rolled back may since be another gateway's.
            mine = or_(*(and_(Job.id == i, Job.started_at == at) for i, at in cut.items()))
            closed: list[str] = []
            try:
                async with self._sessions() as s, s.begin():
                    await s.execute(
                        update(Job)
                        .where(Job.status == RUNNING, mine)
                        .values(status=QUEUED, started_at=None)
                    )
                    closed = await close_lines_of_closed_batches(s, now=self._now(), ids=cut)
            except Exception:
                log.exception("queueing %d cut jobs again failed", len(cut))
            for batch_id in closed:
                if self._on_batch_line_done is not None:
                    try:
                        await self._on_batch_line_done(batch_id)
                    except Exception:
                        log.exception("finalizing batch %s failed", batch_id)

    def poke(self) -> None:
        """A job was submitted or a replica became ready: look now."""
        self._wake.set()

    async def requeue_stale(self) -> None:
        cutoff = self._now() - timedelta(seconds=self._job_timeout)
        async with self._sessions() as s, s.begin():
            await s.execute(
                update(Job)
                .where(Job.status == RUNNING, Job.started_at < cutoff)
                .values(status=QUEUED, started_at=None)
            )

    async def _claim_loop(self) -> None:
        slots = asyncio.Semaphore(self._workers)
        while True:
            await slots.acquire()
            self._wake.clear()  # before looking, so a wake-up during the look is kept
            try:
                job = await self._claim()
            except Exception:
                log.exception("claiming an async job failed")
                job = None
            if job is None:
                slots.release()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):
                        await self._wake.wait()
                continue
            task = asyncio.create_task(self._run_in_slot(job, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            # Let it take its lease before the next look at the replicas' room.
            await asyncio.sleep(0)

    async def _run_in_slot(self, job: Job, slots: asyncio.Semaphore) -> None:
        try:
            await self._run(job)
        finally:
            slots.release()
            self._wake.set()  # a slot and a replica's room are free: look again

    async def _claim(self) -> Job | None:
        """Take the oldest queued job whose workload has a ready replica with room: a
        job submitted on its own first, else a batch line, where the room beyond the
        replicas' reserve for live traffic allows one.

        Only workloads whose last known queue depth (``queued``, refreshed with the
        routes) is above zero are looked for, so idle workers leave the store alone;
        whoever refreshes the depths pokes the workers when a routable one has jobs.
        """
        depths = self._queued()
        routable = [
            ref
            for ref, r in self._routes().items()
            if r.ready and depths.get(ref) and self._dispatcher.has_room(ref)
        ]
        if not routable:
            return None
        batch_room = [ref for ref in routable if self._dispatcher.has_room(ref, batch=True)]
        async with self._sessions() as s, s.begin():
            for refs, lines in ((routable, False), (batch_room, True)):
                if not refs:
                    continue
                kind = Job.batch_id.is_not(None) if lines else Job.batch_id.is_(None)
                # A cancelled or expired batch's lines queued again are never run: the
                # sweep marks them so (``gateway.batches.sweep``).
                closed = (open_batch_lines(self._now()),) if lines else ()
                candidates = await s.scalars(
                    select(Job)
                    .where(Job.status == QUEUED, kind, _of_workloads(refs), *closed)
                    .order_by(Job.created_at, Job.batch_line)
                    .limit(50)
                )
                for job in candidates:
                    at = self._now()
                    claimed = await s.execute(
                        update(Job)
                        .where(Job.id == job.id, Job.status == QUEUED)
                        .values(status=RUNNING, started_at=at, attempts=Job.attempts + 1)
                    )
                    if claimed.rowcount == 1:  # type: ignore[attr-defined]
                        # The update's evaluation has already counted the claim in
                        # ``job.attempts`` (and ``started_at``) in this session.
                        self._held[job.id] = at
                        return job
        return None

    async def _run(self, job: Job) -> None:
        ref = (job.project, job.workload_slug)
        claimed_at = self._held[job.id]
        try:
            lease = await self._dispatcher.acquire(ref, adapter=self._adapter(ref, job))
        except GatewayError as exc:
            await self._finish(job, claimed_at, status=QUEUED, result=None, error=exc.message)
            self._held.pop(job.id, None)
            return
        try:
            status, result, error = await self._call(
                job, url=lease.replica.url, key=lease.replica.engine_key
            )
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached the replica (one gone, a route left from before a restart):
            # rest it as a live request's retry does, and queue the job again.
            self._dispatcher.refused(lease)
            status, result, error = QUEUED, None, f"the replica refused the connection: {exc}"
        finally:
            self._dispatcher.release(lease)
        if (
            status == FAILED
            and result is None
            and job.batch_id is not None
            and job.attempts < BATCH_LINE_ATTEMPTS
        ):
            status = QUEUED  # no answer came: another replica may give one
        status = await self._finish(job, claimed_at, status=status, result=result, error=error)
        self._held.pop(job.id, None)
        if job.batch_id is not None and status != QUEUED and self._on_batch_line_done:
            try:
                await self._on_batch_line_done(job.batch_id)
            except Exception:
                log.exception("finalizing batch %s failed", job.batch_id)

    def _adapter(self, ref: WorkloadRef, job: Job) -> str | None:
        """The LoRA adapter the job's body names as its ``model``, as for a live
        request: only replicas started with it may run the job."""
        route = self._routes().get(ref)
        if route is None or not route.adapters:
            return None
        model = job.request.get("model")
        adapter = route.adapter(model if isinstance(model, str) else None)
        return None if adapter is None else adapter.name

    async def _call(
        self, job: Job, *, url: str, key: str | None
    ) -> tuple[str, dict[str, Any] | None, str | None]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with self._client.post(
                url + JOB_ROUTES[job.route],
                json=job.request,
                headers=headers,
                timeout=self._request_timeout,
            ) as resp:
                raw = await resp.read()
                result = _result(resp.status, resp.content_type, raw)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            return FAILED, None, f"the replica failed: {type(exc).__name__}: {exc}"
        if resp.status >= 400:
            return FAILED, result, f"the replica answered HTTP {resp.status}"
        return SUCCEEDED, result, None

    async def _finish(
        self,
        job: Job,
        claimed_at: datetime,
        *,
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> str:
        """Record the job's outcome, if it is still this runner's claim (a job queued
        again meanwhile, by a stop or as stale, and perhaps claimed by another gateway,
        is left to its new holder). A batch line to queue again whose batch was cancelled
        or whose window closed is cancelled or expired instead. Returns the status
        written, or ``QUEUED`` when nothing was."""
        now = self._now()
        async with self._sessions() as s, s.begin():
            if status == QUEUED and job.batch_id is not None:
                status = await _closed_batch_status(s, job.batch_id, now=now) or QUEUED
            done = status != QUEUED
            written = await s.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == RUNNING, Job.started_at == claimed_at)
                .values(
                    status=status,
                    result=result,
                    error=error,
                    finished_at=now if done else None,
                    started_at=None if status == QUEUED else Job.started_at,
                )
                .execution_options(synchronize_session=False)
            )
        return status if written.rowcount == 1 else QUEUED  # type: ignore[attr-defined]


async def _closed_batch_status(s: AsyncSession, batch_id: str, *, now: datetime) -> str | None:
    """``CANCELLED`` or ``EXPIRED`` for a line of a batch that runs no more lines."""
    row = (
        await s.execute(select(Batch.cancelling_at, Batch.expires_at).where(Batch.id == batch_id))
    ).first()
    if row is None:
        return None
    cancelling_at, expires_at = row
    if cancelling_at is not None:
        return CANCELLED
    return EXPIRED if expires_at <= now else None


async def close_lines_of_closed_batches(
    s: AsyncSession, *, now: datetime, ids: Collection[str] | None = None
) -> list[str]:
    """Cancel the queued lines of cancelled batches and expire those of open batches
    past their window (only the jobs ``ids``, if given); the batches they belong to."""
    touched: set[str] = set()
    for status, closed in (
        (CANCELLED, Batch.cancelling_at.is_not(None)),
        (EXPIRED, and_(Batch.cancelling_at.is_(None), Batch.expires_at <= now)),
    ):
        of_closed = (
            select(Batch.id)
            .where(Batch.id == Job.batch_id, Batch.finalizing_at.is_(None), closed)
            .exists()
        )
        only = (Job.id.in_(ids),) if ids is not None else ()
        rows = await s.execute(
            update(Job)
            .where(Job.status == QUEUED, Job.batch_id.is_not(None), of_closed, *only)
            .values(status=status, finished_at=now)
            .returning(Job.batch_id)
            .execution_options(synchronize_session=False)
        )
        touched.update(batch_id for (batch_id,) in rows if batch_id is not None)
    return sorted(touched)


def open_batch_lines(now: datetime) -> ColumnElement[bool]:
    """Jobs that are not lines of a cancelled batch or one whose window has closed."""
    closed = (
        select(Batch.id)
        .where(
            Batch.id == Job.batch_id,
            or_(Batch.cancelling_at.is_not(None), Batch.expires_at <= now),
        )
        .exists()
    )
    return or_(Job.batch_id.is_(None), ~closed)


def _of_workloads(refs: list[WorkloadRef]) -> ColumnElement[bool]:
    return or_(false(), *(and_(Job.project == p, Job.workload_slug == w) for p, w in refs))


def _result(status: int, content_type: str, raw: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"status_code": status, "content_type": content_type}
    if content_type == "application/json":
        with contextlib.suppress(ValueError):
            out["body"] = json.loads(raw)
            return out
    out["body_base64"] = base64.b64encode(raw).decode()
    return out
