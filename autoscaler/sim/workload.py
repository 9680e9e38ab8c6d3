"""The workload a simulation serves: its spec, model size, context, and SLO rule."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from autoscaler.decide.inputs import model_size
from autoscaler.spec import AutoscalingPolicy, WorkloadDocument, WorkloadSpec, describe_errors
from catalog.model import Offer
from catalog.perf import ModelDoesNotFit, ServingProfile, serving_profile
from catalog.query import OfferRequest, select_offers
from catalog.sizing import (
    KNOWN_MODELS,
    BatchLimits,
    command_batch_limits,
    command_context,
    command_line_flags,
)

LLAMA3_CONTEXT_TOKENS = 131_072
"""Context of a model the sizing table knows no limit for: Llama 3.1's 128k."""

SLO_PREFILL_FACTOR = 1.5
"""A request meets the SLO when TTFT <= max(target, this x its prefill on the fastest GPU)."""


class WorkloadFileError(ValueError):
    """A workload file the simulator cannot use; says which file and what is wrong."""


@dataclass(frozen=True, slots=True)
class SimWorkload:
    """A workload spec with what the simulator derives from it."""

    spec: WorkloadSpec
    params_b: float
    bytes_per_param: float
    max_context_tokens: int
    batch_limits: BatchLimits = field(default_factory=BatchLimits)
    """The step token budget and sequence cap the command sets, as engine-sim reads them."""

    @property
    def autoscaling(self) -> AutoscalingPolicy | None:
        policy = self.spec.execution_policy_config
        return policy if isinstance(policy, AutoscalingPolicy) else None

    def profile(self, offer: Offer) -> ServingProfile:
        return serving_profile(
            offer.gpu,
            offer.gpu_count,
            self.params_b,
            self.bytes_per_param,
            max_batch=self.batch_limits.max_num_seqs,
            max_batched_tokens=self.batch_limits.max_batched_tokens,
        )


def load_workload(path: Path) -> SimWorkload:
    """Read a workload YAML (or JSON) file the way ``autoscaler apply`` reads one."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkloadFileError(f"cannot read workload {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise WorkloadFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise WorkloadFileError(f"{path}: expected one workload mapping, got {type(raw).__name__}")
    try:
        spec = WorkloadDocument.model_validate(raw).spec()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in describe_errors(exc)
        )
        raise WorkloadFileError(f"{path}: invalid workload: {problems}") from None
    return sim_workload(spec)


def sim_workload(spec: WorkloadSpec) -> SimWorkload:
    """Model size (billions of parameters, bytes each) and context for ``spec``."""
    size = model_size(spec)  # the controller's own reading (decide.inputs)
    if size is None:
        raise WorkloadFileError(
            f"workload {spec.slug}: cannot tell the size of model {spec.model!r}; the "
            "simulator needs a parameter count in the model name (e.g. '-8B')"
        )
    return SimWorkload(
        spec=spec,
        params_b=size.params_b,
        bytes_per_param=size.bytes_per_param,
        max_context_tokens=_context(spec),
        batch_limits=_batch_limits(spec),
    )


def _batch_limits(spec: WorkloadSpec) -> BatchLimits:
    try:
        return command_batch_limits(command_line_flags(spec.engine_command))
    except ValueError as exc:
        raise WorkloadFileError(f"workload {spec.slug}: {exc}") from None


def _context(spec: WorkloadSpec) -> int:
    try:
        given = command_context(command_line_flags(spec.engine_command))
    except ValueError as exc:
        raise WorkloadFileError(f"workload {spec.slug}: {exc}") from None
    if given is not None:
        return given[0]
    name = spec.model.rsplit("/", 1)[-1].casefold()
    matches = [k for k in KNOWN_MODELS if re.search(re.escape(k), name)]
    if matches:
        known = KNOWN_MODELS[max(matches, key=len)]
        if known.max_context is not None:
            return known.max_context
    return LLAMA3_CONTEXT_TOKENS


def feasible_offers(workload: SimWorkload, offers: Iterable[Offer]) -> list[Offer]:
    """Catalog offers the workload may use (pool, regions, CUDA pins) that fit the model."""
    policy = workload.autoscaling
    pool = policy.cloud_pool if policy else None
    request = OfferRequest(
        gpus=tuple(pool.gpu_pool) if pool else (),
        regions=tuple(policy.regions or ()) if policy else (),
        cuda_versions=tuple(pool.allowed_cuda_versions or ()) if pool else (),
    )
    usable = []
    for candidate in select_offers(offers, request).feasible:
        try:
            workload.profile(candidate.offer)
        except ModelDoesNotFit:
            continue
        except ValueError:
            continue  # no performance figures for this GPU: the simulator cannot serve on it
        usable.append(candidate.offer)
    return usable


def fastest_single_gpu(workload: SimWorkload, offers: Iterable[Offer]) -> ServingProfile:
    """One GPU of the fastest-prefilling kind among the offers the workload may use."""
    best: ServingProfile | None = None
    for offer in feasible_offers(workload, offers):
        try:
            profile = serving_profile(offer.gpu, 1, workload.params_b, workload.bytes_per_param)
        except ValueError:
            continue  # the model needs more than one of this GPU
        if best is None or profile.prefill_tokens_per_s > best.prefill_tokens_per_s:
            best = profile
    if best is None:
        raise WorkloadFileError(
            f"workload {workload.spec.slug}: no offer in the catalog fits the model on one GPU "
            "of its pool; the SLO rule needs one"
        )
    return best


@dataclass(frozen=True, slots=True)
class SloRule:
    """When a request meets the SLO.

    Flat: TTFT <= ``target_s``. Per request: TTFT <= max(``target_s``,
    :data:`SLO_PREFILL_FACTOR` x the prompt's prefill time alone on ``fastest``), because
    no fleet can answer a long prompt faster than one GPU prefills it.
    """

    target_s: float
    fastest: ServingProfile

    def bound_s(self, input_tokens: int) -> float:
        return _bound_s(self.target_s, self.fastest, input_tokens)

    def met(self, *, ttft_s: float, input_tokens: int) -> bool:
        return ttft_s <= self.bound_s(input_tokens)

    def bounds(self) -> dict[int, float]:
        """:meth:`bound_s` by prompt length, filled as asked (``bounds[tokens]``): for
        loops over every request of a replay, where a lookup in it costs a tenth of a
        call to :meth:`bound_s`."""
        return _Bounds(self)


class _Bounds(dict[int, float]):
    """:meth:`SloRule.bounds`."""

    def __init__(self, rule: SloRule) -> None:
        super().__init__()
        self.rule = rule

    def __missing__(self, input_tokens: int) -> float:
        bound = self[input_tokens] = self.rule.bound_s(input_tokens)
        return bound


@functools.lru_cache(maxsize=65536)
def _bound_s(target_s: float, fastest: ServingProfile, input_tokens: int) -> float:
    """:meth:`SloRule.bound_s`, remembered: a day's replay asks it for every request,
    the oracle for every request of every slot it sizes."""
    return max(target_s, SLO_PREFILL_FACTOR * fastest.prefill_seconds(input_tokens))
