"""The simulated gateway's wait queue (deadlines kept in a heap) against a plain list
that rescans every request on each expiry, on random arrivals, sends, requeues and
expiries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.sim.gateway import Outcome, RequestRecord, SimGateway
from gateway.window import COLD_START_TIMEOUT_SEC, QUEUE_TIMEOUT_SEC


@dataclass
class Reference:
    """The queue as a list in send order; expiry scans all of it."""

    queue: list[tuple[int, float]] = field(default_factory=list)
    """``(request index, deadline)``, the next to send first."""

    def arrive(self, index: int, t: float, *, any_ready: bool) -> None:
        timeout = QUEUE_TIMEOUT_SEC if any_ready else COLD_START_TIMEOUT_SEC
        self.queue.append((index, t + timeout))

    def requeue(self, index: int, deadline: float, t: float) -> None:
        self.queue.insert(0, (index, max(deadline, t + QUEUE_TIMEOUT_SEC)))

    def pop(self) -> tuple[int, float] | None:
        return self.queue.pop(0) if self.queue else None

    def expire(self, t: float) -> list[tuple[float, int]]:
        """``(deadline, request index)`` of the requests whose deadline passed, by deadline."""
        expired = sorted((deadline, index) for index, deadline in self.queue if deadline < t)
        self.queue = [(index, deadline) for index, deadline in self.queue if deadline >= t]
        return expired


steps = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.floats(0.0, 5.0), st.booleans()),
        st.tuples(st.just("pop"), st.just(0.0), st.just(False)),
        st.tuples(st.just("requeue"), st.floats(0.0, 40.0), st.booleans()),
        st.tuples(st.just("expire"), st.floats(0.0, 90.0), st.booleans()),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, seed=st.integers(0, 1000))
def test_expiry_and_send_order_match_a_rescanning_list(
    steps: list[tuple[str, float, bool]], seed: int
) -> None:
    gateway = SimGateway(rng=random.Random(seed), epoch_s=0.0)
    reference = Reference()
    records: list[RequestRecord] = []
    sent: list[tuple[RequestRecord, float]] = []  # with the deadline it was sent under
    rng = random.Random(seed)
    t = 0.0
    for kind, dt, flag in steps:
        t += dt
        if kind == "arrive":
            record = RequestRecord(len(records), t, 100, 10)
            records.append(record)
            gateway.arrive(record, t=t, any_ready=flag)
            reference.arrive(record.index, t, any_ready=flag)
        elif kind == "pop":
            got = gateway.pop()
            want = reference.pop()
            assert (None if got is None else got.index) == (None if want is None else want[0])
            if got is not None and want is not None:
                assert got.deadline_s == want[1]
                sent.append((got, want[1]))
        elif kind == "requeue" and sent:
            record, deadline = sent.pop(rng.randrange(len(sent)))
            gateway.requeue(record, t=t)
            reference.requeue(record.index, deadline, t)
        elif kind == "expire":
            expired = gateway.expire(t)
            deadlines = [r.deadline_s for r in expired]
            assert deadlines == sorted(deadlines)  # the earliest deadline first
            # Equal deadlines may come in either order: compare by (deadline, index).
            assert sorted((r.deadline_s, r.index) for r in expired) == reference.expire(t)
            assert all(r.outcome is Outcome.REJECTED for r in expired)
        assert gateway.waiting == len(reference.queue)
    # What is left is sent in the same order, and nothing expired was.
    left = [gateway.pop() for _ in range(gateway.waiting)]
    assert [r.index for r in left if r is not None] == [i for i, _ in reference.queue]
    assert gateway.pop() is None
    assert all(r.outcome is Outcome.PENDING for r in left if r is not None)
