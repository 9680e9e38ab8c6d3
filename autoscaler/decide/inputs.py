"""From what the gateway measured to what the decisions take: one mapping, shared.

The controller (``autoscaler.reconcile.workload``) and the trace simulator
(``autoscaler.sim.world``) both call :func:`decision_inputs`, so the simulation measures
the controller that ships. It turns the measured token mix, the fleet's GPU shapes and
the model's size into:

* ``capacity``: one replica's :class:`~autoscaler.decide.queueing.ReplicaCapacity` for
  ``decide.desired.desired_count`` — ``catalog.perf.serving_profile`` for the GPU shape
  most of the live fleet runs on (placement's choice for a first replica when there is
  no fleet) and the model's parameter count, its batch limited to the gateway's
  per-replica concurrency cap, at the measured mean prompt and completion lengths
  (placement's defaults while nothing has been measured), with the prefill time of the
  mean prompt alone and the spread of prompt lengths (variance over squared mean);
* ``input_tokens`` / ``output_tokens``: the measured means for
  ``decide.placement.place_replica`` (``None`` while nothing has been measured, so
  placement applies no prefill budget).

:func:`model_size` reads the model's parameter count and bytes per parameter from a
workload spec (``catalog.sizing``), the figures ``catalog.perf`` needs.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

from autoscaler.decide.placement import DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS
from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.signals import Signals
from autoscaler.spec import EndpointType, WorkloadSpec
from catalog.model import Offer
from catalog.perf import fastest_single_gpu, serving_profile
from catalog.sizing import GIB, QUANT_PATTERNS, command_line_flags, estimate_model_memory
from gateway.window import REPLICA_CONCURRENCY_CAP, SignalSnapshot, replica_cap

DEFAULT_CONCURRENCY_CAP = REPLICA_CONCURRENCY_CAP
"""The gateway's default per-replica concurrency cap (``gateway.window``), used when a
measurement does not say which cap the gateway runs with."""

DEFAULT_PREFILL_SCV = 1.0
"""The prompt-length spread assumed before one is measured: as spread as an exponential."""

GpuShape = tuple[str, int]
"""One replica's machine for the performance model: (GPU display name, GPU count)."""


@dataclass(frozen=True, slots=True)
class TokenMix:
    """Mean prompt (input) and completion (output) tokens per request, as measured."""

    input_tokens: float
    output_tokens: float
    input_scv: float | None = None
    """The spread of prompt lengths: their variance over their squared mean (``None``:
    not measured)."""
    cached_share: float = 0.0
    """Share of prompt tokens the engines found in their prefix caches (the measured hit
    rate): those tokens cost no prefill, so a replica's capacity counts only the rest."""
    input_histogram: Mapping[int, int] = field(default_factory=dict)
    """The measured prompt lengths by bucket (``gateway.window.prompt_bucket``; empty: not
    reported): the tail itself, where ``input_scv`` only models it."""

    @property
    def prefilled_tokens(self) -> float:
        """Mean prompt tokens a replica actually prefills: the uncached ones."""
        return self.input_tokens * (1.0 - self.cached_share)

    @classmethod
    def of(
        cls, pair: tuple[float, float] | None, *, input_scv: float | None = None
    ) -> TokenMix | None:
        """A mix from ``(input, output)`` means, or ``None`` for no measurement."""
        if pair is None:
            return None
        return cls(input_tokens=pair[0], output_tokens=pair[1], input_scv=input_scv)


@dataclass(frozen=True, slots=True)
class Measured:
    """What the gateway measured for one workload: the scaling signals, the token mix
    over its window (``None``: no request answered in it) and the per-replica
    concurrency cap it enforces (``None``: not reported; the default is assumed)."""

    signals: Signals = field(default_factory=Signals)
    token_mix: TokenMix | None = None
    concurrency_cap: int | None = None
    replica_in_flight: Mapping[str, int] | None = None
    """Requests in flight per replica, by launch id (``None``: not reported; a replica
    absent from a report has none)."""
    replica_cache_blocks: Mapping[str, int] = field(default_factory=dict)
    """Prefix-cache blocks the gateway believes each replica holds (absent: none)."""
    incomplete: str | None = None
    """Why the read this comes from did not reach the whole gateway (a worker process
    that did not answer, a read that failed), ``None`` when it did. Its counts are then
    lower bounds: requests on the part not read are in none of them, so a replica's
    requests in flight are not known (``decide.step.in_flight_of``)."""


_IDLE = Measured()


