"""The scale decision's log counts a workload's replicas as the step does: ready,
booting (pending intents too) and draining, a ready replica warned of its spot reclaim
(with or without its time) draining and counted as warned, a group once (its leader), a
warm pool refill in none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from autoscaler.decide.scaling import FleetCounts
from autoscaler.decide.step import phase_counts
from autoscaler.decide.warm import warm_policy_of
from autoscaler.reconcile.ledger import fleet_counts, replica_view
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE
from tests.reconcile.world import autoscaling

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(name: str, **stamps: Any) -> LedgerRow:
    return LedgerRow(
        launch_id=name,
        workload_id=1,
        project="acme",
        workload_slug="chat",
        spec_generation=1,
        provider="aws",
        offer_key="aws/us-east-1a/g6.xlarge",
        region="us-east-1",
        zone="us-east-1a",
        instance_type="g6.xlarge",
        gpu="NVIDIA L4",
        gpu_count=1,
        hourly_usd=0.8,
        intent_at=T0,
        **stamps,
    )


LATER = T0 + timedelta(minutes=5)
ROWS = [
    _row("pending"),
    _row("booting", launched_at=T0),
    _row("ready", launched_at=T0, ready_at=LATER),
    _row("warned", launched_at=T0, ready_at=LATER, last_error=f"{SPOT_NOTICE}reclaim at 12:05"),
    _row("untimed", launched_at=T0, ready_at=LATER, last_error=f"{SPOT_NOTICE}no time given"),
    _row("draining", launched_at=T0, ready_at=LATER, drain_requested_at=LATER),
    _row("terminating", launched_at=T0, terminate_requested_at=LATER),
    _row("parked", launched_at=T0, park_mode="stopped", park_requested_at=LATER, parked_at=LATER),
    _row("leader", launched_at=T0, ready_at=LATER, group_id="leader", group_role="leader"),
    _row("worker", launched_at=T0, ready_at=LATER, group_id="leader", group_role="worker"),
    _row("refill", launched_at=T0, prefill=True),
]


def test_the_replicas_are_counted_by_phase() -> None:
    # Of the three draining, two were warned of their spot reclaim (timed or not).
    assert fleet_counts(ROWS) == FleetCounts(ready=2, booting=3, draining=3, warned=2)


@pytest.mark.parametrize("warm", [None, warm_policy_of(autoscaling("chat", warm_pool={}))])
def test_the_count_is_the_one_the_step_reads_from_the_replicas_views(warm: Any) -> None:
    views = [replica_view(r, in_flight=0) for r in ROWS if r.group_role != "worker"]
    assert fleet_counts(ROWS, warm=warm) == phase_counts(views, warm=warm)
