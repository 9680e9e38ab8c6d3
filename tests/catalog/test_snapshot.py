"""Snapshots: the bundled catalog, the data dir override, atomic writes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from catalog.gpus import all_gpus, resolve_gpu
from catalog.model import ProviderName
from catalog.snapshot import (
    Snapshot,
    SnapshotError,
    load_bundled,
    load_catalog,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)


def test_bundled_snapshot_covers_the_gpu_families_of_both_providers() -> None:
    snapshot = load_bundled()
    types = {(offer.provider, offer.instance_type.split(".")[0]) for offer in snapshot.offers}
    for family in ("g4dn", "g5", "g6", "g6e", "p4d", "p4de", "p5", "p5en"):
        assert (ProviderName.AWS, family) in types, family
    gcp_types = {o.instance_type for o in snapshot.offers if o.provider is ProviderName.GCP}
    for machine in (
        "n1-standard-8",
        "g2-standard-8",
        "a2-highgpu-1g",
        "a2-ultragpu-8g",
        "a3-highgpu-8g",
        "a3-megagpu-8g",
        "a3-ultragpu-8g",
    ):
        assert machine in gcp_types, machine
    regions = {offer.region for offer in snapshot.offers}
    assert {
        "us-east-1",
        "eu-central-1",
        "ap-northeast-1",
        "us-central1",
        "europe-west4",
        "asia-southeast1",
    } <= regions
    assert snapshot.source
    assert any("extrapolated" in note for note in snapshot.notes)


def test_bundled_offers_name_known_gpus_and_have_unique_keys() -> None:
    snapshot = load_bundled()
    names = {gpu.display_name for gpu in all_gpus()}
    assert {offer.gpu for offer in snapshot.offers} <= names
    keys = [offer.key for offer in snapshot.offers]
    assert len(keys) == len(set(keys))
    for offer in snapshot.offers:
        assert offer.on_demand_usd_per_hour > 0
        assert offer.spot_usd_per_hour is None or offer.spot_usd_per_hour > 0


def test_gcp_offers_carry_vm_plus_gpu_totals() -> None:
    snapshot = load_bundled()
    a2 = next(
        o
        for o in snapshot.offers
        if o.zone == "us-central1-a" and o.instance_type == "a2-highgpu-1g"
    )
    # VM row 0.73948 + one A100 GPU row 2.93391 in the source.
    assert a2.on_demand_usd_per_hour == pytest.approx(0.73948 + 2.93391, abs=1e-4)
    assert resolve_gpu(a2.gpu).display_name == "NVIDIA A100-SXM4-40GB"


def test_load_catalog_prefers_the_data_dir(tmp_path: Path) -> None:
    bundled = load_catalog(tmp_path)
    assert bundled.location.startswith("bundled")
    newer = Snapshot(
        offers=bundled.offers[:3], taken_at=datetime(2026, 1, 2, tzinfo=UTC), source="test"
    )
    write_snapshot(newer, snapshot_path(tmp_path))
    active = load_catalog(tmp_path)
    assert active == newer
    assert active.location == str(snapshot_path(tmp_path))


def test_write_is_atomic_and_round_trips(tmp_path: Path) -> None:
    offers = load_bundled().offers[:5]
    first = Snapshot(offers=offers, taken_at=datetime(2026, 1, 2, tzinfo=UTC), source="one")
    path = tmp_path / "catalog.json"
    write_snapshot(first, path)
    second = replace(first, source="two", offers=offers[:2])
    write_snapshot(second, path)
    assert read_snapshot(path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.json"]  # no temp left behind


def test_damaged_snapshot_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text('{"format": 1, "taken_at": "2026-01-01T00:00:00+00:00", "columns": []}')
    with pytest.raises(SnapshotError, match=r"catalog\.json: not a valid catalog snapshot"):
        read_snapshot(path)
