"""The controller's configuration: which providers to buy from, the fleet ceiling, the
cluster id. YAML, read with ``--config FILE``; validated by pydantic.

With no file, the controller uses this machine alone (the local provider running
engine-sim processes), so ``autoscaler run`` works on a laptop with no cloud account.

AWS credentials and endpoints come from the standard AWS environment and profiles
(``AWS_PROFILE``, ``AWS_ENDPOINT_URL``…), GCP's from application default credentials or
``credentials_file``; the file holds no secret. Cloud instances boot from a startup
script that calls back to the management API at ``callback_url`` for their secrets (the
engine key; the Hugging Face token from ``$HF_TOKEN`` or the file ``hf_token_file``), so
a configuration with ``providers.aws`` or ``providers.gcp`` must name that address.

A bad file fails with the key that is wrong:
``controller config /etc/autoscaler.yaml: providers.aws.regions: …``.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from autoscaler.decide.schedule import format_offset
from autoscaler.decide.step import GROUP_PROVIDERS, UNAVAILABLE_SEC
from autoscaler.reconcile.deps import (
    HEALTH_TIMEOUT_SEC,
    ORPHAN_GRACE_SEC,
    RESYNC_SEC,
    SWEEP_SEC,
    TICK_SEC,
    UNHEALTHY_GRACE_SEC,
    VISIBILITY_GRACE_SEC,
)
from autoscaler.reconcile.shards import DEFAULT_LEASE_TTL_SEC, DEFAULT_RENEW_SEC, LeaseSettings
from autoscaler.reconcile.timeouts import DEFAULT_CALL_TIMEOUT_SEC, DEFAULT_LAUNCH_TIMEOUT_SEC
from autoscaler.spec import DEFAULT_MAX_REPLICAS, parse_duration
from catalog.cuda import MachineImage, parse_driver
from catalog.model import ProviderName
from catalog.storage import LAUNCH_DISK_GIB
from providers.aws_config import DLAMI_PARAMETER, AwsConfig

if TYPE_CHECKING:  # the GCE client library takes seconds to import: only when configured
    from providers.gcp import GcpConfig


MAX_CONFIG_SEC = 366 * 86400.0
"""The longest interval, grace or timeout the controller's settings take: a year. Every
one is finite: an infinite tick would stop the loop, and clock arithmetic past it
overflows."""

Seconds = Annotated[float, Field(gt=0, le=MAX_CONFIG_SEC, allow_inf_nan=False)]
SecondsOrZero = Annotated[float, Field(ge=0, le=MAX_CONFIG_SEC, allow_inf_nan=False)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineAccess(_Strict):
    """How the controller and gateway reach a provider's engines.

    ``engine_address`` (``host`` or ``host:port``) replaces every instance's own address:
    for engines reached through a tunnel or a local proxy, and for tests.
    """

    engine_address: str | None = None
    address: Literal["private", "public"] = "private"


class AwsSettings(EngineAccess):
    regions: Annotated[list[str], Field(min_length=1)] = ["us-east-1"]
    subnets: dict[str, str] = {}
    security_group_id: str | None = None
    gateway_cidr: str = "0.0.0.0/0"
    ami_parameter: str = DLAMI_PARAMETER
    ami_overrides: dict[str, str] = {}
    root_volume_gib: Annotated[int, Field(ge=8)] = LAUNCH_DISK_GIB
    endpoint_url: str | None = None
    max_attempts: Annotated[int, Field(ge=1)] = 4
    retry_wait_seconds: SecondsOrZero = 1.0
    interruption_queue_url: str | None = None
    """An SQS queue of EC2 Spot Instance Interruption Warnings (EventBridge), one per cluster."""
    sqs_endpoint_url: str | None = None

    def provider_config(self) -> AwsConfig:
        return AwsConfig(
            regions=tuple(self.regions),
            subnets=dict(self.subnets),
            security_group_id=self.security_group_id,
            gateway_cidr=self.gateway_cidr,
            ami_parameter=self.ami_parameter,
            ami_overrides=dict(self.ami_overrides),
            root_volume_gib=self.root_volume_gib,
            endpoint_url=self.endpoint_url,
            max_attempts=self.max_attempts,
            retry_wait_seconds=self.retry_wait_seconds,
            interruption_queue_url=self.interruption_queue_url,
            sqs_endpoint_url=self.sqs_endpoint_url,
        )


class GcpImage(_Strict):
    """A GCE boot image family (``project/family``) and the NVIDIA driver it ships."""

    family: Annotated[str, Field(pattern=r"^([a-z][-a-z0-9]*/)?[a-z][-a-z0-9]*$")]
    driver: Annotated[str, Field(pattern=r"^\d+(\.\d+)*$")]


class GcpSettings(EngineAccess):
    project: Annotated[str, Field(min_length=1)]
    zones: Annotated[list[str], Field(min_length=1)]
    network: str = "global/networks/default"
    subnetwork: str | None = None
    endpoint: str | None = None
    credentials_file: Path | None = None
    external_ip: bool = True
    firewall: Literal["manage", "check"] = "manage"
    """``manage``: create the cluster's firewall rule; ``check``: refuse to start without one."""
    source_ranges: Annotated[list[str], Field(min_length=1)] = ["0.0.0.0/0"]
    """Who may reach the engine port: the gateway's address ranges."""
    images: Annotated[list[GcpImage], Field(min_length=1)] | None = None
    """Boot images to choose from by driver (default: the catalog's CUDA/driver table)."""
    boot_disk_gib: Annotated[int, Field(ge=10)] = LAUNCH_DISK_GIB
    """Each VM's boot disk (``pd-balanced``), which a stopped VM is billed for."""

    @field_validator("source_ranges")
    @classmethod
    def _cidrs(cls, ranges: list[str]) -> list[str]:
        for text in ranges:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an address range such as 10.0.0.0/16") from None
        return ranges

    def provider_config(self) -> GcpConfig:
        from providers.gcp import GcpConfig

        credentials: Any = None
        if self.credentials_file is not None:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(self.credentials_file)
            )
        images = None
        if self.images is not None:
            images = tuple(
                MachineImage(ProviderName.GCP, image.family, parse_driver(image.driver))
                for image in self.images
            )
        return GcpConfig(
            project=self.project,
            network=self.network,
            subnetwork=self.subnetwork,
            external_ip=self.external_ip,
            firewall=self.firewall,
            source_ranges=tuple(self.source_ranges),
            images=images,
            boot_disk_gib=self.boot_disk_gib,
            client_options={"api_endpoint": self.endpoint} if self.endpoint else None,
            credentials=credentials,
        )


