"""The workload contract: what users write, validated at the boundary.

A ``WorkloadSpec`` says *what* to serve (model, engine, modality) and *how much* (the
execution policy). It never says where: placement is the service's job. Every rule here
answers with the field path, the value and what is allowed, and unknown keys anywhere
are refused (a typo must not silently do nothing).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from autoscaler.labels import LABELS_SCHEMA, check_labels
from catalog.cuda import cuda_version, offer_cuda_problem
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import ProviderName
from catalog.regions import REGION_PATTERN, normalise_region
from catalog.sizing import CONTEXT_FLAGS, command_adapters


class Backend(StrEnum):
    """The serving engine. Members answer to both spellings: ``Backend.VLLM_OMNI`` and
    ``Backend.VllmOmni``."""

    VLLM = "vllm"
    SGLANG = "sglang"
    OLLAMA = "ollama"
    VLLM_OMNI = "vllm-omni"
    Vllm = "vllm"
    Sglang = "sglang"
    Ollama = "ollama"
    VllmOmni = "vllm-omni"


#: The backends' wire strings, each once (the enum's CamelCase members are aliases).
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(b.value for b in Backend))


class TaskType(StrEnum):
    """The modality a workload serves."""

    TEXT2TEXT = "text2text"
    EMBEDDING = "embedding"
    TEXT2IMAGE = "text2image"
    TEXT2AUDIO = "text2audio"
    AUDIO2TEXT = "audio2text"
    RERANKER = "reranker"
    CLASSIFICATION = "classification"
    REWARD = "reward"
    IMAGE2TEXT = "image2text"
    IMAGE2IMAGE = "image2image"
    TEXT2VIDEO = "text2video"
    AUDIO2AUDIO = "audio2audio"


#: Image, audio and video modalities; only vllm-omni serves them.
OMNI_TASK_TYPES = frozenset(
    t for t in TaskType if any(m in t.value for m in ("image", "audio", "video"))
)
#: Modalities served only through the gateway's async jobs route.
JOB_ONLY_TASK_TYPES = frozenset({TaskType.RERANKER, TaskType.CLASSIFICATION, TaskType.REWARD})


class EndpointType(StrEnum):
    """How a workload is called. Unset: every route is open (live requests and jobs).

    ``sync`` and ``streaming`` answer live requests and keep at least one replica at all
    times; ``async`` serves only jobs (``/v1/jobs``), scales on the job queue and may
    scale to zero."""

    SYNC = "sync"
    STREAMING = "streaming"
    ASYNC = "async"


#: Endpoint types that answer callers while they wait: they need a replica at all times.
LIVE_ENDPOINT_TYPES = frozenset({EndpointType.SYNC, EndpointType.STREAMING})

MAX_PER_WORKER = 100_000
"""The largest ``per_worker`` (a bound on a count, not a tuning limit)."""

APPLY = "apply"
"""Validation context key (``context={APPLY: True}``): the spec is being applied. The
bounds below that guard the service against one large value are checked then, and not
when a stored spec is read back, so a spec stored before a bound existed keeps running
(and is refused only when it is applied again)."""


def at_apply(
    check: Callable[[Any], str | None], *, raw: bool = False
) -> AfterValidator | BeforeValidator:
    """A field validator that runs ``check`` (the problem, or None) only at apply; on the
    value as given (``raw``: before pydantic coerces it, so ``true`` is not yet ``1``)
    or on the field's value."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        context = info.context
        if value is not None and isinstance(context, dict) and context.get(APPLY):
            problem = check(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    return BeforeValidator(validate) if raw else AfterValidator(validate)


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class ApplyBound:
    """A bound declared once, in ``Annotated``: published in the JSON schema as
    ``keyword`` with ``limit`` and checked only at apply (:func:`at_apply`), where
    ``problem`` says what is wrong with a value (``None``: nothing)."""

    keyword: Literal["maximum", "minimum", "maxLength"]
    limit: float
    problem: Callable[[Any], str | None]

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return at_apply(self.problem).__get_pydantic_core_schema__(source, handler)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler.resolve_ref_schema(handler(schema))
        json_schema[self.keyword] = self.limit
        return json_schema


def _at_most(limit: float, unit: str = "") -> ApplyBound:
    return ApplyBound(
        "maximum",
        limit,
        lambda v: (
            None if v <= limit else f"Input should be less than or equal to {_number(limit)}{unit}"
        ),
    )


def _at_least(limit: float) -> ApplyBound:
    return ApplyBound(
        "minimum",
        limit,
        lambda v: (
            None if v >= limit else f"Input should be greater than or equal to {_number(limit)}"
        ),
    )


def _longest(limit: int) -> ApplyBound:
    return ApplyBound(
        "maxLength",
        limit,
        lambda v: None if len(v) <= limit else f"String should have at most {limit} characters",
    )


MAX_DURATION_SEC = 366 * 24 * 3600
"""The longest a scheduled policy's ``duration`` may be: a year and a day (a yearly cron
that runs all year)."""

MAX_MODEL_GIB = 100_000.0
"""The largest ``model_memory_gib`` taken: far above any machine sold, so a real model is
never refused here; placement says which machines fit."""

MAX_NAME = 256
MAX_MODEL = 1024
MAX_COMMAND = 16 * 1024
"""Longest display name, model reference and engine command, in characters: a spec is
stored whole and shown in every listing, so one field cannot grow without bound."""


class ExecutionPolicy(StrEnum):
    FIXED = "fixed"
    SCHEDULED = "scheduled"
    AUTOSCALING = "autoscaling"


class OnDrift(StrEnum):
    """What ``ensure`` does when the stored spec differs from the one given."""

    RECONCILE = "reconcile"
    FAIL = "fail"
    IGNORE = "ignore"


SLUG_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CUDA_VERSION_RE = re.compile(r"[0-9]{2}\.[0-9]")  # fullmatch: ASCII digits, nothing after


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Keys people carry over from other systems, mapped to ours.
_RENAMED_KEYS = {"min_replicas": "min_workers", "max_replicas": "max_workers"}


class StrictModel(BaseModel):
    """Refuses unknown keys with a suggestion, and is immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        data = cls._normalise(data)
        if isinstance(data, Mapping):
            known = cls.known_keys()
            unknown = [k for k in data if k not in known]
            if unknown:
                key = str(unknown[0])
                hint = (
                    f" (did you mean {_RENAMED_KEYS[key]!r}?)"
                    if key in _RENAMED_KEYS
                    else _suggest(key, sorted(known))
                )
                raise PydanticCustomError(
                    "unknown_field",
                    "unknown field '{field}'{hint}; allowed: {allowed}",
                    {"field": key, "hint": hint, "allowed": ", ".join(sorted(known))},
                )
        return handler(data)

    @classmethod
    def known_keys(cls) -> set[str]:
        """The keys a document of this model may carry: field names and their aliases."""
        return set(cls.model_fields) | {
            f.alias for f in cls.model_fields.values() if f.alias is not None
        }

    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Rewrite accepted legacy forms into the current one, before any check."""
        return data


def _whole(value: Any) -> Any:
    """A JSON number written ``2.0`` is the integer 2 (JSON Schema's ``integer``; some
    clients write every number so); ``2.5``, ``true`` and ``"2"`` are still refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)
"""For counts (``strict``, so that a bool or a string is refused): integral floats pass."""


# --- fixed ------------------------------------------------------------------------------


class FixedPolicy(StrictModel):
    """Run exactly ``replicas`` replicas."""

    replicas: Annotated[int, Field(ge=0, strict=True), WHOLE] = 1


# --- scheduled --------------------------------------------------------------------------

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION_RE = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_FORM = re.compile(r"(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?")


def parse_duration(text: str | int) -> int:
    """``"1h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` or a number of seconds, to seconds (> 0)."""
    if isinstance(text, int):
        seconds = text
    else:
        m = _DURATION_RE.fullmatch(text.strip().lower())
        if not text.strip() or m is None:
            raise ValueError(f"duration {text!r} is not like '1h', '90m', '1h30m' or seconds")
        h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds


def _duration_form(value: Any) -> str | None:
    """A duration exactly as published (checked at apply, on the value as given): ``1h30m``
    (lower case, no spaces) or a whole number of seconds, not ``true``. A stored spec
    keeps the looser reading of :func:`parse_duration` (``" 1H "``), which specs applied
    before this check may hold."""
    loose = isinstance(value, str) and not _DURATION_FORM.fullmatch(value)
    if isinstance(value, bool) or loose:
        return f"duration {value!r} is not like '1h', '90m', '1h30m' or a whole number of seconds"
    return None


def _duration_problem(value: str | int) -> str | None:
    seconds = parse_duration(value)
    if seconds > MAX_DURATION_SEC:
        return (
            f"duration {value!r} is {seconds} s, above the longest allowed, "
            f"{MAX_DURATION_SEC} s (366 days)"
        )
    return None


def _parse_days(text: str) -> frozenset[int]:
    if text.lower() in ("daily", "everyday", "every-day"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        ends = part.strip().lower().split("-")
        if len(ends) > 2 or any(e[:3] not in DAY_NAMES or len(e) < 3 for e in ends):
            raise ValueError(
                f"days {text!r}: use Mon..Sun names, ranges like Mon-Fri, lists like "
                "Mon,Wed,Fri, or Daily"
            )
        first, last = DAY_NAMES.index(ends[0][:3]), DAY_NAMES.index(ends[-1][:3])
        # A range may wrap the week: Fri-Mon is Fri, Sat, Sun, Mon.
        span = (last - first) % 7
        days.update((first + i) % 7 for i in range(span + 1))
    return frozenset(days)


def _parse_clock(text: str) -> time:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if m is None or int(m.group(1)) > 24 or int(m.group(2)) > 59:
        raise ValueError(f"time {text!r} is not HH:MM")
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour == 24:
        if minute:
            raise ValueError(f"time {text!r} is past 24:00")
        return time(0, 0)
    return time(hour, minute)


class Window(BaseModel):
    """A weekly window: ``days`` (0 = Monday) from ``start`` to ``end`` in ``tz``.

    ``end <= start`` means the window crosses midnight and ends the next day; the day
    named is the day the window opens. ``start == end`` (written ``00:00-24:00``) is a
    whole day.
    """

    model_config = ConfigDict(frozen=True)

    days: frozenset[int]
    start: time
    end: time
    tz: str

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse ``"Mon-Fri 08:00-20:00 Europe/Madrid"``; the zone is UTC when omitted."""
        parts = text.split()
        if len(parts) not in (2, 3):
            raise ValueError(
                f"window {text!r} is not like 'Mon-Fri 08:00-20:00 Europe/Madrid' "
                "(days, HH:MM-HH:MM, optional IANA time zone)"
            )
        days = _parse_days(parts[0])
        times = parts[1].split("-")
        if len(times) != 2:
            raise ValueError(f"window {text!r}: hours must be HH:MM-HH:MM")
        start, end = _parse_clock(times[0]), _parse_clock(times[1])
        tz = parts[2] if len(parts) == 3 else "UTC"
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            hint = _suggest(tz, sorted(available_timezones()))
            raise ValueError(f"window {text!r}: unknown time zone {tz!r}{hint}") from None
        if start == end and times[1] != "24:00":
            raise ValueError(f"window {text!r} is empty: it starts and ends at {times[0]}")
        return cls(days=days, start=start, end=end, tz=tz)


def validate_cron(expr: str) -> str:
    """Check a five-field crontab expression with apscheduler's parser."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {expr!r} has {len(fields)} fields; five are needed: "
            "minute hour day-of-month month day-of-week"
        )
    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"cron {expr!r} is not valid: {exc}") from None
    return " ".join(fields)