@dataclass(frozen=True, slots=True)
class SignalsRead:
    """One read of the gateway's signals: each workload's measurement, and, when the
    read did not reach the whole gateway, why (``incomplete``; ``None``: complete).

    A workload the read has nothing for looks idle when the read is complete; when it
    is not, its measurement says so (:meth:`of`), since its requests may all be on the
    part not read. The trace simulator's reads are always complete."""

    measured: Mapping[tuple[str, str], Measured] = field(default_factory=dict)
    incomplete: str | None = None

    def of(self, ref: tuple[str, str]) -> Measured:
        """``ref``'s measurement (idle when there is none), marked incomplete with the read."""
        found = self.measured.get(ref, _IDLE)
        if self.incomplete is None or found.incomplete is not None:
            return found
        return replace(found, incomplete=self.incomplete)


def signals_of(snapshot: SignalSnapshot, *, samples_since: float | None = None) -> Signals:
    """``decide`` signals from a gateway ``SignalSnapshot``.

    ``samples_since`` (epoch seconds) leaves out the TTFT and unstreamed samples before
    it: the rules read none older than their longest window, and a busy workload's
    window holds thousands (the trace simulator converts only those it reads).
    """
    ttft, unstreamed = snapshot.ttft_samples, snapshot.unstreamed_samples
    if samples_since is not None:
        ttft = ttft[_first_at(ttft, samples_since) :]
        unstreamed = unstreamed[_first_at(unstreamed, samples_since) :]
    return Signals.from_epoch(
        ttft_samples=ttft,
        request_rate=snapshot.request_rate,
        in_flight=snapshot.in_flight,
        queue_depth=snapshot.queued + snapshot.async_queue_depth,
        last_request_at=snapshot.last_request_at,
        unstreamed_samples=unstreamed,
        oldest_queued_at=snapshot.async_oldest_at,
    )


def _first_at(samples: tuple[tuple[float, float], ...], since: float) -> int:
    """The index of the first sample at or after ``since`` (samples are in time order)."""
    return bisect_left(samples, since, key=lambda sample: sample[0])


def measured_of(snapshot: SignalSnapshot, *, samples_since: float | None = None) -> Measured:
    """Signals, token mix and concurrency cap from a gateway ``SignalSnapshot``: what the
    controller reads of the gateway, in process or as JSON, and the simulator of its own
    simulated gateway (``samples_since``: :func:`signals_of`)."""
    tokens = snapshot.tokens
    mix = None
    if tokens is not None and tokens.requests > 0:
        mix = TokenMix(
            input_tokens=tokens.input_mean,
            output_tokens=tokens.output_mean,
            input_scv=tokens.input_scv,
            cached_share=tokens.cached_share,
            input_histogram=tokens.input_histogram,
        )
    return Measured(
        signals=signals_of(snapshot, samples_since=samples_since),
        token_mix=mix,
        concurrency_cap=snapshot.concurrency_cap,
        replica_in_flight=snapshot.replica_in_flight,
        replica_cache_blocks=snapshot.replica_cache_blocks,
    )


@dataclass(frozen=True, slots=True)
class ModelSize:
    """The model's size as ``catalog.perf`` takes it."""

    params_b: float
    bytes_per_param: float = 2.0


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """What ``desired_count`` (``capacity``) and ``place_replica`` (the token means) take."""

    capacity: ReplicaCapacity | None
    input_tokens: float | None
    output_tokens: float | None
    shape: GpuShape | None = None
    """The GPU shape the capacity was figured for."""


@overload
def shape_of(offer: Offer) -> GpuShape: ...
@overload
def shape_of(offer: None) -> None: ...
@overload
def shape_of(offer: Offer | None) -> GpuShape | None: ...
def shape_of(offer: Offer | None) -> GpuShape | None:
    """The GPU shape of ``offer`` (``None`` for none)."""
    return None if offer is None else (offer.gpu, offer.gpu_count)


def decision_inputs(
    *,
    mix: TokenMix | None,
    model: ModelSize | None,
    fleet: Sequence[GpuShape],
    next_shape: Callable[[], GpuShape | None],
    concurrency_cap: int | None,
    pool_gpus: Iterable[str] = (),
) -> DecisionInputs:
    """The decision inputs for one workload, by the rules in the module docstring.

    ``fleet`` holds the GPU shape of each live replica (booting and draining included);
    ``next_shape`` is asked only when it is empty (placement's choice for a first
    replica); ``model`` is ``None`` when the model's size is unknown (no capacity).
    ``pool_gpus`` are the GPU kinds the workload may use: the capacity carries the mean
    prompt's prefill on one GPU of the fastest of them (the SLO's reference).
    """
    shape = Counter(fleet).most_common(1)[0][0] if fleet else next_shape()
    capacity = None
    if shape is not None and model is not None:
        capacity = replica_capacity(
            shape, model=model, mix=mix, concurrency_cap=concurrency_cap or DEFAULT_CONCURRENCY_CAP
        )
        fastest = fastest_single_gpu(pool_gpus, model.params_b, model.bytes_per_param)
        if capacity is not None and fastest is not None:
            tokens_in = mix.input_tokens if mix is not None else DEFAULT_INPUT_TOKENS
            capacity = replace(
                capacity, fastest_prefill_s=fastest.prefill_seconds(round(tokens_in))
            )
    return DecisionInputs(
        capacity=capacity,
        input_tokens=None if mix is None else mix.input_tokens,
        output_tokens=None if mix is None else mix.output_tokens,
        shape=shape,
    )


