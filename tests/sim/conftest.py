"""A small workload (Llama-3.1-8B on H100s) and synthetic traces with known answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from autoscaler.sim.trace import TraceRequest
from autoscaler.sim.workload import SimWorkload, load_workload
from autoscaler.sim.world import CloudSettings
from catalog.model import Offer
from catalog.snapshot import load_catalog

WORKLOAD_YAML = """\
name: Sim test
slug: sim-test
model: meta-llama/Llama-3.1-8B-Instruct
command: "--max-model-len 8192"
execution_policy: autoscaling
execution_policy_config:
  min_workers: 1
  max_workers: 6
  max_hourly_cost_usd: 200
  upper_allowed_latency_sec: 1.0
  lower_allowed_latency_sec: 0.2
  workers:
    source: cloud
    cloud_pool:
      gpu_pool: ["NVIDIA H100 80GB HBM3"]
"""

CALM_CLOUD = CloudSettings(stockout_probability=0.0, spot_interruptions_per_hour=0.0)


def write_trace(path: Path, requests: Sequence[TraceRequest]) -> Path:
    lines = ["arrival_s,input_tokens,output_tokens"]
    lines += [f"{r.arrival_s:.6f},{r.input_tokens},{r.output_tokens}" for r in requests]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def constant(
    *, rps: float, seconds: float, tokens_in: int = 200, tokens_out: int = 10
) -> list[TraceRequest]:
    count = int(rps * seconds)
    return [TraceRequest(k / rps, tokens_in, tokens_out) for k in range(count)]


def ramp(seconds: float = 600.0) -> list[TraceRequest]:
    """Load that grows from 1 to 12 requests/s of 5,000-token prompts (60k tokens/s of
    prefill at the top: two H100s' worth), so an autoscaler must add replicas."""
    out: list[TraceRequest] = []
    t = 0.0
    while t < seconds:
        rate = 1.0 + 11.0 * t / seconds
        out.append(TraceRequest(t, 5000, 20))
        t += 1.0 / rate
    return out


@pytest.fixture(scope="session")
def workload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "workload.yaml"
    path.write_text(WORKLOAD_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def workload(workload_file: Path) -> SimWorkload:
    return load_workload(workload_file)


@pytest.fixture(scope="session")
def offers() -> tuple[Offer, ...]:
    return load_catalog().offers