NEVER_FIRES_YEARS = 30
"""How far ahead apply looks for a cron's next firing: every date and weekday pairing
(29 February on a Monday included) recurs within 28 years."""


def _cron_problem(expr: str) -> str | None:
    """Why a valid cron cannot run a replica (no date matches its day and month, as 31
    February), or None. The search stops after :data:`NEVER_FIRES_YEARS`: unbounded, the
    scheduler's own search runs to the year 9999, seconds of CPU."""
    from apscheduler.triggers.cron import CronTrigger

    now = datetime.now(UTC)
    trigger = CronTrigger.from_crontab(expr, timezone="UTC")
    trigger.end_date = now + timedelta(days=366 * NEVER_FIRES_YEARS)
    if trigger.get_next_fire_time(None, now) is None:
        return f"cron {expr!r} never fires: no date matches its day and month"
    return None


class ScheduledPolicy(StrictModel):
    """Run ``replicas`` replicas while a schedule is active.

    Either ``cron`` (each firing starts ``duration`` of activity, default 1h; ``timezone``
    defaults to UTC) or ``window`` (``"Mon-Fri 08:00-20:00 Europe/Madrid"``).
    """

    cron: Annotated[str | None, at_apply(_cron_problem)] = None
    window: str | None = None
    duration: Annotated[
        str | int | None, at_apply(_duration_form, raw=True), at_apply(_duration_problem)
    ] = None
    timezone: str = "UTC"
    replicas: Annotated[int, Field(ge=0, strict=True), WHOLE] = 1

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else validate_cron(value)

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            Window.parse(value)
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            hint = _suggest(value, sorted(available_timezones()))
            raise ValueError(f"unknown time zone {value!r}{hint}") from None
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> Self:
        if (self.cron is None) == (self.window is None):
            raise ValueError("give exactly one of 'cron' or 'window'")
        if self.window is not None and self.duration is not None:
            raise ValueError("'duration' goes with 'cron'; a window has its own end time")
        return self

    @property
    def duration_sec(self) -> int:
        return parse_duration(self.duration if self.duration is not None else "1h")

    @property
    def parsed_window(self) -> Window | None:
        return None if self.window is None else Window.parse(self.window)


