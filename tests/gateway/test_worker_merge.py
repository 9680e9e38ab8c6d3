"""Several gateway processes' windows, merged, read as one gateway that saw every
request; and each process's share of a replica's cap."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime

import pytest

from autoscaler.decide.inputs import measured_of
from autoscaler.decide.scaling import ttft_percentile
from autoscaler.spec import TaskType
from gateway.dispatch import Dispatcher, DispatchLimits
from gateway.routes import Replica, WorkloadRef, WorkloadRoute
from gateway.signals import Metrics, Signals
from gateway.window import (
    SignalSnapshot,
    SignalsView,
    WorkloadWindow,
    gateway_cap,
    merge_views,
    worker_share,
)
from gateway.workers import MetricsMerge, merge_metrics, resolve_workers

REF: WorkloadRef = ("acme", "chat")
NOW = 1_000_000.0


def _record(window: WorkloadWindow, rng: random.Random, at: float, *, replica: str) -> None:
    window.arrived(now=at)
    window.enter(replica)
    window.ttft.append((at + 0.1, rng.uniform(0.05, 3.0)))
    window.add_tokens(
        now=at + 0.2,
        input_tokens=rng.randint(10, 4000),
        output_tokens=rng.randint(1, 900),
        cached_tokens=rng.randint(0, 10),
    )


def _snapshot(window: WorkloadWindow) -> SignalSnapshot:
    return window.snapshot(
        project=REF[0], workload=REF[1], now=NOW, window_sec=900.0, concurrency_cap=64
    )


def test_merged_windows_read_as_one_gateway_that_saw_every_request() -> None:
    """300 requests spread unevenly over three workers, against the same requests in one
    window: counts add up, the TTFT samples are the same (so is their p95, taken over
    every request, not an average of three p95s), the token mix is the pooled one."""
    rng = random.Random(7)
    whole, parts = WorkloadWindow(), [WorkloadWindow() for _ in range(3)]
    for i in range(300):
        at = NOW - 800 + i
        replica = f"lch_{i % 4}"
        seed = rng.random()
        _record(whole, random.Random(seed), at, replica=replica)
        _record(parts[0 if i % 5 < 3 else 1 + i % 2], random.Random(seed), at, replica=replica)
    whole.queued = 3
    parts[0].queued, parts[2].queued = 1, 2
    for w in (whole, *parts):
        w.async_queue_depth = 5  # read from the store: the same in every process

    merged = merge_views([[_snapshot(p)] for p in parts])[REF]
    one = _snapshot(whole)

    assert merged.requests_in_window == one.requests_in_window == 300
    assert merged.in_flight == one.in_flight == 300
    assert merged.replica_in_flight == one.replica_in_flight
    assert merged.queued == 3 and merged.async_queue_depth == 5
    assert merged.ttft_samples == one.ttft_samples
    since = datetime.fromtimestamp(NOW - 600, UTC)
    up = measured_of(merged).signals.ttft_samples
    assert ttft_percentile(up, q=0.95, since=since) == ttft_percentile(
        measured_of(one).signals.ttft_samples, q=0.95, since=since
    )
    averaged = sum(
        ttft_percentile(measured_of(_snapshot(p)).signals.ttft_samples, q=0.95, since=since) or 0
        for p in parts
    ) / len(parts)
    assert ttft_percentile(up, q=0.95, since=since) != pytest.approx(averaged, rel=1e-9)
    assert merged.tokens is not None and one.tokens is not None
    assert merged.tokens.requests == one.tokens.requests
    for name in ("input_mean", "input_std", "output_mean", "output_std", "cached_mean"):
        assert getattr(merged.tokens, name) == pytest.approx(getattr(one.tokens, name))
    assert merged.concurrency_cap == 64
    assert merged.last_request_at == one.last_request_at


def test_a_workload_only_one_worker_has_seen_is_that_workers_view() -> None:
    seen = WorkloadWindow()
    _record(seen, random.Random(1), NOW - 1, replica="lch_a")
    other = WorkloadWindow()
    _record(other, random.Random(2), NOW - 1, replica="lch_b")
    views = merge_views(
        [
            [_snapshot(seen)],
            [
                other.snapshot(
                    project="acme",
                    workload="other",
                    now=NOW,
                    window_sec=900.0,
                    concurrency_cap=None,
                )
            ],
        ]
    )
    assert set(views) == {REF, ("acme", "other")}
    assert views[REF].replica_in_flight == {"lch_a": 1}


def test_metrics_of_workers_are_summed_series_by_series() -> None:
    """Two workers' registries: counters and histograms add up; the async queue depth,
    which every worker reads from the store, is not counted twice."""
    texts = []
    for served in (3, 5):
        signals = Signals(window_sec=60.0, metrics=Metrics())
        children = signals.metrics_of(REF)
        for _ in range(served):
            children.requests(200).inc()
            children.ttft.observe(0.2)
        signals.set_job_queues({REF: (4, NOW)})
        from prometheus_client import generate_latest

        texts.append(generate_latest(signals.metrics.registry).decode())
    merged = merge_metrics(texts).decode()
    assert (
        'autoscaler_gateway_requests_total{project="acme",status="200",workload="chat"} 8.0'
        in merged
    )
    assert 'autoscaler_gateway_ttft_seconds_count{project="acme",workload="chat"} 8.0' in merged
    assert (
        'autoscaler_gateway_ttft_seconds_bucket{le="0.25",project="acme",workload="chat"} 8.0'
        in merged
    )
    assert 'autoscaler_gateway_async_queue_depth{project="acme",workload="chat"} 4.0' in merged


def test_each_worker_takes_its_share_of_a_replica_cap() -> None:
    assert worker_share(64, 1) == 64
    assert worker_share(64, 2) == 32
    assert worker_share(5, 2) == 2  # never more than the cap in all
    assert worker_share(1, 4) == 1  # the floor: every worker can serve
    # What the workers send a replica together, which they report as its cap.
    assert gateway_cap(64, 1) == 64
    assert gateway_cap(64, 3) == 63
    assert gateway_cap(10, 4) == 8
    assert gateway_cap(2, 4) == 4  # the floor again: the cap is exceeded
    assert resolve_workers("auto", cpus=6) == 6
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        resolve_workers(0)


async def test_a_worker_sends_a_replica_at_most_its_share_of_the_cap() -> None:
    """per_worker 4 over 2 workers: this worker leases the replica twice, then waits."""
    dispatcher = Dispatcher(
        limits=DispatchLimits(
            replica_concurrency_cap=64,
            max_queued_per_workload=8,
            queue_timeout_sec=30.0,
            cold_start_timeout_sec=lambda _: 30.0,
            cold_start_retry_after_sec=1.0,
            refused_cooldown_sec=1.0,
            workers=2,
        ),
        signals=Signals(window_sec=60.0, metrics=Metrics()),
        on_cold_start=lambda _: None,
        rng=random.Random(0),
    )
    replica = Replica(key="r", url="http://r", engine_key=None, draining=False)
    route = WorkloadRoute(
        ref=REF,
        workload_id=1,
        model="m",
        task_type=TaskType.TEXT2TEXT,
        replicas=(replica,),
        last_request_at=None,
        per_worker=4,
    )
    dispatcher.update({REF: route})
    leases = [await dispatcher.acquire(REF) for _ in range(2)]
    assert not dispatcher.has_room(REF)
    third = asyncio.create_task(dispatcher.acquire(REF))
    await asyncio.sleep(0)
    assert dispatcher.queued(REF) == 1
    dispatcher.release(leases[0])
    assert (await asyncio.wait_for(third, 5)).replica.key == "r"


def _metrics_text(served: int, *, in_flight: int = 0) -> str:
    """One worker's registry after answering ``served`` requests, ``in_flight`` running."""
    from prometheus_client import generate_latest

    signals = Signals(window_sec=60.0, metrics=Metrics())
    children = signals.metrics_of(REF)
    for _ in range(served):
        children.requests(200).inc()
        children.ttft.observe(0.2)
    window = signals.window(REF)
    for i in range(in_flight):
        window.enter(f"lch_{i}")
    return generate_latest(signals.metrics.registry).decode()


