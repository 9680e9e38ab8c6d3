"""Desired and actual phases of workloads and replicas, as the distributed-inference
API reports them, and each replica's engine command line with its secrets masked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from autoscaler.api.views import instance_view, workload_status
from autoscaler.store.models import Decision, Instance, Workload
from providers.engines import masked_command

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _workload(*, generation: int = 1, deleted: bool = False) -> Workload:
    return Workload(
        id=1,
        project="acme",
        slug="bot",
        name="bot",
        spec={},
        spec_hash="h",
        generation=generation,
        created_at=T0,
        updated_at=T0,
        deleted_at=T0 if deleted else None,
    )


def _replica(
    launch_id: str, facts: dict[str, datetime] | None = None, *, generation: int = 1
) -> Instance:
    return Instance(
        launch_id=launch_id,
        workload_id=1,
        project="acme",
        workload_slug="bot",
        spec_generation=generation,
        provider="aws",
        offer_key="aws:us-east-1a:p5.48xlarge",
        region="us-east-1",
        zone="us-east-1a",
        instance_type="p5.48xlarge",
        gpu="NVIDIA H100 80GB HBM3",
        gpu_count=8,
        spot=False,
        hourly_usd=98.32,
        intent_at=T0,
        **(facts or {}),
    )


def _scale(desired: int, decision_id: int = 1) -> Decision:
    return Decision(
        id=decision_id, workload_id=1, at=T0, kind="scale", inputs={}, result={"desired": desired},
        reason="", cost_delta_usd_per_hour=0.0, acted=True,
    )  # fmt: skip


def _phases(workload: Workload, instances: list[Instance], **latest: Decision) -> tuple[str, str]:
    status = workload_status(workload, instances=instances, latest=latest, gateway_url=None)
    return status["desired_phase"], status["actual_phase"]


LAUNCHED = {"launched_at": T0}
READY = {"launched_at": T0, "ready_at": T0}
GONE = {"launched_at": T0, "ready_at": T0, "terminated_confirmed_at": T0}


@pytest.mark.parametrize(
    ("instances", "desired", "expected"),
    [
        ([], None, ("running", "creating")),
        ([_replica("a", LAUNCHED)], 1, ("running", "creating")),
        ([_replica("a", READY)], 1, ("running", "running")),
        ([_replica("a", READY), _replica("b", LAUNCHED)], 2, ("running", "scaling")),
        ([_replica("a", READY), _replica("b", GONE)], 2, ("running", "degraded")),
        ([_replica("a", READY)], 0, ("stopped", "stopping")),
        ([_replica("a", GONE)], 0, ("stopped", "stopped")),
    ],
    ids=["no-decision", "booting", "ready", "scaling-up", "member-lost", "stopping", "stopped"],
)
def test_workload_desired_and_actual_phase(
    instances: list[Instance], desired: int | None, expected: tuple[str, str]
) -> None:
    latest = {} if desired is None else {"scale": _scale(desired)}
    assert _phases(_workload(), instances, **latest) == expected


def test_a_workload_serving_an_older_generation_is_updating() -> None:
    rows = [_replica("old", READY, generation=1), _replica("new", LAUNCHED, generation=2)]
    assert _phases(_workload(generation=2), rows, scale=_scale(1)) == ("running", "updating")


def test_a_workload_nothing_can_start_for_has_failed() -> None:
    refused = Decision(
        id=2, workload_id=1, at=T0, kind="refused", inputs={}, result={},
        reason="no offer fits", cost_delta_usd_per_hour=0.0, acted=False,
    )  # fmt: skip
    assert _phases(_workload(), [], scale=_scale(1), refused=refused) == ("running", "failed")


def test_a_deleted_workload_is_deleting_until_its_replicas_are_confirmed_gone() -> None:
    deleted = _workload(deleted=True)
    assert _phases(deleted, [_replica("a", READY)], scale=_scale(1)) == ("deleted", "deleting")
    assert _phases(deleted, [_replica("a", GONE)], scale=_scale(1)) == ("deleted", "deleted")


def test_a_replica_is_wanted_terminated_from_the_drain_until_confirmed() -> None:
    serving = instance_view(_replica("a", READY), T0)
    draining = instance_view(_replica("a", {**READY, "drain_requested_at": T0}), T0)
    terminating = instance_view(
        _replica("a", {**READY, "drain_requested_at": T0, "terminate_requested_at": T0}),
        T0 + timedelta(seconds=5),
    )
    orphaned = instance_view(_replica("a", READY), T0, workload_deleted=True)
    assert (serving["desired_phase"], serving["actual_phase"]) == ("running", "ready")
    assert (draining["desired_phase"], draining["actual_phase"]) == ("terminated", "draining")
    assert (terminating["desired_phase"], terminating["actual_phase"]) == (
        "terminated",
        "terminating",
    )
    assert orphaned["desired_phase"] == "terminated"


HF = "hf_" + "Zq8" * 12


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (
            ["vllm", "serve", "m", "--api-key", "${ENGINE_API_KEY}", "--hf-token", HF],
            "vllm serve m --api-key **** --hf-token ****",
        ),
        (["vllm", "serve", "m", f"--hf-token={HF}"], "vllm serve m --hf-token=****"),
        (["vllm", "serve", "m", "--api-key", "plain-key-value"], "vllm serve m --api-key ****"),
        (["sh", "-c", f"HF_TOKEN={HF} run"], "sh -c HF_TOKEN=****"),
        (
            ["vllm", "serve", "m", "--served-model-name", HF],
            "vllm serve m --served-model-name ****",
        ),
        (
            ["vllm", "serve", "m", "--max-model-len", "8192", "--chat-template", "a b"],
            "vllm serve m --max-model-len 8192 --chat-template 'a b'",
        ),
    ],
    ids=["flags", "flag=value", "literal-key", "setting", "token-shaped", "nothing-secret"],
)
def test_a_command_line_never_shows_a_secret(argv: list[str], shown: str) -> None:
    masked = masked_command(argv)
    assert masked == shown
    assert HF not in masked and "plain-key-value" not in masked