# --- autoscaling ------------------------------------------------------------------------

PositiveUsd = Annotated[float, Field(gt=0, allow_inf_nan=False)]

MAX_POLICY_SEC = 30 * 24 * 3600
"""The longest TTFT target, window or timeout a policy may give: 30 days. Longer changes
nothing a user could see, and past it the clock arithmetic of a step overflows."""

PolicySeconds = Annotated[
    float,
    Field(gt=0, allow_inf_nan=False),
    _at_most(MAX_POLICY_SEC, " (30 days)"),
]

MIN_BOOT_DEADLINE_SEC = 10.0
"""The shortest boot deadline (``scaling_up_timeout_sec``) taken: no engine is ready
sooner, and a shorter one would terminate every replica it launches."""


def _check_cuda_versions(values: list[str] | None) -> list[str] | None:
    for v in values or []:
        if not CUDA_VERSION_RE.fullmatch(v):
            raise ValueError(f"CUDA version {v!r} is not like '12.4' or '13.0'")
        cuda_version(v)  # an unknown version: the error lists the known ones
    return values


# Where a pinned GPU may run: the clouds (their machine images' drivers must run the pin)
# or this machine and private workers (they bring their own driver).
_CUDA_PROVIDERS = (ProviderName.AWS, ProviderName.GCP, ProviderName.LOCAL)


def _cuda_pool_problem(gpu_pool: list[str], pins: list[str]) -> str | None:
    """Why no GPU of the pool runs any pinned CUDA version anywhere, or ``None``."""
    problems: list[str] = []
    for name in gpu_pool:
        gpu = resolve_gpu(name)
        found = [
            offer_cuda_problem(provider=provider, gpu=gpu, pins=tuple(pins))
            for provider in _CUDA_PROVIDERS
        ]
        if any(problem is None for problem in found):
            return None
        problems.append(next(p for p in found if p is not None))
    return "no GPU of the pool can run the pinned CUDA versions: " + "; ".join(problems)


def _canonical_gpu_names(names: list[str]) -> list[str]:
    canonical: list[str] = []
    for name in names:
        try:
            canonical.append(resolve_gpu(name).display_name)
        except UnknownGpuError as exc:
            raise ValueError(str(exc)) from None
    return list(dict.fromkeys(canonical))


class CloudPool(StrictModel):
    """The GPUs a workload may buy, and the pool's own limits."""

    gpu_pool: Annotated[list[str], Field(min_length=1)]
    max_hourly_cost_usd: PositiveUsd | None = None
    max_instances: Annotated[int, Field(ge=1, strict=True), WHOLE] | None = None
    allowed_cuda_versions: list[str] | None = None

    @field_validator("gpu_pool")
    @classmethod
    def _gpu_pool(cls, value: list[str]) -> list[str]:
        return _canonical_gpu_names(value)

    @field_validator("allowed_cuda_versions")
    @classmethod
    def _cuda(cls, value: list[str] | None) -> list[str] | None:
        return _check_cuda_versions(value)

    @model_validator(mode="after")
    def _pins_fit_the_pool(self) -> Self:
        if self.allowed_cuda_versions:
            problem = _cuda_pool_problem(self.gpu_pool, self.allowed_cuda_versions)
            if problem is not None:
                raise PydanticCustomError(
                    "cuda_unsatisfiable",
                    "allowed_cuda_versions {pins}: {problem}",
                    {"pins": self.allowed_cuda_versions, "problem": problem},
                )
        return self