def concurrency_cap_of(spec: WorkloadSpec, measured: Measured) -> int:
    """The most requests the gateway sends one replica of ``spec`` at once: the cap the
    gateway reports, which is what its worker processes enforce together
    (``gateway.window.gateway_cap``: ``per_worker`` 10 over 4 workers is 4 times 2 is 8);
    where it reports none, the spec's ``per_worker``, else the gateway's default."""
    if measured.concurrency_cap is not None:
        return measured.concurrency_cap
    return replica_cap(spec.per_worker, DEFAULT_CONCURRENCY_CAP)


def concurrency_target(spec: WorkloadSpec, measured: Measured) -> int | None:
    """The requests per replica the autoscaler scales to (``decide.scaling``): the cap
    where the spec sets ``per_worker`` or serves only jobs (an async endpoint scales on
    its queue), else ``None`` (TTFT and load decide). Never above ``per_worker``, where
    the gateway's workers send a replica more than it (a cap below their count)."""
    if spec.per_worker is None and spec.endpoint_type is not EndpointType.ASYNC:
        return None
    cap = concurrency_cap_of(spec, measured)
    return cap if spec.per_worker is None else min(cap, spec.per_worker)


def replica_capacity(
    shape: GpuShape, *, model: ModelSize, mix: TokenMix | None, concurrency_cap: int
) -> ReplicaCapacity | None:
    """One replica's capacity on ``shape`` at ``mix``; ``None`` when the model does not
    fit the shape or the performance model has no figures for its GPU."""
    try:
        profile = serving_profile(shape[0], shape[1], model.params_b, model.bytes_per_param)
    except ValueError:  # ModelDoesNotFit, or no figures for the GPU
        return None
    # The gateway never sends a replica more than its cap, whatever the engine could batch.
    batch = min(profile.max_batch, concurrency_cap)
    # Cached prompt tokens skip prefill: a fleet whose routing finds its prefixes cached
    # serves more per replica, and needs fewer.
    tokens_in, tokens_out = (
        (mix.prefilled_tokens, mix.output_tokens)
        if mix is not None
        else (DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS)
    )
    rps = replace(profile, max_batch=batch).capacity_rps(
        input_tokens=tokens_in, output_tokens=tokens_out
    )
    scv = None if mix is None else mix.input_scv
    return ReplicaCapacity(
        requests_per_s=rps,
        output_tokens_per_s=rps * tokens_out,
        max_concurrency=batch,
        prefill_s=profile.prefill_seconds(round(tokens_in)),
        prefill_scv=DEFAULT_PREFILL_SCV if scv is None else scv,
    )


def model_size(spec: WorkloadSpec) -> ModelSize | None:
    """Billions of parameters and bytes per parameter of ``spec``'s model (from its name
    and its ``--dtype`` / ``--quantization`` flags); ``None`` when the name carries no
    parameter count the sizing table can read."""
    return _model_size(spec.model, spec.engine_command)


@functools.lru_cache(maxsize=1024)
def _model_size(model: str, engine_command: str | None) -> ModelSize | None:
    """:func:`model_size` by the two fields it reads: every pass asks it of every
    workload, and parsing the name and the command costs more than a pass's rules."""
    estimate = estimate_model_memory(model, engine_command)
    if estimate.weights_gib <= 0:
        return None
    bytes_per_param = _bytes_per_param(model, engine_command)
    params_b = estimate.weights_gib * GIB / 1e9 / bytes_per_param
    return ModelSize(params_b=round(params_b, 2), bytes_per_param=bytes_per_param)


def _bytes_per_param(model: str, engine_command: str | None) -> float:
    flags = command_line_flags(engine_command)
    text = " ".join([model.casefold(), flags.get("dtype", ""), flags.get("quantization", "")])
    for pattern, size, _label in QUANT_PATTERNS:
        if pattern.search(text):
            return size
    return 2.0
