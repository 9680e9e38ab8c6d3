"""Shared fixtures: moto's EC2 server and fake-cloud data used by the sync tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, snapshot_path, write_snapshot
from tests.catalog.fakes import GcpFake, GcpMachine, sku


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def offer(provider: ProviderName, region: str, zone: str, instance_type: str) -> Offer:
    return Offer(
        provider=provider,
        region=region,
        zone=zone,
        instance_type=instance_type,
        gpu="NVIDIA L4",
        gpu_count=1,
        vcpus=4,
        memory_gib=16,
        on_demand_usd_per_hour=1.0,
    )


def write_previous(data_dir: Path, *, aws_in_us_east_1: int = 4) -> Path:
    """A small active catalog: some AWS us-east-1 offers and two GCP offers."""
    offers = [
        offer(ProviderName.AWS, "us-east-1", "us-east-1a", f"old{i}.xlarge")
        for i in range(aws_in_us_east_1)
    ]
    offers += [
        offer(ProviderName.GCP, "us-central1", "us-central1-a", f"g2-old-{i}") for i in range(2)
    ]
    previous = Snapshot(
        offers=tuple(offers), taken_at=datetime(2026, 1, 1, tzinfo=UTC), source="previous"
    )
    path = snapshot_path(data_dir)
    write_snapshot(previous, path)
    return path


AWS_PRICES = {
    ("us-east-1", "g4dn.xlarge"): 0.526,
    ("us-east-1", "g5.xlarge"): 1.006,
    ("us-east-1", "p4de.24xlarge"): 40.96575,
    ("us-east-1", "m5.large"): 0.096,  # not a GPU type: must not become an offer
}
AWS_SPOT = {("us-east-1", "us-east-1a", "g5.xlarge"): 0.4}

CORE, RAM, L4, T4 = 0.024988, 0.002927, 0.56, 0.35


def gcp_fake() -> GcpFake:
    americas = ["us-central1"]
    return GcpFake(
        machines=[
            GcpMachine("us-central1-a", "g2-standard-8", 8, 32768, ("nvidia-l4", 1)),
            GcpMachine("us-central1-b", "g2-standard-8", 8, 32768, ("nvidia-l4", 1)),
            GcpMachine("us-central1-a", "n1-standard-8", 8, 30720),
            GcpMachine("us-central1-a", "e2-standard-4", 4, 16384),
            GcpMachine("europe-west4-a", "g2-standard-8", 8, 32768, ("nvidia-l4", 1)),
        ],
        accelerators={
            "us-central1-a": {"nvidia-tesla-t4": 4, "nvidia-l4": 8},
            "europe-west4-a": {"nvidia-l4": 8},
        },
        skus=[
            sku("G2 Instance Core running in Americas", regions=americas, usd=CORE, group="CPU"),
            sku("G2 Instance Ram running in Americas", regions=americas, usd=RAM, group="RAM"),
            sku("Nvidia L4 GPU running in Americas", regions=americas, usd=L4),
            sku("Spot Preemptible Nvidia L4 GPU running in Americas", regions=americas, usd=0.2231),
            sku(
                "Spot Preemptible G2 Instance Core running in Americas",
                regions=americas,
                usd=0.01,
                group="CPU",
            ),
            sku(
                "Spot Preemptible G2 Instance Ram running in Americas",
                regions=americas,
                usd=0.001,
                group="RAM",
            ),
            sku(
                "N1 Predefined Instance Core running in Americas",
                regions=americas,
                usd=0.031611,
                group="CPU",
            ),
            sku(
                "N1 Predefined Instance Ram running in Americas",
                regions=americas,
                usd=0.004237,
                group="RAM",
            ),
            sku("Nvidia Tesla T4 GPU running in Americas", regions=americas, usd=T4),
            sku("Commitment v1: Nvidia L4 GPU in Americas for 1 Year", regions=americas, usd=0.01),
        ],
    )
