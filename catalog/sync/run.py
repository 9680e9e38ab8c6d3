"""One catalog sync: fetch, merge with the active snapshot, validate, write atomically.

Offers of each synced (provider, region) replace that pair's old offers; everything else
is kept from the active snapshot. Before anything is written the result is checked: a
provider region that had offers and now has fewer than ``min_kept_fraction`` of them is
taken for a broken fetch, not a market change, and refused unless ``force``. Any failure
leaves the active snapshot as it was.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, canonical_order, load_catalog, snapshot_path, write_snapshot
from catalog.sync.aws import AwsSyncConfig, fetch_aws
from catalog.sync.base import SyncError, SyncProgress, ValidationError
from catalog.sync.gcp import GcpSyncConfig, fetch_gcp


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """What to sync and where the snapshot lives. A provider with no config is not synced."""

    data_dir: Path
    aws: AwsSyncConfig | None = None
    gcp: GcpSyncConfig | None = None
    force: bool = False
    min_kept_fraction: float = 0.5


@dataclass(frozen=True, slots=True)
class RegionCount:
    provider: ProviderName
    region: str
    before: int
    after: int


@dataclass(frozen=True, slots=True)
class SyncResult:
    snapshot: Snapshot
    path: Path
    counts: tuple[RegionCount, ...]


async def sync_catalog(
    request: SyncRequest, *, progress: SyncProgress, now: datetime
) -> SyncResult:
    """Fetch the configured providers and replace the active snapshot, or raise ``SyncError``."""
    if request.aws is None and request.gcp is None:
        raise SyncError("nothing to sync: configure at least one provider")
    previous = await asyncio.to_thread(load_catalog, request.data_dir)
    fetches: list[tuple[ProviderName, tuple[str, ...]]] = []
    jobs = []
    if request.aws is not None:
        fetches.append((ProviderName.AWS, request.aws.regions))
        jobs.append(fetch_aws(request.aws, progress=progress))
    if request.gcp is not None:
        fetches.append((ProviderName.GCP, request.gcp.regions))
        jobs.append(fetch_gcp(request.gcp, progress=progress))
    results = await asyncio.gather(*jobs)
    fetched = [offer for offers in results for offer in offers]
    synced = {(provider, region) for provider, regions in fetches for region in regions}
    counts = _counts(previous.offers, fetched, synced)
    _validate(counts, force=request.force, min_kept_fraction=request.min_kept_fraction)
    kept = [o for o in previous.offers if (o.provider, o.region) not in synced]
    snapshot = Snapshot(
        offers=canonical_order(kept + fetched),
        taken_at=now,
        source=_describe(fetches, request),
        notes=_notes(previous, kept_any=bool(kept)),
    )
    path = snapshot_path(request.data_dir)
    await asyncio.to_thread(write_snapshot, snapshot, path)
    return SyncResult(snapshot=snapshot, path=path, counts=counts)


def _counts(
    before: tuple[Offer, ...], after: list[Offer], synced: set[tuple[ProviderName, str]]
) -> tuple[RegionCount, ...]:
    old = Counter((o.provider, o.region) for o in before)
    new = Counter((o.provider, o.region) for o in after)
    return tuple(
        RegionCount(provider=provider, region=region, before=old[key], after=new[key])
        for key in sorted(synced)
        for provider, region in [key]
    )


def _validate(counts: tuple[RegionCount, ...], *, force: bool, min_kept_fraction: float) -> None:
    if force:
        return
    if counts and all(count.after == 0 for count in counts):
        raise ValidationError("the sync fetched no offers at all; refusing to replace the catalog")
    lost = [c for c in counts if c.before and c.after < c.before * min_kept_fraction]
    if lost:
        detail = ", ".join(f"{c.provider.value} {c.region}: {c.before} -> {c.after}" for c in lost)
        raise ValidationError(
            f"the new catalog would lose most offers ({detail}); "
            "the previous catalog is kept (use --force to accept)"
        )


def _describe(fetches: list[tuple[ProviderName, tuple[str, ...]]], request: SyncRequest) -> str:
    parts = []
    for provider, regions in fetches:
        where = ", ".join(regions)
        if provider is ProviderName.AWS:
            parts.append(f"aws EC2 + Pricing API ({where})")
        else:
            project = request.gcp.project if request.gcp else ""
            parts.append(f"gcp Compute + Cloud Billing Catalog, project {project} ({where})")
    return "sync: " + "; ".join(parts)


def _notes(previous: Snapshot, *, kept_any: bool) -> tuple[str, ...]:
    notes = ["Prices in USD per hour, list prices; GCP offers total the VM and its GPUs."]
    if kept_any:
        notes.append(
            f"Regions not synced are kept from the previous catalog ({previous.source}, "
            f"taken {previous.taken_at.isoformat()})."
        )
    return tuple(notes)
