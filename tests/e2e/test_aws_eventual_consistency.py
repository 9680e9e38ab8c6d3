"""The controller against moto's EC2 server when EC2 is eventually consistent.

The proxy in front of moto hides a new instance from ``DescribeInstances`` and
``TerminateInstances`` (``InvalidInstanceID.NotFound``) until the test reveals it, and
can lose ``RunInstances`` answers after the machine was created. Across every pass:
no replacement storm, no leak, nothing marked terminated while it runs at the provider.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import select

from autoscaler.config import parse_config
from autoscaler.controller import Controller, build_controller
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.workloads import delete_workload, ensure_workload
from providers.base import CLUSTER_TAG, LAUNCH_ID_TAG, ManualClock, utc
from tests.e2e.test_aws_moto import AWS_ENV, CATALOG, REGION, AlwaysHealthy, _config
from tests.fakes.ec2_proxy import Ec2Proxy, FaultRule

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


Step = Callable[[], Awaitable[None]]


class Harness:
    def __init__(self, controller: Controller, clock: ManualClock, sessions: Any) -> None:
        self.controller = controller
        self.clock = clock
        self.sessions = sessions

    async def step(self, seconds: float = 5.0) -> None:
        self.clock.advance(seconds)
        await self.controller.step()

    async def rows(self) -> list[LedgerRow]:
        async with self.sessions() as s:
            return list(await s.scalars(select(LedgerRow).order_by(LedgerRow.intent_at)))

    async def apply(self, replicas: int) -> None:
        spec = WorkloadSpec.model_validate(
            {
                "name": "bot",
                "slug": "bot",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "execution_policy_config": {"replicas": replicas},
            }
        )
        async with self.sessions() as s, s.begin():
            await ensure_workload(
                s, project="acme", spec=spec, on_drift=OnDrift.RECONCILE, now=utc(self.clock.now())
            )

    async def delete(self) -> None:
        async with self.sessions() as s, s.begin():
            await delete_workload(s, project="acme", slug="bot", now=utc(self.clock.now()))


async def _moto_view(moto: ThreadedMotoServer, cluster: str) -> dict[str, tuple[str, str]]:
    """instance id -> (state, launch id tag), straight from moto (what really exists)."""
    host, port = moto.get_host_and_port()
    async with aioboto3.Session().client(
        "ec2", region_name=REGION, endpoint_url=f"http://{host}:{port}"
    ) as c:
        pages = await c.describe_instances(
            Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
        )
    return {
        i["InstanceId"]: (
            i["State"]["Name"],
            next(t["Value"] for t in i["Tags"] if t["Key"] == LAUNCH_ID_TAG),
        )
        for r in pages["Reservations"]
        for i in r["Instances"]
    }


async def _check(h: Harness, moto: ThreadedMotoServer, cluster: str) -> dict[str, str]:
    """Moto against the ledger: every running machine belongs to an open row (a pending
    intent holds its machine by launch id until it learns the id), one machine per
    launch, and no row is closed while its machine runs. Returns id -> state."""
    view = await _moto_view(moto, cluster)
    running = {i: launch for i, (state, launch) in view.items() if state in ("pending", "running")}
    rows = await h.rows()
    open_rows = {r.launch_id: r for r in rows if r.terminated_confirmed_at is None}
    for instance_id, launch_id in running.items():
        row = open_rows.get(launch_id)
        assert row is not None, f"{instance_id} runs and no open row holds it"
        assert row.instance_id in (None, instance_id), f"{launch_id} holds another machine"
    launches = list(running.values())
    assert len(launches) == len(set(launches)), f"two machines for one launch: {view}"
    return {i: state for i, (state, _) in view.items()}


@pytest.fixture
async def harness(proxy: Ec2Proxy, tmp_path: Path) -> AsyncIterator[tuple[Harness, str]]:
    cluster = f"ec-{uuid.uuid4().hex[:8]}"
    clock = ManualClock(start=time.time())
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        sessions = session_factory(engine)
        controller = build_controller(
            parse_config(_config(proxy, cluster, visibility_grace_sec=300), source="test"),
            sessions=sessions,
            data_dir=tmp_path,
            clock=clock,
            health=AlwaysHealthy(),
            catalog=CATALOG,
        )
        try:
            yield Harness(controller, clock, sessions), cluster
        finally:
            await controller.close()


async def test_an_unseen_new_instance_buys_no_replacement(
    harness: tuple[Harness, str], proxy: Ec2Proxy, moto_server: ThreadedMotoServer
) -> None:
    h, cluster = harness
    proxy.hide_new_sec = math.inf
    await h.apply(replicas=1)
    for _ in range(12):  # a minute of 5 s passes with the instance missing from EC2's view
        await h.step()
        view = await _check(h, moto_server, cluster)
        assert len(view) == 1, f"replacement storm: {view}"
    assert proxy.counts.hidden > 0  # the controller did look, and was told NotFound
    [row] = await h.rows()
    assert row.terminated_confirmed_at is None and row.last_error is None
    proxy.hide_new_sec = 0  # EC2 catches up
    await h.step()
    view = await _check(h, moto_server, cluster)
    assert list(view) == [row.instance_id] and view[row.instance_id or ""] == "running"
    assert proxy.run_instances_calls == 1


async def test_a_lost_launch_answer_while_unseen_buys_one_machine(
    harness: tuple[Harness, str], proxy: Ec2Proxy, moto_server: ThreadedMotoServer
) -> None:
    h, cluster = harness
    proxy.hide_new_sec = math.inf
    # More lost answers than one launch call retries: the intent stays pending, a tag
    # lookup finds nothing (not visible), and the launch is asked again, same ClientToken.
    proxy.inject(FaultRule("lost", times=6))
    await h.apply(replicas=2)
    for _ in range(6):
        await h.step()
        view = await _check(h, moto_server, cluster)
        assert len(view) <= 2, f"duplicate machines: {view}"
    rows = await h.rows()
    assert len(rows) == 2 and all(r.terminated_confirmed_at is None for r in rows)
    assert sorted(r.instance_id or "" for r in rows) == sorted(view)
    assert proxy.counts.token_repeats > 0


async def test_a_delete_while_unseen_ends_with_every_machine_terminated(
    harness: tuple[Harness, str], proxy: Ec2Proxy, moto_server: ThreadedMotoServer
) -> None:
    h, cluster = harness
    proxy.hide_new_sec = math.inf
    await h.apply(replicas=2)
    await h.step()
    await h.delete()
    for _ in range(6):  # terminate answered NotFound: taken as nothing, rows stay open
        await h.step()
        await _check(h, moto_server, cluster)
    assert all(r.terminated_confirmed_at is None for r in await h.rows())
    proxy.hide_new_sec = 0
    for _ in range(3):
        await h.step()
        view = await _check(h, moto_server, cluster)
    assert set(view.values()) == {"terminated"}
    rows = await h.rows()
    assert len(rows) == 2 and all(r.terminated_confirmed_at is not None for r in rows)
