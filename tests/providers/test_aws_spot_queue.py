"""EC2 Spot Instance Interruption Warnings read from an SQS queue (as EventBridge fills
it), on moto: the controller drains and replaces the warned replica in the next pass."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select

from autoscaler.decide.signals import Signals
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import SpotNotice
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from providers.aws import AwsProvider, interruption_warning
from providers.aws_config import AwsConfig
from providers.base import SpotNoticeSource, reclaim_time
from tests.fakes.ec2_proxy import Ec2Proxy
from tests.reconcile.world import A10G, PROJECT, World, autoscaling

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

REGION = "us-east-1"
MOTO_AMI = "ami-785db401"


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def _warning(instance_id: str) -> str:
    return json.dumps(
        {
            "version": "0",
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "source": "aws.ec2",
            "region": REGION,
            "time": "2026-11-30T09:00:00Z",
            "resources": [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
            "detail": {"instance-id": instance_id, "instance-action": "terminate"},
        }
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        yield World(session_factory(engine))


async def test_a_queued_warning_drains_and_replaces_the_replica(
    world: World, proxy: Ec2Proxy, moto_server: ThreadedMotoServer
) -> None:
    host, port = moto_server.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    async with aioboto3.Session().client("sqs", region_name=REGION, endpoint_url=moto_url) as sqs:
        queue: Any = await sqs.create_queue(QueueName="autoscaler-interruptions")
        url = queue["QueueUrl"]
        provider = AwsProvider(
            AwsConfig(
                regions=(REGION,),
                endpoint_url=proxy.url,
                ami_overrides={"default": MOTO_AMI},
                retry_wait_seconds=0.01,
                interruption_queue_url=url,
                sqs_endpoint_url=moto_url,
            ),
            clock=world.clock,
        )
        assert isinstance(provider, SpotNoticeSource)
        world.deps = world.make_deps(provider=provider)
        world.deps.offers = lambda: (A10G,)
        await world.apply(autoscaling("bot", allow_spot_instances=True, max_workers=2))
        await world.step()
        await world.step(5)
        [doomed] = await world.rows("bot")
        assert doomed.spot and phase_of(doomed) is Phase.READY
        world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=1)
        for body in (_warning(doomed.instance_id or ""), _warning("i-0someoneelse0"), "{oops"):
            await sqs.send_message(QueueUrl=url, MessageBody=body)

        await world.step(1)

        old, replacement = await world.rows("bot")
        # The queue's warning is EC2's two minutes ahead: it serves on until its
        # replacement is ready or 30 s before the reclaim (``decide.plan.heed_spot_notice``).
        assert phase_of(old) is Phase.READY
        assert old.reclaim_at == world.now + timedelta(seconds=120)
        assert (old.last_error or "").startswith(
            f"{SPOT_NOTICE}EC2 Spot Instance Interruption Warning (SQS): terminate at "
        )
        assert replacement.instance_id is not None and not replacement.spot
        registry = world.deps.metrics.registry
        counted = {"provider": "aws", "source": "queue"}
        assert registry.get_sample_value("autoscaler_controller_spot_notices_total", counted) == 1
        left: Any = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
        assert left.get("Messages", []) == []  # every message read was deleted
        assert await provider.spot_notices(world.deps.settings.cluster_id) == []
        async with world.sessions() as s:  # one controller: nothing kept for another
            assert await s.scalar(select(func.count()).select_from(SpotNotice)) == 0


def test_only_spot_interruption_warnings_are_read() -> None:
    assert interruption_warning(_warning("i-1")) == (
        "i-1",
        "EC2 Spot Instance Interruption Warning (SQS): terminate at 2026-11-30T09:00:00Z",
    )
    rebalance = json.loads(_warning("i-1")) | {
        "detail-type": "EC2 Instance Rebalance Recommendation"
    }
    assert interruption_warning(json.dumps(rebalance)) is None
    assert interruption_warning("not json") is None
    assert interruption_warning("[]") is None


def test_a_notices_reclaim_time_is_ec2s_action_time_else_the_providers_lead() -> None:
    noticed = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    metadata = (
        'ec2 spot interruption notice: {"action": "terminate", "time": "2026-11-30T09:01:50Z"}'
    )
    assert reclaim_time(metadata, provider="aws", noticed_at=noticed) == datetime(
        2026, 11, 30, 9, 1, 50, tzinfo=UTC
    )
    queued = "EC2 Spot Instance Interruption Warning (SQS): terminate at 2026-11-30T09:00:00Z"
    assert reclaim_time(queued, provider="aws", noticed_at=noticed) == noticed + timedelta(
        seconds=120
    )
    gce = "gce spot interruption notice: instance/preempted is TRUE"
    assert reclaim_time(gce, provider="gcp", noticed_at=noticed) == noticed + timedelta(seconds=30)
    assert reclaim_time("reclaimed", provider="local", noticed_at=noticed) is None