class LocalSettings(_Strict):
    """This machine as a provider: engine processes.

    With the default ``launcher`` (``engine-sim``), ``engine`` picks per replica:
    ``auto`` runs real vLLM where it is installed and the model is on this machine, and
    engine-sim otherwise; ``sim`` always engine-sim; ``vllm`` real vLLM for vllm and
    vllm-omni workloads or a launch error saying why not (``providers.local_engines``).
    ``vllm_python`` names the interpreter that has vLLM (default: see that module).
    ``host`` and ``docker`` run the workload's own command on the host or in its image.
    """

    launcher: Literal["engine-sim", "host", "docker"] = "engine-sim"
    engine: Literal["auto", "sim", "vllm"] = "auto"
    vllm_python: str | None = None
    gpu: str = "NVIDIA H100 80GB HBM3"
    gpu_count: Annotated[int, Field(ge=1)] = 1
    time_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    state_dir: Path | None = None


class SimulatedSettings(_Strict):
    """The simulated cloud as a provider (``providers.simulated_engines``): the catalog's
    offers of ``clouds`` (in ``regions``, when given) at their catalog prices, each
    machine an engine-sim process on this machine that answers after a boot time drawn
    from the simulator's distribution (lognormal, median ``boot_median_sec``) times
    ``boot_time_scale``. ``time_scale`` speeds engine-sim's latencies up as for the
    local provider. Nothing is bought."""

    clouds: Annotated[list[Literal["aws", "gcp"]], Field(min_length=1)] = ["aws", "gcp"]
    regions: Annotated[list[str], Field(min_length=1)] | None = None
    boot_median_sec: Seconds = 180.0
    boot_sigma: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.35
    boot_time_scale: Seconds = 0.1
    seed: int = 0
    time_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    state_dir: Path | None = None