class CloudWorkers(StrictModel):
    source: Literal["cloud"] = "cloud"
    cloud_pool: CloudPool


class PrivateWorkers(StrictModel):
    source: Literal["private"]
    private_worker_ids: Annotated[list[str], Field(min_length=1)]


def _worker_source(value: Any) -> str | None:
    """``workers.source`` picks the shape; cloud when it is left out."""
    if isinstance(value, Mapping):
        source = value.get("source", "cloud")
        return source if isinstance(source, str) else None
    return getattr(value, "source", None)


SLEEPING_BACKENDS = frozenset({Backend.VLLM})
"""Backends whose replicas can sleep: vLLM's sleep mode (``--enable-sleep-mode``; then
``POST /sleep`` and ``POST /wake_up``). Other backends' replicas are stopped or
terminated instead."""


class WarmPoolSpec(StrictModel):
    """Parked replicas to keep for fast scale-ups (``decide.warm``): at most ``stopped``
    stopped machines and ``sleeping`` sleeping engines, refilled up to those counts."""

    stopped: Annotated[int, Field(ge=0, strict=True), WHOLE] = 0
    sleeping: Annotated[int, Field(ge=0, strict=True), WHOLE] = 0
    sleep_level: Literal[1, 2] = 1
    """vLLM's sleep level: 1 keeps the weights in host memory (faster wake, host RAM),
    2 drops them (reloaded from the local disk)."""


class AutoscalingPolicy(StrictModel):
    """Scale between ``min_workers`` and ``max_workers`` on measured TTFT.

    Cloud workers need a ``max_hourly_cost_usd`` ceiling: the sum of the hourly prices
    of every instance not confirmed terminated never exceeds it. ``scale_to_zero`` acts
    only when ``min_workers`` is 0; with it off the floor is one replica.
    """

    min_workers: Annotated[int, Field(ge=0, strict=True), WHOLE] = 0
    max_workers: Annotated[int, Field(ge=1, strict=True), WHOLE]
    max_hourly_cost_usd: PositiveUsd | None = None
    workers: (
        Annotated[
            Annotated[CloudWorkers, Tag("cloud")] | Annotated[PrivateWorkers, Tag("private")],
            Discriminator(_worker_source),
        ]
        | None
    ) = None
    gpu_pool: Annotated[list[str] | None, Field(exclude=True)] = None  # legacy; see _normalise
    autoscaling_strategy: Literal["ttft_latency_sec"] = "ttft_latency_sec"
    upper_allowed_latency_sec: PolicySeconds = 1.0
    lower_allowed_latency_sec: Annotated[
        float,
        Field(ge=0, allow_inf_nan=False),
        _at_most(MAX_POLICY_SEC, " (30 days)"),
    ] = 0.2
    ttft_percentile: Annotated[float, Field(gt=0, le=1)] = 0.95
    min_throughput_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Generated tokens per second the fleet must be able to sustain: a floor on the
    replica count beside the TTFT rule, from the performance model's throughput of one
    replica (``decide.scaling``); unset: no floor."""
    scale_up_time_window_sec: PolicySeconds = 60.0
    scale_down_time_window_sec: PolicySeconds = 300.0
    scaling_up_timeout_sec: Annotated[
        PolicySeconds,
        _at_least(MIN_BOOT_DEADLINE_SEC),
    ] = 1200.0
    """How long a replica may take from launch to ready before it is terminated and its
    offer skipped for a while; at least :data:`MIN_BOOT_DEADLINE_SEC`."""
    scaling_down_timeout_sec: PolicySeconds = 120.0
    scale_to_zero: bool = True
    scale_to_zero_timeout_sec: PolicySeconds = 900.0
    enable_fast_autoscaling: bool = False
    allow_spot_instances: bool = False
    warm_pool: WarmPoolSpec | Literal["auto"] | None = None
    """Stopped machines and sleeping engines kept for fast scale-ups
    (:mod:`autoscaler.decide.warm`): explicit bounds, ``"auto"`` (keep what scale-downs
    leave while cheaper than buying again), or unset (none)."""
    regions: Annotated[
        list[str] | None, Field(json_schema_extra={"items": {"pattern": REGION_PATTERN}})
    ] = None
    """Cloud regions (``us-east-1``, ``us-central1``) or macro regions (``US``, ``EU``,
    ``CANADA``, ``ASIA``; see :mod:`catalog.regions`); unset: anywhere."""

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return list(dict.fromkeys(normalise_region(name) for name in value))

    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Fold the legacy root ``gpu_pool`` into ``workers.cloud_pool``."""
        if not isinstance(data, Mapping) or "gpu_pool" not in data:
            return data
        data = dict(data)
        flat = data.pop("gpu_pool")
        if "allowed_cuda_versions" in data:
            raise ValueError(
                "the legacy root 'gpu_pool' cannot carry CUDA pins; move both under "
                "workers.cloud_pool (gpu_pool, allowed_cuda_versions)"
            )
        workers = data.get("workers")
        if isinstance(workers, Mapping) and workers.get("source", "cloud") != "cloud":
            raise ValueError("root 'gpu_pool' is for cloud workers; private workers take none")
        pool = dict((workers or {}).get("cloud_pool") or {})
        if "gpu_pool" in pool:
            raise ValueError("give 'gpu_pool' once: under workers.cloud_pool, not also at the root")
        if pool.get("allowed_cuda_versions"):
            raise ValueError(
                "the legacy root 'gpu_pool' cannot carry CUDA pins; move it to "
                "workers.cloud_pool.gpu_pool"
            )
        pool["gpu_pool"] = flat
        data["workers"] = {**(workers or {}), "source": "cloud", "cloud_pool": pool}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_workers < max(1, self.min_workers):
            raise ValueError(
                f"max_workers ({self.max_workers}) must be at least max(1, min_workers) "
                f"= {max(1, self.min_workers)}"
            )
        if self.lower_allowed_latency_sec >= self.upper_allowed_latency_sec:
            raise ValueError(
                f"lower_allowed_latency_sec ({self.lower_allowed_latency_sec}) must be below "
                f"upper_allowed_latency_sec ({self.upper_allowed_latency_sec})"
            )
        cloud = self.workers is None or isinstance(self.workers, CloudWorkers)
        pool = self.warm_pool
        if isinstance(pool, WarmPoolSpec):
            if pool.stopped + pool.sleeping > self.max_workers:
                raise ValueError(
                    f"warm_pool keeps {pool.stopped} stopped + {pool.sleeping} sleeping = "
                    f"{pool.stopped + pool.sleeping} replicas; allowed: at most max_workers "
                    f"({self.max_workers})"
                )
            if pool.stopped and not cloud:
                raise ValueError(
                    f"warm_pool.stopped is {pool.stopped}, but private workers are the "
                    "owner's machines and are never stopped; allowed: 0 (sleeping engines "
                    "work on private workers)"
                )
        cloud = self.workers is None or isinstance(self.workers, CloudWorkers)
        if cloud and self.max_hourly_cost_usd is None:
            raise ValueError(
                "max_hourly_cost_usd is required for cloud workers: the hard ceiling "
                "on the sum of hourly prices (a number > 0)"
            )
        return self

    @property
    def cloud_pool(self) -> CloudPool | None:
        return self.workers.cloud_pool if isinstance(self.workers, CloudWorkers) else None

    @property
    def private_worker_ids(self) -> list[str]:
        return self.workers.private_worker_ids if isinstance(self.workers, PrivateWorkers) else []


