"""A pass's placements are shared by workloads whose placement inputs are equal, and only
by them (``decide.placement.PlacementMemo``): the memo never changes a placement."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.decide.inputs import Measured
from autoscaler.decide.placement import PlacementMemo, place_replica, unavailable_key
from autoscaler.decide.scaling import ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.decide.step import StepKnobs, WorkloadView, step
from autoscaler.spec import WorkloadSpec
from catalog.query import Market
from gateway.window import prompt_bucket
from tests.decide.test_placement import NOW, offer, spec

OFFERS = (
    offer("NVIDIA L4", price=0.80, spot=0.30, zone="us-east-1a", itype="g6.xlarge"),
    offer("NVIDIA L4", price=0.80, spot=0.35, zone="us-east-1b", itype="g6.xlarge"),
    offer("NVIDIA A10G", price=1.00, spot=0.40, zone="us-east-1a", itype="g5.xlarge"),
    offer("NVIDIA A10G", price=1.00, zone="us-east-1b", itype="g5.xlarge"),
    offer("NVIDIA L40S", price=1.86, spot=0.90, zone="us-east-1a", itype="g6e.xlarge"),
    offer("NVIDIA L4", price=3.40, zone="us-east-1a", itype="g6.12xlarge", count=4),
)

SINGLE = OFFERS[:5]
"""One GPU per machine: the zones of one shape's offers are priced alike."""

PLAIN: dict[str, Any] = {
    "unavailable": {},
    "now": NOW,
    "params_b": 8.0,
    "model_memory_gib": 20.0,
}


def pool(*gpus: str, spot: bool = False, min_workers: int = 0) -> WorkloadSpec:
    return spec(
        allow_spot_instances=spot,
        min_workers=min_workers,
        workers={"source": "cloud", "cloud_pool": {"gpu_pool": list(gpus)}},
    )


def test_equal_inputs_share_one_placement_and_different_inputs_get_their_own() -> None:
    memo = PlacementMemo()
    l4 = pool("NVIDIA L4", "NVIDIA A10G")

    def place(workload: WorkloadSpec = l4, **inputs: Any) -> Any:
        return place_replica(spec=workload, offers=SINGLE, memo=memo, **{**PLAIN, **inputs})

    first = place(current_zones=["us-east-1b"])
    again = place(current_zones=["us-east-1b"])
    assert again is first  # one computation for two workloads of equal inputs
    assert (memo.computed, memo.shared) == (1, 1)
    assert first.offer is not None and first.offer.zone == "us-east-1a"

    other_zone = place(current_zones=["us-east-1a"])
    assert other_zone.offer is not None and other_zone.offer.zone == "us-east-1b"
    a10g = place(pool("NVIDIA A10G"), current_zones=["us-east-1b"])
    assert a10g.offer is not None and a10g.offer.gpu == "NVIDIA A10G"
    marked = place(
        current_zones=["us-east-1b"],
        unavailable={unavailable_key(first.offer, Market.ON_DEMAND): NOW + timedelta(minutes=5)},
    )
    assert marked.offer != first.offer
    poor = place(current_zones=["us-east-1b"], max_usd_per_hour=0.5)
    assert not poor.found and "headroom" in poor.reason
    assert (memo.computed, memo.shared) == (5, 1)
    # A mark that has run out is no mark: the same inputs as the first.
    expired = {unavailable_key(first.offer, Market.ON_DEMAND): NOW - timedelta(seconds=1)}
    assert place(current_zones=["us-east-1b"], unavailable=expired) is first


def test_a_new_catalog_load_drops_the_placements_kept() -> None:
    memo = PlacementMemo()
    before = place_replica(spec=pool("NVIDIA L4"), offers=SINGLE, memo=memo, **PLAIN)
    cheaper = tuple(
        offer("NVIDIA L4", price=0.50, zone=o.zone, itype=o.instance_type)
        if o.gpu == "NVIDIA L4"
        else o
        for o in SINGLE
    )
    after = place_replica(spec=pool("NVIDIA L4"), offers=cheaper, memo=memo, **PLAIN)
    assert before.usd_per_hour == 0.80 and after.usd_per_hour == 0.50
    assert memo.shared == 0


_HISTOGRAMS = [
    None,
    {prompt_bucket(512): 150, prompt_bucket(2048): 40, prompt_bucket(16384): 10},
    {prompt_bucket(512): 100, prompt_bucket(4096): 100, prompt_bucket(32768): 10},
]
"""Prompt lengths as the gateway buckets them: two of 200 prompts (the tail rule reads
the histogram), one without."""