class ProvidersSettings(_Strict):
    aws: AwsSettings | None = None
    gcp: GcpSettings | None = None
    local: LocalSettings | None = None
    simulated: SimulatedSettings | None = None


class CatalogSyncSettings(_Strict):
    """The scheduled catalog sync (``autoscaler.catalog_sync``): every ``interval_sec``
    (``null``: never), each run moved by up to ``jitter_sec`` either way. It runs only
    where ``providers.aws`` or ``providers.gcp`` is configured (there is nothing to fetch
    otherwise), on the leading controller (with sharding: the holder of shard 0)."""

    interval_sec: Annotated[float, Field(ge=60, le=MAX_CONFIG_SEC, allow_inf_nan=False)] | None = (
        86400.0
    )
    jitter_sec: SecondsOrZero = 900.0


class ShardingSettings(_Strict):
    """Several controllers sharing a PostgreSQL store split the workloads between them
    (``autoscaler.reconcile.shards``) instead of one leading and the others standing
    by. A controller's leases last ``lease_ttl_sec`` without renewal and are renewed
    every ``renew_sec``; a dead controller's workloads move within their sum (13 s by
    default) plus a round and a pass. Off by default: one controller reconciles."""

    enabled: bool = False
    lease_ttl_sec: Annotated[float, Field(gt=0, le=300)] = DEFAULT_LEASE_TTL_SEC
    renew_sec: Seconds = DEFAULT_RENEW_SEC

    @model_validator(mode="after")
    def _renewed_in_time(self) -> ShardingSettings:
        if self.renew_sec * 2 > self.lease_ttl_sec:
            raise ValueError(
                f"renew_sec {self.renew_sec:g} must be at most half of lease_ttl_sec "
                f"{self.lease_ttl_sec:g}, so that one failed renewal loses no lease"
            )
        return self

    def leases(self) -> LeaseSettings | None:
        """The lease timing when sharding is on, else ``None``."""
        if not self.enabled:
            return None
        return LeaseSettings(ttl_sec=self.lease_ttl_sec, renew_sec=self.renew_sec)


MAX_SCHEDULE_OFFSET_SEC = 366 * 86400.0
"""The furthest a schedule clock may be shifted either way: a year."""


def parse_offset(text: str) -> float:
    """A signed offset in seconds: ``+9h``, ``-30m``, ``1h30m``, ``-3600``, ``0``."""
    raw = text.strip()
    sign = -1.0 if raw.startswith("-") else 1.0
    body = raw[1:] if raw.startswith(("-", "+")) else raw
    if body == "0":
        return 0.0
    try:
        return sign * parse_duration(int(body) if body.isdigit() else body)
    except ValueError:
        raise ValueError(
            f"offset {text!r} is not like '+9h', '-30m', '1h30m' or a number of seconds"
        ) from None


GROUP_CAPABLE = ("aws", "gcp", "simulated")
"""Providers that can place a replica group's members close together (the local provider
and private workers cannot)."""

DEFAULT_FLEET_MAX_HOURLY_COST_USD = 100.0
"""The fleet ceiling when the configuration names none: every workload, fixed and
scheduled ones included, buys within it."""