def _default_config(policy: ExecutionPolicy, *, worker_id: str | None) -> dict[str, Any]:
    """The config a policy gets when none is given, or an error naming what is missing.

    fixed: one replica. autoscaling on a pinned private worker: 0 to 1 replica on that
    worker. scheduled and cloud autoscaling have no default: a schedule and a dollar
    ceiling are the user's to choose.
    """
    if policy is ExecutionPolicy.FIXED:
        return {}
    if policy is ExecutionPolicy.AUTOSCALING and worker_id is not None:
        return {
            "max_workers": 1,
            "workers": {"source": "private", "private_worker_ids": [worker_id]},
        }
    if policy is ExecutionPolicy.SCHEDULED:
        missing = (
            "exactly one of 'cron' (e.g. \"0 2 * * *\") or 'window' "
            '(e.g. "Mon-Fri 08:00-20:00 UTC")'
        )
    else:
        missing = (
            "'max_workers' and 'max_hourly_cost_usd' (the hard $/h ceiling cloud workers "
            'need; it has no default), e.g. {"max_workers": 3, "max_hourly_cost_usd": 5.0, '
            '"workers": {"source": "cloud", "cloud_pool": {"gpu_pool": '
            '["NVIDIA A100-SXM4-80GB"]}}}'
        )
    raise PydanticCustomError(
        "policy_config_missing",
        "execution_policy {policy} needs an execution_policy_config; missing: {missing}",
        {"policy": repr(policy.value), "missing": missing},
    )


PolicyConfig = FixedPolicy | ScheduledPolicy | AutoscalingPolicy
POLICY_CONFIG_TYPES: dict[ExecutionPolicy, type[StrictModel]] = {
    ExecutionPolicy.FIXED: FixedPolicy,
    ExecutionPolicy.SCHEDULED: ScheduledPolicy,
    ExecutionPolicy.AUTOSCALING: AutoscalingPolicy,
}


# --- the workload -----------------------------------------------------------------------


MAX_CHAT_TEMPLATE = 32 * 1024
"""The longest ``custom_chat_template`` (it travels on the engine's command line)."""

MAX_LORAS = 32
"""The most LoRA adapters one workload serves (each takes GPU memory on every replica)."""
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LORA_NAME_RULE = (
    "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
)
LORA_SOURCE_PATTERN = r"^[A-Za-z0-9._/~:@+-]{1,512}$"
LORA_SOURCE_RULE = (
    "a Hugging Face repo id (owner/name) or a path on the replica's machine: 1-512 "
    "characters of letters, digits and . _ / ~ : @ + -"
)
LORA_FLAGS = (
    "--enable-lora",
    "--lora-modules",
    "--max-loras",
    "--lora-paths",
    "--max-loras-per-batch",
)
"""The engines' adapter flags, which ``llm_loras`` sets (vLLM, SGLang)."""
LORA_BACKENDS = ("vllm", "sglang")
SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
SECRET_NAME_RULE = (
    "1-63 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
)


class LoraAdapter(StrictModel):
    """A LoRA adapter the engine loads beside the base model at start, served under
    ``name``: a request with ``"model": name`` is answered by the base model with it."""

    name: Annotated[str, Field(pattern=LORA_NAME_PATTERN)]
    """What callers put in a request's ``model``."""
    source: Annotated[str, Field(pattern=LORA_SOURCE_PATTERN)]
    """A Hugging Face repo id (``owner/name``) or a path on the replica's machine."""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(LORA_NAME_PATTERN, value):
            raise PydanticCustomError(
                "lora_name",
                "adapter name {value} is not allowed; allowed: {rule}",
                {"value": repr(value), "rule": LORA_NAME_RULE},
            )
        return value

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(LORA_SOURCE_PATTERN, value):
            raise PydanticCustomError(
                "lora_source",
                "adapter source {value} is not allowed; allowed: {rule}",
                {"value": repr(value), "rule": LORA_SOURCE_RULE},
            )
        return value