def _two_small(shape: tuple[str, int]) -> int:
    return 2 if shape[1] == 1 else 1


def _three_small(shape: tuple[str, int]) -> int:
    return 3 if shape[1] == 1 else 1


_FIELDS = {
    "spec",
    "current_zones",
    "unavailable",
    "max_usd_per_hour",
    "input_tokens",
    "output_tokens",
    "input_scv",
    "input_histogram",
    "replicas_needed",
    "params_b",
    "bytes_per_param",
    "model_memory_gib",
    "concurrency_cap",
    "allow_groups",
    "group_providers",
}


@st.composite
def _inputs(draw: st.DrawFn) -> dict[str, Any]:
    gpus = draw(
        st.lists(
            st.sampled_from(["NVIDIA L4", "NVIDIA A10G", "NVIDIA L40S"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    marked = draw(st.lists(st.sampled_from(OFFERS), max_size=3))
    measured = draw(st.booleans())
    return {
        "spec": pool(*gpus, spot=draw(st.booleans())).model_copy(
            update={"command": draw(st.sampled_from([None, "--tensor-parallel-size 4"]))}
        ),
        "current_zones": draw(st.lists(st.sampled_from(["us-east-1a", "us-east-1b"]), max_size=3)),
        "unavailable": {
            unavailable_key(o, draw(st.sampled_from(list(Market)))): NOW
            + timedelta(seconds=draw(st.sampled_from([-60, 60])))
            for o in marked
        },
        "max_usd_per_hour": draw(st.sampled_from([None, 0.9, 2.0])),
        "input_tokens": draw(st.sampled_from([2000.0, 12000.0])) if measured else None,
        "output_tokens": draw(st.sampled_from([300.0, 900.0])) if measured else None,
        "input_scv": draw(st.sampled_from([None, 1.5])) if measured else None,
        "input_histogram": draw(st.sampled_from(_HISTOGRAMS)) if measured else None,
        "replicas_needed": draw(st.sampled_from([None, _two_small, _three_small])),
        "params_b": draw(st.sampled_from([8.0, 70.0])),
        "bytes_per_param": draw(st.sampled_from([2.0, 1.0])),
        "model_memory_gib": draw(st.sampled_from([20.0, 60.0])),
        "concurrency_cap": draw(st.sampled_from([2, 256])),
        "allow_groups": draw(st.booleans()),
        "group_providers": draw(st.sampled_from([None, ("aws",)])),
    }


@settings(max_examples=60, deadline=None)
@given(_inputs(), st.lists(st.tuples(st.sampled_from(sorted(_FIELDS)), _inputs()), max_size=6))
def test_a_shared_memo_gives_every_workload_the_placement_it_gets_alone(
    base: dict[str, Any], changes: list[tuple[str, dict[str, Any]]]
) -> None:
    # Workloads that differ from the first in one input each: a key that missed an
    # input would hand one of them another's placement.
    workloads = [base, *({**base, field: other[field]} for field, other in changes)]
    memo = PlacementMemo()
    for inputs in [*workloads, *reversed(workloads)]:
        common: dict[str, Any] = {"now": NOW, "offers": OFFERS}
        alone = place_replica(**common, **inputs)
        assert place_replica(**common, **inputs, memo=memo) == alone
    assert memo.computed + memo.shared == 2 * len(workloads)
    assert memo.shared >= len(workloads)  # each seen again in the reversed order


def test_steps_of_one_pass_share_the_placement_and_plan_as_alone() -> None:
    memo = PlacementMemo()
    quiet = Measured(signals=Signals())
    views = [
        WorkloadView(
            spec=pool(*gpus, min_workers=1),
            generation=1,
            replicas=(),
            measured=quiet,
            offers=OFFERS,
        )
        for gpus in (("NVIDIA L4",), ("NVIDIA L4",), ("NVIDIA A10G",))
    ]
    knobs = StepKnobs()
    placed = []
    for view in views:
        shared = step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=knobs, memo=memo)
        alone = step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=knobs)
        assert shared == alone
        placed.append(shared.placement)
    assert placed[0] is not None and placed[1] is placed[0]
    assert placed[2] is not None and placed[2].offer is not None
    assert placed[2].offer.gpu == "NVIDIA A10G"
    assert (memo.computed, memo.shared) == (2, 1)
