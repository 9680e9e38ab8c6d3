"""A recording fake provider for tests of the layers above.

Like Karpenter's fake cloud provider it records every call, takes an injected next error
per method, and keeps its machines in a :class:`FakeCloud` that outlives any one
:class:`FakeProvider`, so a test can "crash" the controller by dropping the provider and
build a new one with no memory that still finds the instances by their tags.
"""

from __future__ import annotations

import builtins
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Literal

from providers.base import (
    CLUSTER_TAG,
    Clock,
    Instance,
    InstanceState,
    LaunchRequest,
    NotFound,
    ProviderError,
    SpotInterruption,
    SystemClock,
    Terminal,
    Transient,
    pick_for_launch,
    utc,
)

Method = Literal[
    "launch", "terminate", "stop", "start", "list", "describe", "find_by_launch_id", "interruptions"
]


@dataclass(frozen=True, slots=True)
class FakeCall:
    """One call the fake received, in order."""

    method: Method
    argument: object


_MOVING = frozenset({InstanceState.PENDING, InstanceState.STOPPING})


@dataclass(slots=True)
class _Machine:
    instance: Instance
    running_at: float
    stopped_at: float = 0.0


class FakeCloud:
    """The fake's world: machines, idempotency tokens, interruptions, on an injected clock.

    Instances are ``PENDING`` for ``boot_seconds`` of clock time, then ``RUNNING``. A
    stopped instance is ``STOPPING`` for ``stop_seconds``, then ``STOPPED``; started
    again it is ``PENDING`` for ``start_seconds`` (``boot_seconds`` when unset). As on
    EC2, a spot instance cannot be stopped, a ``PENDING`` one not yet, and a
    ``STOPPING`` one cannot start until it is ``STOPPED``.
    Terminated and interrupted instances stay visible with that state until
    :meth:`forget` removes them, as EC2 keeps terminated instances listed for a while.
    Like EC2, the cloud is eventually consistent when ``visibility_delay_sec`` is set: a
    new instance is returned by the launch call but is missing from ``list``,
    ``describe``, ``find_by_launch_id`` and ``terminate`` for that long.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        boot_seconds: float = 0.0,
        visibility_delay_sec: float = 0.0,
        stop_seconds: float = 0.0,
        start_seconds: float | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.boot_seconds = boot_seconds
        self.stop_seconds = stop_seconds
        self.start_seconds = boot_seconds if start_seconds is None else start_seconds
        self.visibility_delay_sec = visibility_delay_sec
        self._created_at: dict[str, float] = {}
        self._machines: dict[str, _Machine] = {}
        self._by_cluster: dict[str | None, dict[str, Instance]] = defaultdict(dict)
        """Each machine's instance as last settled, by its cluster tag, in launch order, so
        ``list`` reads one cluster's."""
        self._moving: set[str] = set()
        """Machines pending or stopping: those a clock's tick may settle."""
        self._by_token: dict[str, str] = {}
        self._interruptions: dict[str, SpotInterruption] = {}
        self._ids = itertools.count(1)
        self.launch_error: type[ProviderError] | None = None
        """While set, every launch fails with this error (the cloud is out of capacity…)."""

    def create(self, request: LaunchRequest, provider: str) -> Instance:
        existing = self._by_token.get(request.client_token)
        if existing is not None:
            return self.get(existing)
        instance_id = f"{provider}-{next(self._ids):08d}"
        now = self.clock.now()
        instance = Instance(
            provider=request.offer.provider,
            instance_id=instance_id,
            launch_id=request.launch_id,
            zone=request.offer.zone,
            instance_type=request.offer.instance_type,
            state=InstanceState.PENDING,
            spot=request.spot,
            launched_at=utc(now),
            tags=request.tags,
            private_address=f"10.0.{len(self._machines) // 250}.{len(self._machines) % 250 + 2}",
        )
        self._machines[instance_id] = _Machine(instance, running_at=now + self.boot_seconds)
        self._keep(instance)
        self._created_at[instance_id] = now
        self._by_token[request.client_token] = instance_id
        return self.get(instance_id)

    def get(self, instance_id: str) -> Instance:
        machine = self._machines.get(instance_id)
        if machine is None:
            raise KeyError(instance_id)
        return self._settled(machine, self.clock.now())

    def _settled(self, machine: _Machine, now: float) -> Instance:
        """The machine as of ``now``: a boot or a stop whose time has come is over."""
        instance = machine.instance
        if instance.state is InstanceState.PENDING and now >= machine.running_at:
            instance = replace(instance, state=InstanceState.RUNNING)
        if instance.state is InstanceState.STOPPING and now >= machine.stopped_at:
            instance = replace(instance, state=InstanceState.STOPPED)
        if instance is not machine.instance:
            machine.instance = instance
            self._keep(instance)
        return instance

    def _keep(self, instance: Instance) -> None:
        """Index ``instance`` as its machine's current state. O(1)."""
        instance_id = instance.instance_id
        self._by_cluster[instance.tags.get(CLUSTER_TAG)][instance_id] = instance
        if instance.state in _MOVING:
            self._moving.add(instance_id)
        else:
            self._moving.discard(instance_id)

    def _settle_due(self) -> None:
        """Settle every pending or stopping machine as of now. O(those machines)."""
        now = self.clock.now()
        for instance_id in builtins.list(self._moving):
            self._settled(self._machines[instance_id], now)

    def replace_instance(
        self,
        instance_id: str,
        *,
        state: InstanceState | None = None,
        private_address: str | None = None,
    ) -> Instance:
        """Change what the cloud shows of an instance (its state, or its address after a
        start), as the provider would on its own."""
        machine = self._machines[instance_id]
        instance = machine.instance
        machine.instance = replace(
            instance,
            state=instance.state if state is None else state,
            private_address=instance.private_address
            if private_address is None
            else private_address,
        )
        self._keep(machine.instance)
        return machine.instance

    def stop(self, instance_id: str, *, action: str) -> None:
        """Stop a machine as EC2 would (see the class docstring for what is refused)."""
        instance = self.get(instance_id)
        state = instance.state
        if state.is_gone or state is InstanceState.SHUTTING_DOWN:
            raise NotFound(action, f"the instance is {state.value}")
        if state.is_stopped:
            return
        if instance.spot:
            raise Terminal(action, "a spot instance of a one-time request cannot be stopped")
        if state is InstanceState.PENDING:
            raise Transient(action, "the instance is pending: not stoppable yet", retry_after=5)
        self._machines[instance_id].stopped_at = self.clock.now() + self.stop_seconds
        self.set_state(instance_id, InstanceState.STOPPING)

    def start(self, instance_id: str, *, action: str) -> Instance:
        """Start a stopped machine again: ``PENDING`` for ``start_seconds``."""
        instance = self.get(instance_id)
        state = instance.state
        if state.is_gone or state is InstanceState.SHUTTING_DOWN:
            raise NotFound(action, f"the instance is {state.value}")
        if state is InstanceState.STOPPING:
            raise Transient(action, "the instance is still stopping", retry_after=5)
        if state is InstanceState.STOPPED:
            self._machines[instance_id].running_at = self.clock.now() + self.start_seconds
            self.set_state(instance_id, InstanceState.PENDING)
        return self.get(instance_id)

    def all(self) -> builtins.list[Instance]:
        """Every instance the cloud holds, in launch order. O(machines), plus O(pending
        or stopping machines) to settle them."""
        self._settle_due()
        return [machine.instance for machine in self._machines.values()]

    def in_cluster(self, cluster_id: str, *, shown: bool = True) -> builtins.list[Instance]:
        """The instances of one cluster (by its tag): those the API shows now, or with
        ``shown=False`` every one, new ones still hidden by ``visibility_delay_sec``
        included. O(its instances) at C speed, plus O(pending or stopping machines)."""
        self._settle_due()
        instances = self._by_cluster.get(cluster_id, {})
        if not shown or not self.visibility_delay_sec:
            return builtins.list(instances.values())
        return [i for i in instances.values() if self.visible(i.instance_id)]

    def visible(self, instance_id: str) -> bool:
        """Whether the API shows the instance yet (see ``visibility_delay_sec``)."""
        created = self._created_at.get(instance_id)
        return created is None or self.clock.now() - created >= self.visibility_delay_sec

    def set_state(self, instance_id: str, state: InstanceState) -> Instance:
        return self.replace_instance(instance_id, state=state)

    def interrupt(self, instance_id: str, *, reason: str = "spot capacity reclaimed") -> None:
        """Reclaim a spot instance as the provider would."""
        instance = self.get(instance_id)
        if not instance.spot:
            raise ValueError(f"{instance_id} is on-demand; only spot instances are interrupted")
        self.set_state(instance_id, InstanceState.INTERRUPTED)
        self._interruptions[instance_id] = SpotInterruption(
            instance_id=instance_id,
            launch_id=instance.launch_id,
            zone=instance.zone,
            instance_type=instance.instance_type,
            noticed_at=utc(self.clock.now()),
            reason=reason,
        )

    def interruptions(self) -> builtins.list[SpotInterruption]:
        return [i for key, i in self._interruptions.items() if key in self._machines]

    def forget(self, instance_id: str) -> None:
        """The provider stops showing the instance at all (after termination)."""
        machine = self._machines.pop(instance_id, None)
        if machine is None:
            return
        self._by_cluster[machine.instance.tags.get(CLUSTER_TAG)].pop(instance_id, None)
        self._moving.discard(instance_id)


