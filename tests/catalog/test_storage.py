"""A stopped machine's bill: its boot disk by the GB-month, per provider."""

from __future__ import annotations

import pytest

from catalog.model import Offer, ProviderName
from catalog.storage import LAUNCH_DISK_GIB, stopped_usd_per_hour

G5 = Offer(
    provider=ProviderName.AWS,
    region="us-east-1",
    zone="us-east-1a",
    instance_type="g5.xlarge",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=1.006,
)


@pytest.mark.parametrize(
    ("provider", "per_hour"),
    [
        (ProviderName.AWS, 0.08 * 200 / 730),  # gp3, us-east-1: $16.00 a month
        (ProviderName.GCP, 0.10 * 200 / 730),  # pd-balanced, us-central1: $20.00 a month
        (ProviderName.LOCAL, 0.0),
        (ProviderName.PRIVATE, 0.0),
    ],
)
def test_a_stopped_machine_costs_its_launch_disk(provider: ProviderName, per_hour: float) -> None:
    assert stopped_usd_per_hour(provider) == pytest.approx(per_hour)
    assert stopped_usd_per_hour(provider, LAUNCH_DISK_GIB) == pytest.approx(per_hour)


def test_an_offer_is_priced_by_its_provider_and_the_disk_size() -> None:
    assert stopped_usd_per_hour(G5, 100) == pytest.approx(
        stopped_usd_per_hour(ProviderName.AWS) / 2
    )
    # Parked, a g5.xlarge costs about 2 % of running it.
    assert stopped_usd_per_hour(G5) / G5.on_demand_usd_per_hour == pytest.approx(0.0218, abs=1e-4)


def test_a_negative_disk_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        stopped_usd_per_hour(G5, -1)
