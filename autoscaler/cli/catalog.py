"""``autoscaler catalog``: refresh the GPU offer catalog from AWS and GCP, and query it."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from catalog.cuda import UnknownCudaVersionError, cuda_supports, known_cuda_versions
from catalog.gpus import UnknownGpuError, all_gpus, resolve_gpu
from catalog.model import GpuModel, ProviderName
from catalog.query import Candidate, OfferRequest, Rejection, select_offers
from catalog.snapshot import Snapshot, SnapshotError, default_data_dir, load_catalog

CLOUDS = ("aws", "gcp")
DEFAULT_AWS_REGIONS = (
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
    "ap-southeast-1",
)
DEFAULT_GCP_REGIONS = (
    "us-central1",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-west1",
    "us-west4",
    "europe-west1",
    "europe-west4",
    "asia-east1",
    "asia-northeast1",
    "asia-southeast1",
)

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the synced catalog lives [default: $AUTOSCALER_DATA_DIR or "
    "~/.local/share/autoscaler].",
)


def register(group: click.Group) -> None:
    """Add the ``catalog`` command group to ``group``."""
    group.add_command(catalog_group)


@click.group("catalog")
def catalog_group() -> None:
    """The GPU offer catalog: sync it from AWS and GCP, list offers, show GPUs."""


def _load(data_dir: Path | None) -> Snapshot:
    try:
        return load_catalog(data_dir)
    except SnapshotError as exc:
        raise click.ClickException(str(exc)) from exc


def _age_text(snapshot: Snapshot, *, now: datetime) -> str:
    seconds = max(snapshot.age(now=now), 0.0)
    if seconds < 3600:
        age = f"{seconds / 60:.0f} minutes"
    elif seconds < 2 * 86400:
        age = f"{seconds / 3600:.0f} hours"
    else:
        age = f"{seconds / 86400:.0f} days"
    return (
        f"catalog: {snapshot.location}, taken {snapshot.taken_at:%Y-%m-%d %H:%M} UTC "
        f"({age} old), {len(snapshot.offers)} offers; source: {snapshot.source}"
    )


def _canonical_gpus(names: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(resolve_gpu(name).display_name for name in names)
    except UnknownGpuError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gpu'") from exc


@catalog_group.command("list")
@click.option("--gpu", "gpus", multiple=True, help="GPU name or alias (repeatable).")
@click.option("--min-vram", type=float, help="Least total GPU memory per instance, GiB.")
@click.option("--gpu-count", type=click.IntRange(min=1), help="Exact number of GPUs.")
@click.option("--max-price", type=float, help="Hourly price ceiling in USD.")
@click.option("--cuda", "cuda", multiple=True, help="Allowed CUDA version (repeatable).")
@click.option("--spot", is_flag=True, help="Allow spot: price offers at spot where sold.")
@click.option("--provider", "providers", multiple=True, type=click.Choice(CLOUDS))
@click.option("--region", "regions", multiple=True, help="Allowed region (repeatable).")
@click.option("--explain", is_flag=True, help="Also show the rejected offers and why.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Rows per table (JSON output is never cut).",
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@data_dir_option
def list_command(
    *,
    gpus: tuple[str, ...],
    min_vram: float | None,
    gpu_count: int | None,
    max_price: float | None,
    cuda: tuple[str, ...],
    spot: bool,
    providers: tuple[str, ...],
    regions: tuple[str, ...],
    explain: bool,
    limit: int,
    output: str,
    data_dir: Path | None,
) -> None:
    """Offers that fit the filters, cheapest first."""
    try:
        request = OfferRequest(
            gpus=_canonical_gpus(gpus),
            min_vram_gib=min_vram,
            gpu_count=gpu_count,
            providers=tuple(ProviderName(p) for p in providers),
            regions=regions,
            spot=spot,
            max_usd_per_hour=max_price,
            cuda_versions=cuda,
        )
    except UnknownCudaVersionError as exc:
        raise click.BadParameter(str(exc), param_hint="'--cuda'") from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    snapshot = _load(data_dir)
    selection = select_offers(snapshot.offers, request)
    now = datetime.now(UTC)
    if output == "json":
        document: dict[str, Any] = {
            "catalog": _catalog_json(snapshot, now=now),
            "offers": [_candidate_json(c) for c in selection.feasible],
        }
        if explain:
            document["rejected"] = [_rejection_json(r) for r in selection.rejected]
        click.echo(json.dumps(document, indent=2))
        return
    console = Console(width=200)
    console.print(_age_text(snapshot, now=now), style="dim", highlight=False)
    console.print(_offers_table(selection.feasible[:limit]))
    shown = min(limit, len(selection.feasible))
    console.print(
        f"{len(selection.feasible)} offers fit (showing {shown}); "
        f"{len(selection.rejected)} rejected",
        highlight=False,
    )
    if explain:
        _print_rejections(console, selection.rejected, limit=limit)


def _catalog_json(snapshot: Snapshot, *, now: datetime) -> dict[str, Any]:
    return {
        "location": snapshot.location,
        "taken_at": snapshot.taken_at.isoformat(),
        "age_seconds": round(snapshot.age(now=now)),
        "source": snapshot.source,
        "offers": len(snapshot.offers),
    }


def _candidate_json(candidate: Candidate) -> dict[str, Any]:
    offer = candidate.offer
    return {
        "key": offer.key,
        "provider": offer.provider.value,
        "region": offer.region,
        "zone": offer.zone,
        "instance_type": offer.instance_type,
        "gpu": offer.gpu,
        "gpu_count": offer.gpu_count,
        "vcpus": offer.vcpus,
        "memory_gib": offer.memory_gib,
        "on_demand_usd_per_hour": offer.on_demand_usd_per_hour,
        "spot_usd_per_hour": offer.spot_usd_per_hour,
        "market": candidate.market.value,
        "usd_per_hour": candidate.usd_per_hour,
        "labels": dict(offer.labels),
    }


def _rejection_json(rejection: Rejection) -> dict[str, Any]:
    return {
        "key": rejection.offer.key,
        "reason": rejection.reason.value,
        "detail": rejection.detail,
    }


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _offers_table(candidates: tuple[Candidate, ...]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "provider",
        "zone",
        "instance type",
        "GPU",
        "n",
        "vCPU",
        "mem GiB",
        "on-demand $/h",
        "spot $/h",
        "price $/h",
    ):
        justify = "right" if column in ("n", "vCPU", "mem GiB") or "$" in column else "left"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for candidate in candidates:
        offer = candidate.offer
        instance = offer.instance_type
        attached = offer.label("accelerator_type")
        if attached:
            instance = f"{instance} + {offer.gpu_count}x {attached}"
        table.add_row(
            offer.provider.value,
            offer.zone,
            instance,
            offer.gpu,
            str(offer.gpu_count),
            f"{offer.vcpus:g}",
            f"{offer.memory_gib:g}",
            _money(offer.on_demand_usd_per_hour),
            _money(offer.spot_usd_per_hour),
            f"{candidate.usd_per_hour:.4f} {candidate.market}",
        )
    return table


def _print_rejections(console: Console, rejected: tuple[Rejection, ...], *, limit: int) -> None:
    counts: dict[str, int] = {}
    for rejection in rejected:
        counts[rejection.reason.value] = counts.get(rejection.reason.value, 0) + 1
    summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
    console.print(f"rejected by reason: {summary or 'none'}", highlight=False)
    table = Table(box=None, header_style="bold")
    table.add_column("offer")
    table.add_column("reason")
    table.add_column("detail")
    for rejection in rejected[:limit]:
        table.add_row(rejection.offer.key, rejection.reason.value, rejection.detail)
    console.print(table)


@catalog_group.command("show")
@click.argument("name", required=False)
@data_dir_option
def show_command(*, name: str | None, data_dir: Path | None) -> None:
    """A GPU's specification, CUDA support and offers; without NAME, every known GPU."""
    snapshot = _load(data_dir)
    console = Console(width=200)
    console.print(_age_text(snapshot, now=datetime.now(UTC)), style="dim", highlight=False)
    if name is None:
        table = Table(box=None, header_style="bold")
        for column in ("GPU", "VRAM GiB", "architecture", "CC", "aliases"):
            table.add_column(column)
        for gpu in all_gpus():
            table.add_row(
                gpu.display_name,
                f"{gpu.vram_gib:g}",
                gpu.architecture,
                _cc(gpu),
                ", ".join(gpu.aliases),
            )
        console.print(table)
        return
    try:
        gpu = resolve_gpu(name)
    except UnknownGpuError as exc:
        raise click.BadParameter(str(exc), param_hint="'NAME'") from exc
    cuda = [v for v in known_cuda_versions() if cuda_supports(gpu, v)]
    lines = [
        f"{gpu.display_name}",
        f"  VRAM:               {gpu.vram_gib:g} GiB",
        f"  architecture:       {gpu.architecture} (compute capability {_cc(gpu)})",
        f"  interconnect:       {gpu.interconnect}",
        f"  aliases:            {', '.join(gpu.aliases) or '-'}",
        f"  CUDA versions:      {', '.join(cuda) or 'none in the table'}",
    ]
    console.print("\n".join(lines), highlight=False)
    selection = select_offers(snapshot.offers, OfferRequest(gpus=(gpu.display_name,)))
    console.print(
        f"  offers:             {len(selection.feasible)} (cheapest first)", highlight=False
    )
    console.print(_offers_table(selection.feasible[:15]))


