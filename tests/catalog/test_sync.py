"""catalog sync against moto's EC2 server and local fakes of Pricing, spot and GCP APIs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials

from catalog.model import ProviderName
from catalog.snapshot import load_catalog, snapshot_path
from catalog.sync.aws import AwsSyncConfig
from catalog.sync.base import FetchError, NullProgress, RetryPolicy, ValidationError
from catalog.sync.gcp import GcpSyncConfig
from catalog.sync.run import SyncRequest, sync_catalog
from tests.catalog.conftest import AWS_PRICES, AWS_SPOT, CORE, L4, RAM, T4, gcp_fake, write_previous
from tests.catalog.fakes import AwsPricingFake, serve

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(attempts=4, initial_seconds=0.01, max_seconds=0.05)


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def aws_config(moto_url: str, fake_url: str) -> AwsSyncConfig:
    return AwsSyncConfig(
        regions=("us-east-1",),
        endpoints={"ec2": moto_url, "ec2_spot": fake_url, "pricing": fake_url},
        retry=FAST,
    )


@pytest.mark.usefixtures("aws_env")
async def test_aws_sync_builds_offers_from_ec2_pricing_and_spot(
    tmp_path: Path, moto_url: str
) -> None:
    write_previous(tmp_path)
    fake = AwsPricingFake(on_demand=dict(AWS_PRICES), spot=dict(AWS_SPOT))
    async with serve(fake.app()) as url:
        result = await sync_catalog(
            SyncRequest(data_dir=tmp_path, aws=aws_config(moto_url, url)),
            progress=NullProgress(),
            now=NOW,
        )
    active = load_catalog(tmp_path)
    assert active == result.snapshot
    assert active.taken_at == NOW
    aws = [o for o in active.offers if o.provider is ProviderName.AWS]
    assert {o.instance_type for o in aws} == {"g4dn.xlarge", "g5.xlarge", "p4de.24xlarge"}
    p4de = next(o for o in aws if o.instance_type == "p4de.24xlarge")
    assert (p4de.gpu, p4de.gpu_count, p4de.vcpus) == ("NVIDIA A100-SXM4-80GB", 8, 96)
    assert p4de.on_demand_usd_per_hour == pytest.approx(40.96575)
    g5a = next(o for o in aws if o.instance_type == "g5.xlarge" and o.zone == "us-east-1a")
    assert g5a.spot_usd_per_hour == pytest.approx(0.4)
    assert all(o.spot_usd_per_hour is None for o in aws if o.zone != "us-east-1a")
    # GCP was not synced: its offers are kept from the previous catalog.
    assert sum(o.provider is ProviderName.GCP for o in active.offers) == 2
    assert "GetProducts" in fake.calls
    assert "DescribeSpotPriceHistory" in fake.calls


@pytest.mark.usefixtures("aws_env")
async def test_throttled_pricing_calls_are_retried(tmp_path: Path, moto_url: str) -> None:
    write_previous(tmp_path)
    fake = AwsPricingFake(on_demand=dict(AWS_PRICES), throttle_next=2)
    async with serve(fake.app()) as url:
        await sync_catalog(
            SyncRequest(data_dir=tmp_path, aws=aws_config(moto_url, url)),
            progress=NullProgress(),
            now=NOW,
        )
    assert fake.calls.count("GetProducts") >= 3
    assert any(o.instance_type == "g5.xlarge" for o in load_catalog(tmp_path).offers)


@pytest.mark.usefixtures("aws_env")
async def test_a_failing_sync_leaves_the_previous_catalog(tmp_path: Path, moto_url: str) -> None:
    path = write_previous(tmp_path)
    before = path.read_bytes()
    fake = AwsPricingFake(on_demand=dict(AWS_PRICES), fail_with="AccessDeniedException")
    async with serve(fake.app()) as url:
        with pytest.raises(FetchError, match=r"aws us-east-1 GetProducts: .*AccessDenied"):
            await sync_catalog(
                SyncRequest(data_dir=tmp_path, aws=aws_config(moto_url, url)),
                progress=NullProgress(),
                now=NOW,
            )
    assert path.read_bytes() == before
    assert file_names(tmp_path) == ["catalog.json"]  # no temporary file left


@pytest.mark.usefixtures("aws_env")
async def test_losing_most_offers_is_refused_unless_forced(tmp_path: Path, moto_url: str) -> None:
    path = write_previous(tmp_path, aws_in_us_east_1=40)
    before = path.read_bytes()
    only_t4 = {("us-east-1", "g4dn.xlarge"): 0.526}
    fake = AwsPricingFake(on_demand=only_t4)
    async with serve(fake.app()) as url:
        request = SyncRequest(data_dir=tmp_path, aws=aws_config(moto_url, url))
        with pytest.raises(ValidationError, match=r"aws us-east-1: 40 -> \d+.*--force"):
            await sync_catalog(request, progress=NullProgress(), now=NOW)
        assert path.read_bytes() == before
        forced = SyncRequest(data_dir=tmp_path, aws=request.aws, force=True)
        await sync_catalog(forced, progress=NullProgress(), now=NOW)
    aws = [o for o in load_catalog(tmp_path).offers if o.provider is ProviderName.AWS]
    assert {o.instance_type for o in aws} == {"g4dn.xlarge"}


def gcp_config(url: str, *, regions: tuple[str, ...] = ("us-central1",)) -> GcpSyncConfig:
    return GcpSyncConfig(
        project="demo-project",
        regions=regions,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        compute_endpoint=url,
        billing_endpoint=url,
        retry=FAST,
    )


async def test_gcp_sync_prices_vm_plus_gpus(tmp_path: Path) -> None:
    write_previous(tmp_path)
    fake = gcp_fake()
    async with serve(fake.app()) as url:
        await sync_catalog(
            SyncRequest(data_dir=tmp_path, gcp=gcp_config(url)), progress=NullProgress(), now=NOW
        )
    offers = {o.key: o for o in load_catalog(tmp_path).offers if o.provider is ProviderName.GCP}
    g2 = offers["gcp/us-central1-a/g2-standard-8"]
    assert g2.gpu == "NVIDIA L4"
    assert g2.on_demand_usd_per_hour == pytest.approx(8 * CORE + 32 * RAM + L4, abs=1e-6)
    assert g2.spot_usd_per_hour == pytest.approx(8 * 0.01 + 32 * 0.001 + 0.2231, abs=1e-6)
    assert "gcp/us-central1-b/g2-standard-8" in offers  # second page of machine types
    n1 = offers["gcp/us-central1-a/n1-standard-8+1xnvidia-tesla-t4"]
    assert n1.gpu == "Tesla T4"
    assert n1.on_demand_usd_per_hour == pytest.approx(8 * 0.031611 + 30 * 0.004237 + T4, abs=1e-6)
    assert n1.spot_usd_per_hour is None  # no spot SKUs for N1 in the fake: not guessed
    assert not any(o.region == "europe-west4" for o in offers.values())  # not requested
    assert not any(o.instance_type == "e2-standard-4" for o in offers.values())
    assert fake.calls.count("machineTypes") == 3  # one page per zone


async def test_gcp_billing_failure_keeps_previous_catalog(tmp_path: Path) -> None:
    path = write_previous(tmp_path)
    before = path.read_bytes()
    fake = gcp_fake()
    fake.fail_billing = True
    async with serve(fake.app()) as url:
        with pytest.raises(FetchError, match=r"gcp billing skus: .*403"):
            await sync_catalog(
                SyncRequest(data_dir=tmp_path, gcp=gcp_config(url)),
                progress=NullProgress(),
                now=NOW,
            )
    assert snapshot_path(tmp_path).read_bytes() == before