def adapters_in_command(argv: Sequence[str] | None) -> frozenset[str]:
    """The adapter names an engine command loads (vLLM ``--lora-modules name=source ...``,
    SGLang ``--lora-paths name=path ...``): what a replica booted with ``argv`` serves."""
    return frozenset(name for name, _ in command_adapters(argv))


class WorkloadSpec(StrictModel):
    """A declared serving workload. ``slug`` identifies it in its project."""

    name: Annotated[str, Field(min_length=1), _longest(MAX_NAME)]
    slug: str
    model: Annotated[str, Field(min_length=1), _longest(MAX_MODEL)]
    backend: Backend = Backend.VLLM
    task_type: TaskType = TaskType.TEXT2TEXT
    command: Annotated[str, _longest(MAX_COMMAND)] | None = None
    vllm_version: str | None = None
    worker_id: str | None = None
    model_memory_gib: (
        Annotated[
            float,
            Field(gt=0, allow_inf_nan=False),
            _at_most(MAX_MODEL_GIB),
        ]
        | None
    ) = None
    max_model_len: Annotated[int, Field(ge=16, le=10_000_000, strict=True), WHOLE] | None = None
    """The context length the engine serves and sizing reserves KV cache for (vLLM
    ``--max-model-len``, SGLang ``--context-length``); unset: the command's flag, else
    the model's own."""
    custom_chat_template: (
        Annotated[
            str,
            Field(min_length=1, max_length=MAX_CHAT_TEMPLATE, json_schema_extra={"pattern": r"\{"}),
        ]
        | None
    ) = None
    """A Jinja chat template the engine uses instead of the model's (``--chat-template``)."""
    llm_loras: Annotated[list[LoraAdapter], Field(max_length=MAX_LORAS)] = Field(
        default_factory=list
    )
    """LoRA adapters every replica loads at start (vLLM ``--enable-lora --lora-modules``,
    SGLang ``--enable-lora --lora-paths``); the gateway sends ``"model": <name>`` to the
    replicas booted with it, and lists them in ``/v1/models``."""
    hf_token_secret: Annotated[str, Field(pattern=SECRET_NAME_PATTERN)] | None = None
    """The name of a stored secret (``autoscaler secrets create``) holding the Hugging
    Face token this workload's replicas download the model with (``HF_TOKEN``); unset:
    the controller's own (``hf_token_file``, else ``$HF_TOKEN``). Only the name is ever
    shown; the value reaches replicas through the boot callback and their environment."""
    execution_policy: ExecutionPolicy = ExecutionPolicy.FIXED
    execution_policy_config: PolicyConfig = Field(
        default_factory=FixedPolicy, validate_default=True
    )
    endpoint_type: EndpointType | None = None
    """``sync``, ``streaming`` or ``async`` (see :class:`EndpointType`); unset: every
    route open."""
    per_worker: Annotated[int, Field(ge=1, le=MAX_PER_WORKER, strict=True), WHOLE] | None = None
    """Requests one replica serves at once: the gateway sends a replica no more (the rest
    wait in the workload's queue) and the autoscaler targets it per replica; unset: the
    gateway's per-replica cap."""
    labels: dict[str, str] = Field(default_factory=dict, json_schema_extra=LABELS_SCHEMA)
    """Free-form ``key: value`` tags (team, product, ...) with Kubernetes' label rules
    (:mod:`autoscaler.labels`): shown by ``get``, filtered by ``get -l``, exported on the
    metrics. Changing them never replaces a replica."""

    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """A missing ``execution_policy_config`` is checked like an empty one, so that a
        policy that needs one says what is missing instead of falling back to fixed."""
        if isinstance(data, Mapping) and data.get("execution_policy_config") is None:
            return {**data, "execution_policy_config": None}
        return data

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in BACKENDS:
            raise PydanticCustomError(
                "unknown_backend",
                "unknown backend {value}{hint}; allowed: {allowed}",
                {
                    "value": repr(value),
                    "hint": _suggest(value, list(BACKENDS)),
                    "allowed": ", ".join(BACKENDS),
                },
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("name", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG_RE.fullmatch(value):
            raise ValueError(
                f"slug {value!r} must be a lowercase DNS label: a-z, 0-9 and '-', "
                "at most 63 characters, starting and ending with a letter or digit"
            )
        return value

    @field_validator("execution_policy_config", mode="wrap")
    @classmethod
    def _policy_config(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        policy = info.data.get("execution_policy")
        if policy is None:  # execution_policy itself was invalid; it has its own error
            return handler(value)
        config_type = POLICY_CONFIG_TYPES[policy]
        if isinstance(value, config_type):
            return value
        if value is None or value == {}:
            value = _default_config(policy, worker_id=info.data.get("worker_id"))
        if isinstance(value, BaseModel):
            raise PydanticCustomError(
                "policy_mismatch",
                "a {given} config does not fit execution_policy {policy}",
                {"given": type(value).__name__, "policy": repr(policy.value)},
            )
        return config_type.model_validate(value, context=info.context)

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        if self.vllm_version is not None and self.backend not in (
            Backend.VLLM,
            Backend.VLLM_OMNI,
        ):
            raise ValueError(
                f"vllm_version {self.vllm_version!r} applies only to backend vllm or "
                f"vllm-omni, not {self.backend.value!r}"
            )
        if self.task_type in OMNI_TASK_TYPES and self.backend is not Backend.VLLM_OMNI:
            raise ValueError(
                f"task_type {self.task_type.value!r} is served only by backend 'vllm-omni', "
                f"not {self.backend.value!r}"
            )
        config = self.execution_policy_config
        if (
            isinstance(config, AutoscalingPolicy)
            and isinstance(config.warm_pool, WarmPoolSpec)
            and config.warm_pool.sleeping
            and self.backend not in SLEEPING_BACKENDS
        ):
            raise ValueError(
                f"execution_policy_config.warm_pool.sleeping is {config.warm_pool.sleeping}, "
                f"but backend {self.backend.value!r} cannot sleep; allowed: 0, or backend "
                + " or ".join(repr(b.value) for b in sorted(SLEEPING_BACKENDS))
            )
        if (
            self.worker_id is not None
            and isinstance(config, AutoscalingPolicy)
            and config.cloud_pool is not None
        ):
            raise ValueError(
                f"worker_id {self.worker_id!r} pins the workload to a private worker; it "
                "conflicts with workers.cloud_pool (remove one of them)"
            )
        return self

    @field_validator("endpoint_type")
    @classmethod
    def _endpoint_type(cls, kind: EndpointType | None, info: ValidationInfo) -> Any:
        """Sync and streaming endpoints keep a replica at all times (a caller waits on
        the answer); job-only modalities cannot be one."""
        if kind is None or kind is EndpointType.ASYNC:
            return kind
        allowed = "use endpoint_type 'async', or leave endpoint_type unset"
        task = info.data.get("task_type")
        if isinstance(task, TaskType) and task in JOB_ONLY_TASK_TYPES:
            raise ValueError(
                f"endpoint_type {kind.value!r} answers live requests, but task_type "
                f"{task.value!r} is served only as async jobs: {allowed}"
            )
        config = info.data.get("execution_policy_config")
        need = f"endpoint_type {kind.value!r} needs at least one replica at all times"
        if isinstance(config, AutoscalingPolicy) and config.min_workers < 1:
            raise PydanticCustomError(
                "endpoint_type_min_workers",
                "{need}: execution_policy_config.min_workers is {value}, allowed: 1 or "
                "more (or {allowed})",
                {"need": need, "value": config.min_workers, "allowed": allowed},
            )
        if isinstance(config, FixedPolicy) and config.replicas < 1:
            raise PydanticCustomError(
                "endpoint_type_min_workers",
                "{need}: execution_policy_config.replicas is 0, allowed: 1 or more (or {allowed})",
                {"need": need, "allowed": allowed},
            )
        if isinstance(config, ScheduledPolicy):
            raise PydanticCustomError(
                "endpoint_type_schedule",
                "{need}, and execution_policy 'scheduled' runs none outside its schedule; "
                "allowed: execution_policy 'fixed' or 'autoscaling' with min_workers >= 1 "
                "(or {allowed})",
                {"need": need, "allowed": allowed},
            )
        return kind

    @field_validator("max_model_len", "custom_chat_template")
    @classmethod
    def _engine_option(cls, value: Any, info: ValidationInfo) -> Any:
        """Engine options checked against the backend and the command, naming the field."""
        if value is None:
            return None
        name = info.field_name or ""
        if info.data.get("backend") is Backend.OLLAMA:
            raise ValueError(
                f"{name} applies to backends vllm, sglang and vllm-omni; ollama takes its "
                "context and template from the model's Modelfile"
            )
        if name == "custom_chat_template" and "{" not in value:
            raise ValueError(
                'must be a Jinja template (e.g. "{% for m in messages %}{{ m.content }}'
                '{% endfor %}"), not a name or a path'
            )
        try:
            tokens = shlex.split(info.data.get("command") or "")
        except ValueError:
            return value  # admission reports the command itself
        flags = CONTEXT_FLAGS if name == "max_model_len" else ("--chat-template",)
        said = [t.split("=", 1)[0] for t in tokens if t.split("=", 1)[0] in flags]
        if said:
            raise ValueError(f"the command's {said[0]} sets it too: give it once")
        return value

    @field_validator("hf_token_secret", mode="before")
    @classmethod
    def _secret_name(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(SECRET_NAME_PATTERN, value):
            raise PydanticCustomError(
                "secret_name",
                "secret name {value} is not allowed; allowed: {rule}",
                {"value": repr(value), "rule": SECRET_NAME_RULE},
            )
        return value

    @field_validator("llm_loras")
    @classmethod
    def _llm_loras(cls, value: list[LoraAdapter], info: ValidationInfo) -> list[LoraAdapter]:
        """Adapters need an engine that serves them, distinct names that are not the base
        model's, and a command that does not set the adapter flags itself."""
        if not value:
            return value
        backend = info.data.get("backend")
        if isinstance(backend, Backend) and backend.value not in LORA_BACKENDS:
            why = (
                "ollama takes an adapter only inside a model built from a Modelfile "
                "(ADAPTER); serve that model instead"
                if backend is Backend.OLLAMA
                else "vllm-omni serves its models without adapters"
            )
            raise ValueError(
                f"llm_loras needs backend {' or '.join(map(repr, LORA_BACKENDS))}, not "
                f"{backend.value!r}: {why}"
            )
        seen: set[str] = set()
        for i, adapter in enumerate(value):
            if adapter.name in seen:
                raise ValueError(
                    f"llm_loras[{i}].name {adapter.name!r} is given twice; allowed: a name "
                    "used once per workload"
                )
            seen.add(adapter.name)
            if adapter.name == info.data.get("model"):
                raise ValueError(
                    f"llm_loras[{i}].name {adapter.name!r} is the base model's name; "
                    "allowed: a name other than the model's"
                )
        try:
            tokens = shlex.split(info.data.get("command") or "")
        except ValueError:
            return value  # admission reports the command itself
        said = [t.split("=", 1)[0] for t in tokens if t.split("=", 1)[0] in LORA_FLAGS]
        if said:
            raise ValueError(
                f"the command's {said[0]} sets adapters too: give them once, in llm_loras"
            )
        return value

    @property
    def engine_command(self) -> str | None:
        """``command`` with ``max_model_len``, ``custom_chat_template`` and ``llm_loras``
        as the backend's flags: what the engine is started with, sizing reads and
        admission checks."""
        extra: list[str] = []
        sglang = self.backend is Backend.SGLANG
        if self.max_model_len is not None:
            flag = "--context-length" if sglang else "--max-model-len"
            extra += [flag, str(self.max_model_len)]
        if self.custom_chat_template is not None:
            extra += ["--chat-template", self.custom_chat_template]
        if self.llm_loras:
            count = str(len(self.llm_loras))
            extra += ["--enable-lora"]
            extra += ["--max-loras-per-batch", count] if sglang else ["--max-loras", count]
            extra += ["--lora-paths" if sglang else "--lora-modules"]
            extra += [f"{a.name}={a.source}" for a in self.llm_loras]
        if not extra:
            return self.command
        return " ".join(part for part in (self.command, shlex.join(extra)) if part)

    # -- identity -------------------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The spec as plain JSON values, defaults filled in: what is stored and hashed."""
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def replica_identity(self) -> dict[str, Any]:
        """What a replica boots, and where it may run: two specs with the same identity
        differ only in how many replicas run and when (counts, latency bounds, windows,
        timeouts, ceilings, schedules), so an edit between them keeps every replica.

        The model, command, backend, version pin, task type, memory hint, context length,
        chat template, adapters, the pinned worker and the pool (source, GPU names, CUDA pins,
        private workers, regions, the spot market) are the identity; the pool's ceilings
        are not.
        """
        policy = self.execution_policy_config
        pool: dict[str, Any] | None = None
        if isinstance(policy, AutoscalingPolicy):
            cloud = policy.cloud_pool
            pool = {
                "source": "private" if policy.private_worker_ids else "cloud",
                "gpu_pool": None if cloud is None else cloud.gpu_pool,
                "allowed_cuda_versions": None if cloud is None else cloud.allowed_cuda_versions,
                "private_worker_ids": policy.private_worker_ids,
                "regions": policy.regions,
                "allow_spot_instances": policy.allow_spot_instances,
            }
        return {
            **self.model_dump(
                mode="json",
                include={
                    "model",
                    "command",
                    "backend",
                    "vllm_version",
                    "task_type",
                    "model_memory_gib",
                    "max_model_len",
                    "custom_chat_template",
                    "llm_loras",
                    "worker_id",
                },
            ),
            "pool": pool,
        }


class WorkloadDocument(WorkloadSpec):
    """One document of a workload file: the spec's fields plus an optional ``on_drift``."""

    on_drift: OnDrift = OnDrift.RECONCILE

    def spec(self) -> WorkloadSpec:
        return WorkloadSpec.model_validate(self.model_dump(exclude={"on_drift"}))


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` with a JSON merge patch (RFC 7396) applied: objects merge key by key,
    ``null`` removes a key, anything else (lists included) replaces the value."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            before = merged.get(key)
            merged[key] = merge_patch(before if isinstance(before, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def spec_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Field-level differences between two canonical specs, as dotted paths."""
    return [
        {"path": path, "old": before, "new": after}
        for path, before, after in _walk_diff(old, new, prefix="")
    ]


def _walk_diff(old: Any, new: Any, *, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            yield from _walk_diff(old.get(key), new.get(key), prefix=path)
    elif old != new:
        yield prefix, old, new


DEFAULT_MAX_REPLICAS = 100
"""The most replicas one workload may ask for (``replicas``, ``max_workers``) unless the
service is configured otherwise (``max_replicas_per_workload`` in the controller's
configuration). A bound the service states, so that one file cannot ask the controller
to plan, buy and track millions of machines."""


def limit_errors(spec: WorkloadSpec, *, max_replicas: int) -> list[dict[str, Any]]:
    """Where ``spec`` asks for more replicas than this service allows, as
    ``{path, message, value}`` (the shape of :func:`describe_errors`); empty when within."""
    config = spec.execution_policy_config
    field_name = "max_workers" if isinstance(config, AutoscalingPolicy) else "replicas"
    asked = config.max_workers if isinstance(config, AutoscalingPolicy) else config.replicas
    if asked <= max_replicas:
        return []
    return [
        {
            "path": f"execution_policy_config.{field_name}",
            "message": f"{field_name} {asked} is above this service's maximum of "
            f"{max_replicas} replicas per workload (max_replicas_per_workload)",
            "value": asked,
        }
    ]


def describe_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Validation errors as ``{path, message, value}``: what was wrong and where."""
    details: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(p) for p in _drop_union_tags(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        details.append({"path": path or "(root)", "message": message, "value": _jsonable(value)})
    return details


def _jsonable(value: Any) -> Any:
    """``value`` as the error may echo it: itself where it is strict JSON (no NaN or
    infinity, which no JSON parser takes back), else its ``repr``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def deprecations(raw: Mapping[str, Any]) -> list[str]:
    """Notices for deprecated forms in a raw workload document (accepted, but warned of)."""
    notices: list[str] = []
    config = raw.get("execution_policy_config")
    if isinstance(config, Mapping) and "gpu_pool" in config:
        notices.append(
            "execution_policy_config.gpu_pool is deprecated: write "
            "workers: {source: cloud, cloud_pool: {gpu_pool: [...]}} (it can carry CUDA pins)"
        )
    return notices


def _drop_union_tags(loc: tuple[int | str, ...]) -> list[int | str]:
    # pydantic puts the chosen tag of a tagged union in the path ("workers.cloud.…");
    # users never wrote it, so the path they see leaves it out.
    return [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "workers" and p in _TAGS)]


_TAGS = frozenset({"cloud", "private"})
