"""Catalog snapshots: the offers at one moment, on disk as one JSON file.

The bundled snapshot (``catalog/data/offers.json``) ships with the package. ``catalog
sync`` writes a fresher one into the data dir (``$AUTOSCALER_DATA_DIR`` or
``~/.local/share/autoscaler``); ``load_catalog`` prefers that one. Writes are atomic (a
temporary file in the same directory, then ``os.replace``), so a reader sees either the
old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from catalog.model import Offer, ProviderName

SNAPSHOT_FILE = "catalog.json"
BUNDLED_FILE = "offers.json"
FORMAT_VERSION = 1
COLUMNS: tuple[str, ...] = (
    "provider",
    "region",
    "zone",
    "instance_type",
    "gpu",
    "gpu_count",
    "vcpus",
    "memory_gib",
    "on_demand_usd_per_hour",
    "spot_usd_per_hour",
    "labels",
)


class SnapshotError(ValueError):
    """A snapshot file that cannot be read: names the file and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The offers known at ``taken_at``, where they came from, and how the prices were made."""

    offers: tuple[Offer, ...]
    taken_at: datetime
    source: str
    notes: tuple[str, ...] = ()
    location: str = field(default="", compare=False)

    def age(self, *, now: datetime) -> float:
        """Seconds since the snapshot was taken."""
        return (now - self.taken_at).total_seconds()


def default_data_dir() -> Path:
    """``$AUTOSCALER_DATA_DIR``, else ``$XDG_DATA_HOME/autoscaler``, else ``~/.local/share/...``."""
    explicit = os.environ.get("AUTOSCALER_DATA_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "autoscaler"


def snapshot_path(data_dir: Path | None = None) -> Path:
    """Where the synced snapshot lives in ``data_dir`` (the default data dir if ``None``)."""
    return (data_dir or default_data_dir()) / SNAPSHOT_FILE


def load_catalog(data_dir: Path | None = None) -> Snapshot:
    """The active catalog: the synced snapshot in the data dir if any, else the bundled one."""
    synced = snapshot_path(data_dir)
    if synced.exists():
        return read_snapshot(synced)
    return load_bundled()


@functools.cache
def load_bundled() -> Snapshot:
    """The snapshot that ships with the package (read once per process: it never changes
    while the process runs, and admission reads it on every apply)."""
    text = resources.files("catalog.data").joinpath(BUNDLED_FILE).read_text()
    return parse_snapshot(text, location=f"bundled ({BUNDLED_FILE})")


def read_snapshot(path: Path) -> Snapshot:
    """Read one snapshot file; ``SnapshotError`` names the file when it is damaged."""
    return parse_snapshot(path.read_text(), location=str(path))


def parse_snapshot(text: str, *, location: str) -> Snapshot:
    """Decode snapshot JSON; ``location`` names the file in errors."""
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT_VERSION:
            raise SnapshotError(f"{location}: unsupported snapshot format {raw.get('format')!r}")
        columns = tuple(raw["columns"])
        offers = tuple(_offer_from_row(dict(zip(columns, row, strict=True))) for row in raw["rows"])
        taken_at = datetime.fromisoformat(raw["taken_at"])
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{location}: not a valid catalog snapshot: {exc}") from exc
    if taken_at.tzinfo is None:
        taken_at = taken_at.replace(tzinfo=UTC)
    return Snapshot(
        offers=offers,
        taken_at=taken_at,
        source=str(raw.get("source", "")),
        notes=tuple(str(note) for note in raw.get("notes", ())),
        location=location,
    )


def _offer_from_row(row: Mapping[str, Any]) -> Offer:
    spot = row["spot_usd_per_hour"]
    return Offer(
        provider=ProviderName(row["provider"]),
        region=str(row["region"]),
        zone=str(row["zone"]),
        instance_type=str(row["instance_type"]),
        gpu=str(row["gpu"]),
        gpu_count=int(row["gpu_count"]),
        vcpus=float(row["vcpus"]),
        memory_gib=float(row["memory_gib"]),
        on_demand_usd_per_hour=float(row["on_demand_usd_per_hour"]),
        spot_usd_per_hour=None if spot is None else float(spot),
        labels=tuple((str(key), str(value)) for key, value in row.get("labels", ())),
    )


def _offer_to_row(offer: Offer) -> list[Any]:
    return [
        offer.provider.value,
        offer.region,
        offer.zone,
        offer.instance_type,
        offer.gpu,
        offer.gpu_count,
        offer.vcpus,
        offer.memory_gib,
        round(offer.on_demand_usd_per_hour, 6),
        None if offer.spot_usd_per_hour is None else round(offer.spot_usd_per_hour, 6),
        [list(pair) for pair in offer.labels],
    ]


def render_snapshot(snapshot: Snapshot) -> str:
    """Encode a snapshot as JSON, offers sorted by key so that diffs stay readable."""
    ordered = canonical_order(snapshot.offers)
    document = {
        "format": FORMAT_VERSION,
        "taken_at": snapshot.taken_at.isoformat(),
        "source": snapshot.source,
        "notes": list(snapshot.notes),
        "columns": list(COLUMNS),
    }
    # One offer per line: a re-sync shows up in git diff as the rows that changed.
    rows = ",\n    ".join(json.dumps(_offer_to_row(offer)) for offer in ordered)
    head = json.dumps(document, indent=2)[:-2]
    return f'{head},\n  "rows": [\n    {rows}\n  ]\n}}\n'


def canonical_order(offers: Iterable[Offer]) -> tuple[Offer, ...]:
    """Offers in the order a snapshot file stores them: by key."""
    return tuple(sorted(offers, key=lambda offer: (offer.key, offer.gpu, offer.gpu_count)))


def write_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Write atomically: readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_snapshot(snapshot)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a snapshot is not a secret
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