class ControllerConfig(_Strict):
    """Everything the controller needs besides the store and the workloads.

    ``fleet_max_hourly_cost_usd`` bounds the hourly total of every workload's instances;
    there is always one (:data:`DEFAULT_FLEET_MAX_HOURLY_COST_USD` when not given), so a
    fixed or scheduled workload, which has no ceiling of its own, still buys within a
    stated bound. ``max_replicas_per_workload`` bounds ``replicas`` and ``max_workers`` at
    apply, and the controller plans no more than that for a spec stored by another route.
    """

    cluster_id: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$")]
    fleet_max_hourly_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] = (
        DEFAULT_FLEET_MAX_HOURLY_COST_USD
    )
    max_replicas_per_workload: Annotated[int, Field(ge=1, le=100_000)] = DEFAULT_MAX_REPLICAS
    group_providers: list[str] = sorted(GROUP_PROVIDERS)
    """The providers on which a model no single machine of the pool holds may run as a
    replica group (a leader and workers): by default those that place a group's members
    close together (``decide.step.GROUP_PROVIDERS``). ``[]``: no groups anywhere."""
    providers: ProvidersSettings = ProvidersSettings(local=LocalSettings())
    tick_sec: Seconds = TICK_SEC
    resync_sec: Seconds = RESYNC_SEC
    """Every workload is stepped in full at least this often, whether or not anything it
    reads changed (``autoscaler.reconcile.changes``); the fleet is read whole as often."""
    sweep_sec: Seconds = SWEEP_SEC
    """The orphan sweep and the fleet-spend metric's SUM run at most this often."""
    orphan_grace_sec: SecondsOrZero = ORPHAN_GRACE_SEC
    unavailable_sec: Seconds = UNAVAILABLE_SEC
    unhealthy_grace_sec: SecondsOrZero = UNHEALTHY_GRACE_SEC
    visibility_grace_sec: SecondsOrZero = VISIBILITY_GRACE_SEC
    """How long an instance missing at the provider counts as not visible yet (eventual
    consistency) before it is settled by tag lookup and a terminate by id."""
    health_timeout_sec: Seconds = HEALTH_TIMEOUT_SEC
    provider_call_timeout_sec: Seconds = DEFAULT_CALL_TIMEOUT_SEC
    """The longest a provider's list, describe, terminate or lookup may take."""
    provider_launch_timeout_sec: Seconds = DEFAULT_LAUNCH_TIMEOUT_SEC
    """The longest a provider's launch may take (GCP waits on a zone operation)."""
    engine_metrics_sec: SecondsOrZero = 10.0
    """How often each ready replica's ``/metrics`` is read (0: never; the gateway's
    measurement alone drives scaling then)."""
    catalog_max_age_sec: Seconds = 7 * 86400.0
    """A catalog older than this is stale (the CatalogStale alert)."""
    catalog_sync: CatalogSyncSettings = CatalogSyncSettings()
    sharding: ShardingSettings = ShardingSettings()
    """Several controllers on one PostgreSQL store share the workloads (off: one leads)."""
    callback_url: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")] | None = None
    """The management API's address as cloud instances reach it (``https://host:8001``)."""
    hf_token_file: Path | None = None
    """A file holding the Hugging Face token handed to booting instances (else ``$HF_TOKEN``)."""
    schedule_offset_sec: Annotated[
        float, Field(ge=-MAX_SCHEDULE_OFFSET_SEC, le=MAX_SCHEDULE_OFFSET_SEC, allow_inf_nan=False)
    ] = 0.0
    """Read every schedule (``execution_policy: scheduled``) this many seconds ahead of
    the wall clock (behind, when negative): a rehearsal of a schedule, which buys and
    stops replicas as the shifted schedule says. 0 (the default) in production; the
    service prints it at start when it is not. ``autoscaler run --schedule-offset``."""

    gateway_workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = 1
    """Processes the gateway of ``autoscaler run`` serves its port with (``SO_REUSEPORT``;
    ``gateway.workers``): 1, the default, keeps it in the service's own process, which
    suits a laptop and a machine whose cores the engines need; ``"auto"``: one per core.
    ``autoscaler run --gateway-workers`` overrides it."""

    @field_validator("group_providers")
    @classmethod
    def _group_capable(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in GROUP_CAPABLE:
                raise ValueError(
                    f"{name!r} cannot place replica groups; allowed: {', '.join(GROUP_CAPABLE)}"
                )
        return names

    def limits_summary(self) -> str:
        """The limits every workload runs under, as the service prints them at start."""
        source = (
            "from the config"
            if "fleet_max_hourly_cost_usd" in self.model_fields_set
            else "the default; set fleet_max_hourly_cost_usd in --config"
        )
        return (
            f"fleet ceiling ${self.fleet_max_hourly_cost_usd:,.2f}/h ({source}); "
            f"at most {self.max_replicas_per_workload} replicas per workload"
        )

    def schedule_clock_summary(self, *, now: datetime) -> str | None:
        """The line the service prints at start when schedules are read on a shifted
        clock (``None`` when they are not)."""
        if not self.schedule_offset_sec:
            return None
        offset = timedelta(seconds=self.schedule_offset_sec)
        shifted = (now + offset).astimezone(UTC).strftime("%a %Y-%m-%d %H:%M:%S UTC")
        return (
            f"SCHEDULE CLOCK SHIFTED {format_offset(offset)} (schedule_offset_sec): scheduled "
            f"workloads run as if it were {shifted}; a rehearsal setting, not for production"
        )

    def with_schedule_offset(self, offset_sec: float) -> ControllerConfig:
        """This configuration with ``schedule_offset_sec`` set (``--schedule-offset``),
        validated as the file's value is."""
        try:
            return ControllerConfig.model_validate(
                {**self.model_dump(exclude_unset=True), "schedule_offset_sec": offset_sec}
            )
        except ValidationError as exc:
            raise ConfigError(
                f"--schedule-offset: {offset_sec:g}s: {exc.errors()[0]['msg']}"
            ) from None

    def with_local_engine(self, engine: Literal["auto", "sim", "vllm"]) -> ControllerConfig:
        """This configuration with the local provider's engine set (``run --engine``);
        unchanged when the local provider is off."""
        local = self.providers.local
        if local is None:
            return self
        providers = self.providers.model_copy(
            update={"local": local.model_copy(update={"engine": engine})}
        )
        return self.model_copy(update={"providers": providers})

    def missing_callback(self) -> str | None:
        """Why this configuration cannot boot cloud instances, or ``None``."""
        clouds = [name for name in ("aws", "gcp") if getattr(self.providers, name) is not None]
        if not clouds or self.callback_url is not None:
            return None
        named = " and ".join(f"providers.{name}" for name in clouds)
        return (
            f"callback_url: required with {named}: the management API address cloud "
            "instances can reach (e.g. https://autoscaler.internal:8001), where their startup "
            "script fetches the engine key and reports ready or failed"
        )


DEFAULT_CLUSTER_ID = "local"


def default_config() -> ControllerConfig:
    """No file: this machine only, under the cluster id ``local``."""
    return ControllerConfig(cluster_id=DEFAULT_CLUSTER_ID)


def parse_config(data: object, *, source: str) -> ControllerConfig:
    """Validate a parsed YAML document; errors name ``source`` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"controller config {source}: expected a mapping at the top level")
    data = {"cluster_id": DEFAULT_CLUSTER_ID, **data}
    try:
        config = ControllerConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"controller config {source}: {problems}") from None
    missing = config.missing_callback()
    if missing is not None:
        raise ConfigError(f"controller config {source}: {missing}")
    return config


def load_config(path: Path | None) -> ControllerConfig:
    """The configuration in ``path`` (YAML), or the default when ``path`` is ``None``."""
    if path is None:
        return default_config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"controller config {path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"controller config {path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path))
