"""A provider call that never answers is cut at its deadline and the pass goes on."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.reconcile.timeouts import TimedProvider
from autoscaler.store.phase import Phase
from providers.base import Instance, LaunchRequest
from providers.errors import Transient
from providers.fake import FakeProvider
from tests.reconcile.world import World, fixed


class SilentProvider(FakeProvider):
    """A cloud whose chosen calls never answer (a connection that hangs)."""

    def __init__(self, world: World, *, silent: set[str]) -> None:
        super().__init__(world.cloud, name="aws")
        self.silent = silent
        self.started: list[str] = []

    async def _maybe_hang(self, method: str) -> None:
        if method in self.silent:
            self.started.append(method)
            await asyncio.Event().wait()

    async def list(self, cluster_id: str) -> list[Instance]:
        await self._maybe_hang("list")
        return await super().list(cluster_id)

    async def launch(self, request: LaunchRequest) -> Instance:
        await self._maybe_hang("launch")
        return await super().launch(request)

    async def stop(self, instance_id: str) -> None:
        await self._maybe_hang("stop")
        await super().stop(instance_id)

    async def start(self, instance_id: str) -> Instance:
        await self._maybe_hang("start")
        return await super().start(instance_id)


async def test_a_call_past_its_deadline_is_a_transient_error_naming_the_action(
    world: World,
) -> None:
    timed = TimedProvider(SilentProvider(world, silent={"list"}), call_timeout_sec=0.05)
    with pytest.raises(Transient) as caught:
        await timed.list("test-cluster")
    assert "listing test-cluster" in str(caught.value)
    assert "no answer from aws within 0.05s" in str(caught.value)


async def test_a_launch_that_never_answers_stays_an_intent_resolved_later(world: World) -> None:
    silent = SilentProvider(world, silent={"launch"})
    world.deps = world.make_deps(provider=TimedProvider(silent, launch_timeout_sec=0.05))
    await world.apply(fixed("bot", 1))
    await world.step()
    assert silent.started == ["launch"]
    [intent] = await world.rows("bot")
    assert intent.instance_id is None and intent.terminated_confirmed_at is None
    silent.silent.clear()  # the provider answers again
    await world.step(5)
    assert await world.phases("bot") in ([Phase.BOOTING], [Phase.READY])
    assert len(world.live_instances()) == 1


async def test_a_provider_that_never_lists_leaves_the_pass_free_to_finish(world: World) -> None:
    silent = SilentProvider(world, silent={"list"})
    world.deps = world.make_deps(provider=TimedProvider(silent, call_timeout_sec=0.05))
    await world.apply(fixed("bot", 1))
    assert await world.step() >= 0
    assert silent.started == ["list"]
    errors = world.deps.metrics.provider_errors.labels("aws", "list", "Transient")._value.get()
    assert errors == 1


async def test_stop_and_start_have_deadlines_too(world: World) -> None:
    timed = TimedProvider(
        SilentProvider(world, silent={"stop", "start"}),
        call_timeout_sec=0.05,
        launch_timeout_sec=0.1,
    )
    with pytest.raises(Transient, match=r"stopping i-1: no answer from aws within 0\.05s"):
        await timed.stop("i-1")
    # A start waits on the cloud (a GCE operation) as a launch does: the launch deadline.
    with pytest.raises(Transient, match=r"starting i-1: no answer from aws within 0\.1s"):
        await timed.start("i-1")