class FakeProvider:
    """A :class:`providers.base.Provider` over a :class:`FakeCloud` that records its calls.

    ``fail_next(method, error)`` makes the next call of ``method`` raise ``error``; give an
    error class to have the fake write the message with the action that failed.
    """

    def __init__(self, cloud: FakeCloud | None = None, *, name: str = "fake") -> None:
        self.name = name
        self.cloud = cloud or FakeCloud()
        self.calls: builtins.list[FakeCall] = []
        self._errors: dict[Method, deque[ProviderError | type[ProviderError]]] = defaultdict(deque)

    def fail_next(self, method: Method, error: ProviderError | type[ProviderError]) -> None:
        """Queue ``error`` for the next call of ``method`` (errors queue up in order)."""
        self._errors[method].append(error)

    def answer_again(self) -> None:
        """Drop every queued error: from now on each call is answered."""
        self._errors.clear()

    def calls_to(self, method: Method) -> builtins.list[FakeCall]:
        return [call for call in self.calls if call.method == method]

    def _enter(self, method: Method, argument: object, action: str) -> None:
        self.calls.append(FakeCall(method, argument))
        queue = self._errors.get(method)
        if queue:
            error = queue.popleft()
            raise error if isinstance(error, ProviderError) else error(action, "injected")

    async def launch(self, request: LaunchRequest) -> Instance:
        self._enter("launch", request, request.action)
        if self.cloud.launch_error is not None:
            raise self.cloud.launch_error(request.action, "the cloud refuses launches")
        return self.cloud.create(request, self.name)

    async def terminate(self, instance_id: str) -> None:
        self._enter("terminate", instance_id, f"terminating {instance_id}")
        try:
            instance = self.cloud.get(instance_id)
        except KeyError:
            return
        if not self.cloud.visible(instance_id):
            return  # as EC2: an id not shown yet is "not found", taken as already gone
        if not instance.state.is_gone:
            self.cloud.set_state(instance_id, InstanceState.TERMINATED)

    async def stop(self, instance_id: str) -> None:
        action = f"stopping {instance_id}"
        self._enter("stop", instance_id, action)
        self.cloud.stop(self._visible(instance_id, action), action=action)

    async def start(self, instance_id: str) -> Instance:
        action = f"starting {instance_id}"
        self._enter("start", instance_id, action)
        return self.cloud.start(self._visible(instance_id, action), action=action)

    def _visible(self, instance_id: str, action: str) -> str:
        try:
            self.cloud.get(instance_id)
        except KeyError:
            raise NotFound(action, "no such instance") from None
        if not self.cloud.visible(instance_id):
            raise NotFound(action, "no such instance")
        return instance_id

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        self._enter("list", cluster_id, f"listing instances of cluster {cluster_id}")
        return self.cloud.in_cluster(cluster_id)

    async def describe(self, instance_id: str) -> Instance:
        action = f"describing {instance_id}"
        self._enter("describe", instance_id, action)
        if not self.cloud.visible(instance_id):
            raise NotFound(action, "no such instance")
        try:
            return self.cloud.get(instance_id)
        except KeyError:
            raise NotFound(action, "no such instance") from None

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        self._enter("find_by_launch_id", (cluster_id, launch_id), f"finding launch {launch_id}")
        return pick_for_launch(
            [i for i in self.cloud.in_cluster(cluster_id) if i.launch_id == launch_id]
        )

    async def interruptions(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        self._enter("interruptions", cluster_id, f"listing interruptions of {cluster_id}")
        ids = {i.instance_id for i in self.cloud.in_cluster(cluster_id, shown=False)}
        return [i for i in self.cloud.interruptions() if i.instance_id in ids]