def _series(text: bytes, name: str) -> float:
    prefix = name + "{"
    for line in text.decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the merged metrics")


def test_merged_counters_stay_monotonic_when_a_worker_dies_and_is_replaced() -> None:
    """Worker 0 answers 3 requests, worker 1 answers 5; worker 0 dies (no answer), then
    a new process in its slot answers 1: the merged count goes 8, 8, 9, never back to
    6; its histogram too. Its requests in flight (a gauge) died with it."""
    merge = MetricsMerge(2)
    requests, ttft, in_flight = (
        "autoscaler_gateway_requests_total",
        "autoscaler_gateway_ttft_seconds_count",
        "autoscaler_gateway_in_flight_requests",
    )
    first = merge.merge([("a", _metrics_text(3, in_flight=2)), ("b", _metrics_text(5))])
    assert _series(first, requests) == 8 and _series(first, ttft) == 8
    assert _series(first, in_flight) == 2
    gone = merge.merge([None, ("b", _metrics_text(5))])
    assert _series(gone, requests) == 8 and _series(gone, ttft) == 8
    assert _series(gone, in_flight) == 0
    back = merge.merge([("c", _metrics_text(1)), ("b", _metrics_text(5))])
    assert _series(back, requests) == 9 and _series(back, ttft) == 9
    again = merge.merge([("c", _metrics_text(2)), ("b", _metrics_text(6))])
    assert _series(again, requests) == 11
    # Summed as they are, the replacement's zero would read as a counter reset.
    assert _series(merge_metrics([_metrics_text(1), _metrics_text(5)]), requests) == 6


def test_a_read_that_missed_a_worker_says_so_over_json() -> None:
    window = WorkloadWindow()
    _record(window, random.Random(3), NOW - 1, replica="lch_a")
    missing = "1 of 4 gateway workers did not answer (worker 2)"
    view = SignalsView({REF: _snapshot(window)}, incomplete=missing)
    back = SignalsView.from_json(json.loads(json.dumps(view.to_json())))
    assert back.incomplete == missing
    assert back.snapshots[REF] == view.snapshots[REF]
    # A gateway that predates the field read one process: complete.
    assert SignalsView.from_json({"signals": []}).incomplete is None
