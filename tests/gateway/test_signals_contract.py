"""The gateway's snapshot carries each replica's requests in flight to the controller,
in process and as JSON, and a gateway that predates the count reads as "not reported"."""

from __future__ import annotations

from prometheus_client import generate_latest

from autoscaler.decide.inputs import measured_of
from gateway.signals import Metrics, Signals
from gateway.window import SignalSnapshot

REF = ("acme", "bot")


def test_requests_in_flight_are_counted_per_replica_and_reach_the_controller() -> None:
    signals = Signals(window_sec=900.0, metrics=Metrics())
    window = signals.window(REF)
    window.enter("l-1")
    window.enter("l-1")
    window.enter("l-2")
    window.leave("l-2")
    snapshot = signals.snapshot(now=1_000.0)[REF]
    assert snapshot.in_flight == 2
    assert snapshot.replica_in_flight == {"l-1": 2}  # a replica with none is left out

    again = SignalSnapshot.from_json(snapshot.to_json())
    measured = measured_of(again)
    assert measured.replica_in_flight == {"l-1": 2}
    assert measured.signals.in_flight == 2

    # Prometheus reads the same count when it scrapes.
    series = 'autoscaler_gateway_in_flight_requests{project="acme",workload="bot"}'
    assert f"{series} 2.0" in generate_latest(signals.metrics.registry).decode()
    window.leave("l-1")
    assert f"{series} 1.0" in generate_latest(signals.metrics.registry).decode()


def test_a_snapshot_without_the_per_replica_count_reads_as_not_reported() -> None:
    data = Signals(window_sec=900.0, metrics=Metrics()).snapshot(now=1.0)
    assert data == {}
    old = SignalSnapshot(
        project="acme",
        workload="bot",
        at=1.0,
        window_sec=900.0,
        ttft_samples=(),
        requests_in_window=0,
        in_flight=3,
        queued=0,
        cold_start_waiting=0,
        async_queue_depth=0,
        last_request_at=None,
    ).to_json()
    del old["replica_in_flight"]
    assert measured_of(SignalSnapshot.from_json(old)).replica_in_flight is None
