"""The simulator's replicas take the batch limits of the workload's command, as
engine-sim does: the same flags, read by the same function, give the same engine."""

from __future__ import annotations

import pytest

from autoscaler.sim.workload import SimWorkload, WorkloadFileError, feasible_offers, sim_workload
from autoscaler.spec import WorkloadSpec
from catalog.engine import EngineRequest, simulate
from catalog.model import Offer
from providers.engine_sim.config import EngineSimConfig


def _workload(command: str) -> SimWorkload:
    spec = WorkloadSpec.model_validate(
        {
            "name": "Budgeted",
            "slug": "budgeted",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "command": command,
        }
    )
    return sim_workload(spec)


def test_a_replica_gets_the_budget_and_cap_of_the_command(offers: tuple[Offer, ...]) -> None:
    limited = _workload("--max-num-batched-tokens=64 --max-num-seqs 32")
    plain = _workload("--max-model-len 8192")
    offer = next(o for o in feasible_offers(limited, offers) if o.gpu == "NVIDIA H100 80GB HBM3")
    replica = limited.profile(offer)
    assert (replica.max_batched_tokens, replica.max_batch) == (64, 32)
    # engine-sim, given the same flags for the same GPU, runs the very same engine.
    sim = EngineSimConfig(
        gpu=offer.gpu,
        gpu_count=offer.gpu_count,
        params_b=limited.params_b,
        bytes_per_param=limited.bytes_per_param,
        max_batched_tokens=64,
        max_batch=32,
    )
    assert sim.profile() == replica

    prompt = [EngineRequest(arrival_s=0.0, input_tokens=4096, output_tokens=1)]
    chunked = simulate(replica, prompt)[0]
    whole = simulate(plain.profile(offer), prompt)[0]
    assert chunked.ttft_s > whole.ttft_s


def test_the_underscore_spelling_vllm_accepts_is_read_as_engine_sim_reads_it(
    offers: tuple[Offer, ...],
) -> None:
    limited = _workload("--max_num_batched_tokens=64 --max_num_seqs 32")
    offer = next(o for o in feasible_offers(limited, offers) if o.gpu == "NVIDIA H100 80GB HBM3")
    replica = limited.profile(offer)
    assert (replica.max_batched_tokens, replica.max_batch) == (64, 32)


def test_a_budget_below_the_cap_is_refused_with_vllms_words() -> None:
    with pytest.raises(WorkloadFileError, match=r"max_num_batched_tokens \(16\) must be"):
        _workload("--max-num-batched-tokens 16 --max-num-seqs 32")
