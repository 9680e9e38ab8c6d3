"""``autoscaler describe``'s start times: each offer's median seconds to ready per path."""

from __future__ import annotations

from typing import Any

from autoscaler.cli.workloads import start_times_summary


def _replica(offer: str, path: str, seconds: float) -> dict[str, Any]:
    return {"offer": offer, "start": {"path": path, "seconds": seconds}}


def test_describe_shows_measured_start_times_per_offer_and_path() -> None:
    replicas = [
        _replica("aws/us-east-1a/g5.xlarge", "launch", 190.0),
        _replica("aws/us-east-1a/g5.xlarge", "launch", 170.0),
        _replica("aws/us-east-1a/g5.xlarge", "start", 61.0),
        _replica("aws/us-east-1a/g6.xlarge", "wake", 2.4),
        {"offer": "aws/us-east-1a/g6.xlarge", "start": None},  # booting: no sample yet
    ]
    assert start_times_summary(replicas) == [
        "aws/us-east-1a/g5.xlarge: launch 180s (n=2), start 61s (n=1)",
        "aws/us-east-1a/g6.xlarge: wake 2s (n=1)",
    ]
    assert start_times_summary([{"offer": "x", "start": None}]) == []