def _cc(gpu: GpuModel) -> str:
    return ".".join(str(part) for part in gpu.compute_capability)


class _RichProgress:
    """A progress bar per provider and region."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def start(self, task: str, *, total: int) -> None:
        self._tasks[task] = self._progress.add_task(task, total=total)

    def advance(self, task: str, steps: int = 1) -> None:
        if task in self._tasks:
            self._progress.advance(self._tasks[task], steps)


@dataclass(frozen=True, slots=True)
class _Endpoints:
    aws: dict[str, str]
    gcp_compute: str | None
    gcp_billing: str | None


def _parse_endpoints(values: tuple[str, ...]) -> dict[str, str]:
    endpoints = {}
    for value in values:
        service, sep, url = value.partition("=")
        if not sep or service not in ("ec2", "ec2_spot", "pricing") or not url:
            raise click.BadParameter(
                f"{value!r}: expected SERVICE=URL with SERVICE one of ec2, ec2_spot, pricing",
                param_hint="'--aws-endpoint'",
            )
        endpoints[service] = url
    return endpoints


@catalog_group.command("sync")
@click.option(
    "--provider",
    "providers",
    multiple=True,
    type=click.Choice(CLOUDS),
    help="Provider to sync (repeatable) [default: aws and gcp].",
)
@click.option(
    "--aws-region",
    "aws_regions",
    multiple=True,
    help=f"AWS region (repeatable) [default: {', '.join(DEFAULT_AWS_REGIONS)}].",
)
@click.option(
    "--gcp-region",
    "gcp_regions",
    multiple=True,
    help=f"GCP region (repeatable) [default: {', '.join(DEFAULT_GCP_REGIONS)}].",
)
@click.option("--gcp-project", envvar="GOOGLE_CLOUD_PROJECT", help="GCP project to list from.")
@click.option(
    "--gcp-api-key", envvar="GOOGLE_API_KEY", help="API key for the Cloud Billing Catalog API."
)
@click.option(
    "--aws-endpoint",
    "aws_endpoints",
    multiple=True,
    metavar="SERVICE=URL",
    help="Override an AWS endpoint: ec2, ec2_spot or pricing (repeatable).",
)
@click.option("--gcp-compute-endpoint", help="Override the Compute Engine API endpoint.")
@click.option("--gcp-billing-endpoint", help="Override the Cloud Billing API endpoint.")
@click.option(
    "--gcp-anonymous",
    is_flag=True,
    help="Call GCP without credentials (local fakes and emulators).",
)
@click.option("--force", is_flag=True, help="Accept a catalog that lost most offers.")
@data_dir_option
def sync_command(
    *,
    providers: tuple[str, ...],
    aws_regions: tuple[str, ...],
    gcp_regions: tuple[str, ...],
    gcp_project: str | None,
    gcp_api_key: str | None,
    aws_endpoints: tuple[str, ...],
    gcp_compute_endpoint: str | None,
    gcp_billing_endpoint: str | None,
    gcp_anonymous: bool,
    force: bool,
    data_dir: Path | None,
) -> None:
    """Fetch offers and prices from AWS and GCP into a new catalog snapshot.

    The new snapshot is checked before it replaces the active one; on any failure the
    previous catalog stays in place.
    """
    # The sync stack (aioboto3, google-cloud-compute) loads only for this command.
    from catalog.sync.aws import AwsSyncConfig
    from catalog.sync.base import SyncError
    from catalog.sync.gcp import BILLING_ENDPOINT, GcpSyncConfig
    from catalog.sync.run import SyncRequest, sync_catalog

    chosen = providers or CLOUDS
    target = data_dir or default_data_dir()
    aws = None
    if "aws" in chosen:
        aws = AwsSyncConfig(
            regions=aws_regions or DEFAULT_AWS_REGIONS, endpoints=_parse_endpoints(aws_endpoints)
        )
    gcp = None
    if "gcp" in chosen:
        if not gcp_project:
            raise click.UsageError(
                "syncing GCP needs a project: --gcp-project or $GOOGLE_CLOUD_PROJECT "
                "(or sync AWS only with --provider aws)"
            )
        credentials = None
        if gcp_anonymous:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        gcp = GcpSyncConfig(
            project=gcp_project,
            regions=gcp_regions or DEFAULT_GCP_REGIONS,
            credentials=credentials,
            compute_endpoint=gcp_compute_endpoint,
            billing_endpoint=gcp_billing_endpoint or BILLING_ENDPOINT,
            billing_api_key=gcp_api_key,
        )
    request = SyncRequest(data_dir=target, aws=aws, gcp=gcp, force=force)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        disable=not console.is_terminal and not os.environ.get("FORCE_PROGRESS"),
    ) as bar:
        try:
            result = asyncio.run(
                sync_catalog(request, progress=_RichProgress(bar), now=datetime.now(UTC))
            )
        except SyncError as exc:
            raise click.ClickException(
                f"sync failed: {exc}\nthe previous catalog is unchanged ({_load(target).location})"
            ) from exc
    for count in result.counts:
        click.echo(f"{count.provider.value} {count.region}: {count.before} -> {count.after} offers")
    click.echo(f"wrote {len(result.snapshot.offers)} offers to {result.path}")
