"""Controller configuration errors name the key; leaders are elected on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from autoscaler.config import (
    DEFAULT_FLEET_MAX_HOURLY_COST_USD,
    ConfigError,
    load_config,
    parse_config,
    parse_offset,
)
from autoscaler.controller import LeaderLock, build_controller, offers_for
from autoscaler.spec import DEFAULT_MAX_REPLICAS
from autoscaler.store.db import open_store, session_factory
from catalog.snapshot import load_bundled
from tests.conftest import fresh_pg_database


def test_no_config_means_this_machine_alone() -> None:
    config = load_config(None)
    assert config.cluster_id == "local"
    assert config.providers.local is not None
    assert config.providers.aws is None and config.providers.gcp is None
    offers = offers_for(config, load_bundled())
    assert [o.provider.value for o in offers] == ["local"]


def test_with_no_config_there_is_still_a_fleet_ceiling_and_a_replica_maximum() -> None:
    config = load_config(None)
    assert config.fleet_max_hourly_cost_usd == DEFAULT_FLEET_MAX_HOURLY_COST_USD
    assert config.max_replicas_per_workload == DEFAULT_MAX_REPLICAS
    assert config.limits_summary() == (
        f"fleet ceiling ${DEFAULT_FLEET_MAX_HOURLY_COST_USD:,.2f}/h (the default; set "
        f"fleet_max_hourly_cost_usd in --config); at most {DEFAULT_MAX_REPLICAS} replicas "
        "per workload"
    )
    given = parse_config(
        {"fleet_max_hourly_cost_usd": 40, "max_replicas_per_workload": 8}, source="x"
    )
    assert given.limits_summary() == (
        "fleet ceiling $40.00/h (from the config); at most 8 replicas per workload"
    )


def test_a_schedule_offset_is_said_at_start_and_bounded() -> None:
    now = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    assert load_config(None).schedule_clock_summary(now=now) is None
    shifted = parse_config({"schedule_offset_sec": 9 * 3600}, source="x")
    assert shifted.schedule_clock_summary(now=now) == (
        "SCHEDULE CLOCK SHIFTED +9h00m00s (schedule_offset_sec): scheduled workloads run as "
        "if it were Mon 2026-11-30 20:00:00 UTC; a rehearsal setting, not for production"
    )
    assert load_config(None).with_schedule_offset(-1800).schedule_offset_sec == -1800
    with pytest.raises(ConfigError, match="x: schedule_offset_sec: Input should be less"):
        parse_config({"schedule_offset_sec": 400 * 86400}, source="x")
    with pytest.raises(ConfigError, match=r"--schedule-offset: 3\.456e"):
        load_config(None).with_schedule_offset(400 * 86400)
    assert [parse_offset(t) for t in ("+9h", "-30m", "1h30m", "-3600", "0")] == [
        32400,
        -1800,
        5400,
        -3600,
        0,
    ]
    with pytest.raises(ValueError, match=r"offset '1\.5h' is not like '\+9h'"):
        parse_offset("1.5h")


def test_a_full_config_reads_every_provider(tmp_path: Path) -> None:
    path = tmp_path / "controller.yaml"
    path.write_text(
        "cluster_id: prod-eu\n"
        "fleet_max_hourly_cost_usd: 120\n"
        "callback_url: https://autoscaler.internal:8001\n"
        "providers:\n"
        "  aws:\n"
        "    regions: [us-east-1, eu-west-1]\n"
        "    subnets: {us-east-1a: subnet-123}\n"
        "    security_group_id: sg-1\n"
        "    ami_overrides: {'12.4': ami-1}\n"
        "    endpoint_url: http://127.0.0.1:5000\n"
        "  gcp:\n"
        "    project: acme-ml\n"
        "    zones: [europe-west4-a]\n"
        "    network: global/networks/ml\n"
    )
    config = load_config(path)
    assert config.fleet_max_hourly_cost_usd == 120
    assert config.providers.local is None  # named providers only
    aws = config.providers.aws
    assert aws is not None
    assert aws.provider_config().regions == ("us-east-1", "eu-west-1")
    assert aws.provider_config().subnets == {"us-east-1a": "subnet-123"}
    offers = offers_for(config, load_bundled())
    assert {o.provider.value for o in offers} == {"aws", "gcp"}
    assert {o.region for o in offers if o.provider.value == "aws"} <= {"us-east-1", "eu-west-1"}


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ({"fleet_max_hourly_cost_usd": -5}, "fleet_max_hourly_cost_usd"),
        ({"fleet_max_hourly_cost_usd": None}, "fleet_max_hourly_cost_usd"),
        ({"max_replicas_per_workload": 0}, "max_replicas_per_workload"),
        ({"providers": {"aws": {"regions": []}}}, "providers.aws.regions"),
        ({"providers": {"gcp": {"zones": ["a"]}}}, "providers.gcp.project"),
        ({"providers": {"aws": {"regon": "x"}}}, "providers.aws.regon"),
        ({"cluster_id": "Not Valid!"}, "cluster_id"),
        ({"tick_sec": "soon"}, "tick_sec"),
        ({"tick_sec": float("inf")}, "tick_sec"),  # the loop would never tick again
        ({"unavailable_sec": 1e300}, "unavailable_sec"),  # overflows the clock arithmetic
        ({"orphan_grace_sec": float("nan")}, "orphan_grace_sec"),
        ({"catalog_sync": {"interval_sec": float("inf")}}, "catalog_sync.interval_sec"),
        ({"group_providers": ["local"]}, "group_providers"),
    ],
)
def test_bad_config_names_the_key(document: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, source="ctl.yaml")
    assert f"controller config ctl.yaml: {names}" in str(caught.value)


async def test_groups_are_placed_on_the_providers_with_placement_affinity_unless_configured(
    tmp_path: Path,
) -> None:
    assert load_config(None).group_providers == ["aws", "gcp", "simulated"]
    with pytest.raises(ConfigError) as caught:
        parse_config({"group_providers": ["aws", "local"]}, source="ctl.yaml")
    assert str(caught.value) == (
        "controller config ctl.yaml: group_providers: Value error, 'local' cannot place "
        "replica groups; allowed: aws, gcp, simulated"
    )
    config = parse_config({"group_providers": ["gcp"]}, source="ctl.yaml")
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        controller = build_controller(
            config, sessions=session_factory(engine), data_dir=tmp_path, catalog=load_bundled()
        )
        assert controller.deps.settings.group_providers == frozenset({"gcp"})
        assert controller.deps.settings.knobs.group_providers == frozenset({"gcp"})
        await controller.close()


def test_unreadable_and_malformed_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.postgres
def test_one_leader_at_a_time_and_a_standby_takes_over() -> None:
    async def scenario(url: str) -> None:
        async with open_store(url) as a, open_store(url) as b:
            first, second = LeaderLock(a), LeaderLock(b)
            assert await first.hold()
            assert not await second.hold()  # standby
            assert await first.hold()  # still leading
            await first.release()  # its session ends (as when the process dies)
            assert await second.hold()
            assert not await first.hold()
            await second.release()

    with fresh_pg_database() as url:
        asyncio.run(scenario(url))


async def test_sqlite_has_a_single_leader(tmp_path: Path) -> None:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 's.db'}") as engine:
        assert await LeaderLock(engine).hold()
