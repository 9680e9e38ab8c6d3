"""Google Compute Engine through google-cloud-compute.

The client library is synchronous: every call runs in a worker thread
(``asyncio.to_thread``), and zone operations are polled here with
``ZoneOperationsClient.get`` because the library's own waiter ignores a custom endpoint.

Identity and idempotency: an instance's name is derived from its cluster and launch id
(``as-<cluster hash>-<base32 launch id>``), and ``insert`` carries a ``requestId`` that is
a UUID derived from the launch id, so a repeated launch returns the first operation and
a late repeat finds the name taken and adopts the existing instance. The provider's
``instance_id`` is ``"<zone>/<name>"``, enough to describe or delete it with no memory.

GCE labels allow only ``[a-z0-9_-]``, so tags are mapped to labels for filtering
(``autoscaler:cluster`` → ``autoscaler-cluster``) and kept verbatim as JSON in the
``autoscaler-tags`` metadata item, which is what :class:`Instance.tags` is read from.

A GCE ``TERMINATED`` status means stopped, not deleted: such an instance still exists
(its disk still costs money), so it reads as ``STOPPED``, as does ``SUSPENDED``; only a
deleted instance is gone. GCE's ``STOPPING`` is shown both on the way to stopped and on
the way to deletion, so it reads as ``STOPPING`` either way; a deleted instance then
disappears. Spot VMs are deleted on preemption; the preemption is reported from the
``compute.instances.preempted`` operations GCE records.

Stop and start (a warm pool of stopped machines): ``instances.stop`` keeps the VM and
its ``pd-balanced`` boot disk (billed by the GB-month while stopped, see
:mod:`catalog.storage`); ``instances.start`` (``instances.resume`` for a VM someone
suspended) boots it again in its zone, with the same name, labels and disk, and waits
for the operation, so a stock-out in the zone arrives as :class:`InsufficientCapacity`.
Unlike EC2, GCE stops and starts spot VMs too ("Create and use Spot VMs",
https://cloud.google.com/compute/docs/instances/create-use-spot); a stopped spot VM cannot
be preempted, and a started one is a spot VM again.

The boot disk's image is chosen from the same CUDA/driver table the catalog admits
offers by (``catalog.cuda``): the Deep Learning VM family with the newest driver that runs
the pinned CUDA version on the offer's GPU, so an offer the catalog admitted for a pin
always boots a driver that runs it. ``GcpConfig.images`` replaces the table's GCP rows
(each a family and the driver it ships); a pin no configured image runs is refused
before anything is bought.

The engine port is reachable only through a firewall rule; see :mod:`providers.gcp_firewall`.

A member of a replica group (a request tagged ``autoscaler:group``) is launched under a
compact placement policy (a resource policy with ``groupPlacementPolicy.collocation``
``COLLOCATED``), so the group's machines sit close on the network for the tensor and
pipeline traffic between them: one policy per cluster, zone and machine type
(:func:`compact_policy_name`), in the zone's region, created on first use
(``alreadyExists`` from a concurrent creator is success) and reused by every group of
that shape, so nothing is left to delete when a group ends. A3 and A4 machines, the
multi-node GPU shapes, take such a policy; GCE refuses it for a shape that does not,
and the launch fails with its word like any refused request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypeVar

from google.api_core import exceptions as google_exceptions
from google.cloud import compute_v1
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from catalog.cuda import MachineImage, driver_runs, driver_supports_gpu, machine_images
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import Offer, ProviderName
from catalog.storage import LAUNCH_DISK_GIB
from providers.base import (
    CLUSTER_TAG,
    GROUP_TAG,
    LAUNCH_ID_TAG,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    ProviderError,
    QuotaExceeded,
    SpotInterruption,
    Terminal,
    Transient,
    pick_for_launch,
)
from providers.engines import ENGINES
from providers.errors import Throttled, retried_in_the_call
from providers.gcp_firewall import (
    RuleSpec,
    allowed_ports,
    cluster_network_tag,
    firewall_rule_name,
    is_ours,
    missing_ports,
    needs_update,
)

T = TypeVar("T")

IMAGE_PROJECT = "deeplearning-platform-release"
ENGINE_PORTS: tuple[int, ...] = tuple(sorted({engine.port for engine in ENGINES.values()}))
"""Every port an engine listens on: what the firewall rule must admit in check mode."""
TAGS_METADATA_KEY = "autoscaler-tags"
PREEMPTED = "compute.instances.preempted"
# The request id namespace: fixed forever, or repeated launches stop being idempotent.
_REQUEST_NAMESPACE = uuid.UUID("6f1c3a52-0d7e-4b8e-9a51-4c2f7d0e9b13")

_CAPACITY_CODES = frozenset(
    {
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "RESOURCE_POOL_EXHAUSTED",
    }
)
_QUOTA_CODES = frozenset({"QUOTA_EXCEEDED", "QUOTA_LIMIT_EXCEEDED"})
_RATE_CODES = frozenset({"RESOURCE_OPERATION_RATE_EXCEEDED", "RATE_LIMIT_EXCEEDED"})
_TRANSIENT_CODES = frozenset({"RESOURCE_NOT_READY"})
_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_STATES = {
    "PENDING": InstanceState.PENDING,  # a flex-start VM waiting for capacity
    "PROVISIONING": InstanceState.PENDING,
    "STAGING": InstanceState.PENDING,
    "RUNNING": InstanceState.RUNNING,
    # The host failed and GCE is bringing the VM back: not serving, coming back running.
    "REPAIRING": InstanceState.PENDING,
    "PENDING_STOP": InstanceState.STOPPING,
    "STOPPING": InstanceState.STOPPING,  # a stop, or a deletion, under way
    "DEPROVISIONING": InstanceState.STOPPING,
    "SUSPENDING": InstanceState.STOPPING,
    "STOPPED": InstanceState.STOPPED,
    "SUSPENDED": InstanceState.STOPPED,
    "TERMINATED": InstanceState.STOPPED,  # GCE's word for stopped, not deleted
}
_GPU_ACCELERATORS = {
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
}


@dataclass(frozen=True, slots=True)
class GcpConfig:
    """Where and how to launch on GCE.

    ``images``: the machine images to boot from, each ``"project/family"`` with the
    driver it ships (``None``: the GCP rows of ``catalog/data/cuda.json``, the table the
    catalog admits offers by). ``firewall``: ``manage`` creates the cluster's rule,
    ``check`` only verifies at start that one admits ``source_ranges`` to the engine
    ports (:mod:`providers.gcp_firewall`). ``boot_disk_type``: named explicitly, since
    the API's default (``pd-standard``) is refused by the G2 and A3 machines; it is
    also what a stopped VM bills (:mod:`catalog.storage`). ``client_options`` and
    ``credentials`` go to the client library unchanged (tests point ``api_endpoint`` at a
    local server).
    """

    project: str
    network: str = "global/networks/default"
    subnetwork: str | None = None
    images: tuple[MachineImage, ...] | None = None
    boot_disk_gib: int = LAUNCH_DISK_GIB
    boot_disk_type: str = "pd-balanced"
    network_tags: tuple[str, ...] = ("autoscaler-engine",)
    firewall: Literal["manage", "check"] = "manage"
    source_ranges: tuple[str, ...] = ("0.0.0.0/0",)
    external_ip: bool = True
    client_options: Mapping[str, Any] | None = None
    credentials: Any = None
    operation_poll_seconds: float = 2.0
    operation_timeout_seconds: float = 900.0
    max_attempts: int = 4
    retry_wait_seconds: float = 1.0
    throttle_retry_after: float = 5.0

    def __post_init__(self) -> None:
        if not self.project:
            raise ValueError("GcpConfig.project must name the GCP project")
        if self.images is not None and not self.images:
            raise ValueError("GcpConfig.images must list at least one image (or be None)")
        if not self.source_ranges:
            raise ValueError("GcpConfig.source_ranges must name at least one address range")

    @property
    def machine_images(self) -> tuple[MachineImage, ...]:
        return self.images if self.images is not None else machine_images(ProviderName.GCP)


# Names, labels and request ids.


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def instance_name(cluster_id: str, launch_id: str) -> str:
    """The GCE name for a launch: deterministic, and the launch id can be read back."""
    encoded = base64.b32encode(launch_id.encode()).decode().lower().rstrip("=")
    prefix = f"as-{_digest(cluster_id)[:6]}-"
    if len(prefix) + len(encoded) <= 63:
        return prefix + encoded
    return f"{prefix}x{_digest(launch_id)[:40]}"


def launch_id_of(name: str) -> str | None:
    """The launch id encoded in an instance name, if it was short enough to encode."""
    parts = name.split("-", 2)
    if len(parts) != 3 or parts[0] != "as" or parts[2].startswith("x"):
        return None
    encoded = parts[2].upper()
    try:
        return base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def request_id(launch_id: str, operation: str = "insert") -> str:
    """GCE wants a UUID as requestId: one derived from the launch id, stably."""
    return str(uuid.uuid5(_REQUEST_NAMESPACE, f"{operation}:{launch_id}"))


def compact_policy_name(cluster_id: str, zone: str, machine_type: str) -> str:
    """The compact placement policy a replica group of ``machine_type`` in ``zone`` is
    launched under (a GCE name: at most 63 of ``[a-z0-9-]``)."""
    shape = re.sub(r"[^a-z0-9-]+", "-", f"{zone}-{machine_type}".lower()).strip("-")
    return f"as-{_digest(cluster_id)[:6]}-compact-{shape}"[:63].rstrip("-")


def region_of(zone: str) -> str:
    """``us-central1`` for ``us-central1-a``."""
    return zone.rsplit("-", 1)[0]


def label_key(tag_key: str) -> str:
    key = re.sub(r"[^a-z0-9_-]", "-", tag_key.lower())[:63]
    return key if key[:1].isalpha() else f"t{key}"[:63]


def label_value(tag_value: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", tag_value.lower())[:63]


def _labels(tags: Mapping[str, str]) -> dict[str, str]:
    return {label_key(k): label_value(v) for k, v in tags.items()}


def _label_filter(tags: Mapping[str, str]) -> str:
    return " AND ".join(
        f'(labels.{label_key(k)} = "{label_value(v)}")' for k, v in sorted(tags.items())
    )


# Errors.


def translate(error: Exception, action: str, *, retry_after: float = 5.0) -> ProviderError:
    """The provider error for a google-api-core error; raise it ``from error``."""
    if not isinstance(error, google_exceptions.GoogleAPICallError):
        return Transient(action, f"{type(error).__name__}: {error}", retry_after=retry_after)
    status = int(error.code or 0)
    detail = f"HTTP {status}: {error.message}"
    reasons = {str(e.get("reason", "")) for e in error.errors or [] if isinstance(e, dict)}
    if status == 404:
        return NotFound(action, detail)
    if status == 429 or reasons & _RATE_REASONS:
        return Throttled(action, detail, retry_after=retry_after)
    if status >= 500:
        return Transient(action, detail, retry_after=retry_after)
    if "quotaExceeded" in reasons or "QUOTA_EXCEEDED" in detail:
        return QuotaExceeded(action, detail)
    if "ZONE_RESOURCE_POOL_EXHAUSTED" in detail:
        return InsufficientCapacity(action, detail)
    return Terminal(action, detail)


def _operation_error(operation: compute_v1.Operation, action: str, retry_after: float) -> None:
    errors = list(operation.error.errors) if operation.error else []
    if not errors:
        return
    codes = {e.code for e in errors}
    detail = "; ".join(f"{e.code}: {e.message}" for e in errors)
    if codes & _CAPACITY_CODES:
        raise InsufficientCapacity(action, detail)
    if codes & _QUOTA_CODES:
        raise QuotaExceeded(action, detail)
    if codes & _RATE_CODES:
        raise Throttled(action, detail, retry_after=retry_after)
    if codes & _TRANSIENT_CODES:
        raise Transient(action, detail, retry_after=retry_after)
    raise Terminal(action, detail)


def choose_image(
    offer: Offer, *, cuda: str | None, images: tuple[MachineImage, ...]
) -> MachineImage:
    """The image to boot ``offer`` from: of the images whose driver runs CUDA ``cuda`` on
    the offer's GPU (any image whose driver knows the GPU, when nothing is pinned), the
    one with the newest driver. Raises ``LookupError`` saying why none fits."""
    try:
        gpu = resolve_gpu(offer.gpu)
    except UnknownGpuError as error:
        raise LookupError(str(error)) from None
    if cuda:
        fitting = [i for i in images if driver_runs(i.driver, version=cuda, gpu=gpu)]
    else:
        fitting = [i for i in images if driver_supports_gpu(i.driver, gpu)]
    if not fitting:
        wanted = f"runs CUDA {cuda}" if cuda else "supports it"
        offered = ", ".join(f"{i.name} (driver {i.driver_text})" for i in images)
        raise LookupError(f"no image's driver {wanted} on {gpu.display_name}; images: {offered}")
    return max(fitting, key=lambda image: image.driver)


def image_source(image: MachineImage) -> str:
    """``projects/P/global/images/family/F`` for an image named ``P/F`` (or ``F``)."""
    project, _, family = image.name.rpartition("/")
    return f"projects/{project or IMAGE_PROJECT}/global/images/family/{family}"


class GcpProvider:
    """A :class:`providers.base.Provider` (and spot interruption source) for GCE."""

    name = "gcp"

    def __init__(self, config: GcpConfig) -> None:
        self.config = config
        options = dict(config.client_options) if config.client_options else None
        kwargs: dict[str, Any] = {"transport": "rest", "client_options": options}
        if config.credentials is not None:
            kwargs["credentials"] = config.credentials
        self._instances = compute_v1.InstancesClient(**kwargs)
        self._zone_operations = compute_v1.ZoneOperationsClient(**kwargs)
        self._global_operations = compute_v1.GlobalOperationsClient(**kwargs)
        self._firewalls = compute_v1.FirewallsClient(**kwargs)
        self._policies = compute_v1.ResourcePoliciesClient(**kwargs)
        self._region_operations = compute_v1.RegionOperationsClient(**kwargs)
        self._admitted: set[tuple[str, int]] = set()
        self._compact: set[tuple[str, str]] = set()

    def close(self) -> None:
        """Close the HTTP sessions of the underlying clients."""
        for client in (
            self._instances,
            self._zone_operations,
            self._global_operations,
            self._firewalls,
            self._policies,
            self._region_operations,
        ):
            client.transport.close()  # type: ignore[no-untyped-call]

    # The protocol.

    async def launch(self, request: LaunchRequest) -> Instance:
        action = request.action
        zone = request.offer.zone
        name = instance_name(request.cluster_id, request.launch_id)
        resource = self._resource(request, name=name)
        if self.config.firewall == "manage":
            await self.admit_engine_port(request.cluster_id, port=request.boot.port)
        if GROUP_TAG in request.tags:
            resource.resource_policies = [await self._compact_policy(request)]
        try:
            operation = await self._insert(
                resource, zone=zone, rid=request_id(request.launch_id), action=action
            )
            if operation.status == compute_v1.Operation.Status.DONE and operation.error.errors:
                # GCE replays an earlier failed insert for the same request id; a retry
                # after a stock-out must ask afresh. The name still prevents duplicates.
                operation = await self._insert(
                    resource, zone=zone, rid=str(uuid.uuid4()), action=action
                )
        except Terminal as error:
            if not isinstance(error.__cause__, google_exceptions.Conflict):
                raise
            # The name is taken: this launch id's instance exists already.
            return await self.describe(f"{zone}/{name}")
        await self._wait(operation, zone=zone, action=action)
        return await self.describe(f"{zone}/{name}")

    async def _compact_policy(self, request: LaunchRequest) -> str:
        """The compact placement policy for this group member's shape and zone, created
        on first use; its URL for the instance's ``resourcePolicies``."""
        offer = request.offer
        region = region_of(offer.zone)
        name = compact_policy_name(request.cluster_id, offer.zone, offer.instance_type)
        url = f"projects/{self.config.project}/regions/{region}/resourcePolicies/{name}"
        if (region, name) in self._compact:
            return url
        action = f"{request.action}: preparing compact placement policy {name}"
        policy = compute_v1.ResourcePolicy(
            name=name,
            description=f"autoscaler replica groups of cluster {request.cluster_id}",
            group_placement_policy=compute_v1.ResourcePolicyGroupPlacementPolicy(
                collocation="COLLOCATED"
            ),
        )
        try:
            operation = await self._retrying(
                action,
                partial(
                    self._policies.insert_unary,
                    request=compute_v1.InsertResourcePolicyRequest(
                        project=self.config.project,
                        region=region,
                        resource_policy_resource=policy,
                        request_id=str(uuid.uuid5(_REQUEST_NAMESPACE, f"policy:{region}/{name}")),
                    ),
                    retry=None,
                ),
            )
            await self._wait(operation, zone=None, region=region, action=action)
        except Terminal as error:
            if not isinstance(error.__cause__, google_exceptions.Conflict):
                raise
            # alreadyExists: made by an earlier launch, this controller's or another's
        self._compact.add((region, name))
        return url

    async def _insert(
        self, resource: compute_v1.Instance, *, zone: str, rid: str, action: str
    ) -> compute_v1.Operation:
        return await self._retrying(
            action,
            partial(
                self._instances.insert_unary,
                request=compute_v1.InsertInstanceRequest(
                    project=self.config.project,
                    zone=zone,
                    instance_resource=resource,
                    request_id=rid,
                ),
                retry=None,
            ),
        )

    async def terminate(self, instance_id: str) -> None:
        zone, name = self._split(instance_id)
        action = f"terminating {instance_id}"
        try:
            await self._retrying(
                action,
                lambda: self._instances.delete_unary(
                    project=self.config.project, zone=zone, instance=name, retry=None
                ),
            )
        except NotFound:
            return

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        return await self._search(
            {CLUSTER_TAG: cluster_id}, action=f"listing instances of cluster {cluster_id}"
        )

    async def stop(self, instance_id: str) -> None:
        zone, name = self._split(instance_id)
        action = f"stopping {instance_id}"
        instance = self._instance(await self._get(zone, name, action=action))
        if instance.state.is_stopped:
            return
        if instance.state is InstanceState.PENDING:
            raise Transient(
                action, "the VM is still starting", retry_after=self.config.throttle_retry_after
            )
        await self._retrying(
            action,
            lambda: self._instances.stop_unary(
                project=self.config.project, zone=zone, instance=name, retry=None
            ),
        )

    async def start(self, instance_id: str) -> Instance:
        zone, name = self._split(instance_id)
        action = f"starting {instance_id}"
        raw = await self._get(zone, name, action=action)
        instance = self._instance(raw)
        if instance.state in (InstanceState.PENDING, InstanceState.RUNNING):
            return instance
        if instance.state is InstanceState.STOPPING:
            raise Transient(
                action, "the VM is still stopping", retry_after=self.config.throttle_retry_after
            )
        call = (
            self._instances.resume_unary
            if raw.status == "SUSPENDED"
            else (self._instances.start_unary)
        )
        operation = await self._retrying(
            action,
            partial(call, project=self.config.project, zone=zone, instance=name, retry=None),
        )
        await self._wait(operation, zone=zone, action=action)
        return self._instance(await self._get(zone, name, action=action))

    async def describe(self, instance_id: str) -> Instance:
        zone, name = self._split(instance_id)
        return self._instance(await self._get(zone, name, action=f"describing {instance_id}"))

    async def _get(self, zone: str, name: str, *, action: str) -> compute_v1.Instance:
        return await self._retrying(
            action,
            lambda: self._instances.get(
                project=self.config.project, zone=zone, instance=name, retry=None
            ),
        )

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        found = await self._search(
            {CLUSTER_TAG: cluster_id, LAUNCH_ID_TAG: launch_id},
            action=f"finding launch {launch_id} of {cluster_id}",
        )
        return pick_for_launch(found)

    async def interruptions(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        action = f"listing spot preemptions of cluster {cluster_id}"
        pages = await self._retrying(
            action,
            lambda: builtins.list(
                self._global_operations.aggregated_list(
                    request=compute_v1.AggregatedListGlobalOperationsRequest(
                        project=self.config.project, filter=f'operationType = "{PREEMPTED}"'
                    ),
                    retry=None,
                )
            ),
        )
        prefix = f"as-{_digest(cluster_id)[:6]}-"
        reported = []
        for _scope, scoped in pages:
            for operation in scoped.operations:
                zone = operation.zone.rsplit("/", 1)[-1]
                name = operation.target_link.rsplit("/", 1)[-1]
                if not name.startswith(prefix):
                    continue
                reported.append(
                    SpotInterruption(
                        instance_id=f"{zone}/{name}",
                        launch_id=launch_id_of(name) or "",
                        zone=zone,
                        instance_type="",
                        noticed_at=_timestamp(operation.insert_time),
                        reason=operation.status_message or "spot VM preempted",
                    )
                )
        return reported

    # Building the instance.

    def _resource(self, request: LaunchRequest, *, name: str) -> compute_v1.Instance:
        offer = request.offer
        zone = offer.zone
        pin = request.boot.cuda_version
        try:
            image = choose_image(offer, cuda=pin, images=self.config.machine_images)
        except LookupError as error:
            raise Terminal(request.action, f"choosing the boot image: {error}") from None
        metadata = [
            compute_v1.Items(key=TAGS_METADATA_KEY, value=json.dumps(dict(request.tags))),
        ]
        if request.boot.startup_script:
            metadata.append(
                compute_v1.Items(key="startup-script", value=request.boot.startup_script)
            )
        interface = compute_v1.NetworkInterface(network=self.config.network)
        if self.config.subnetwork:
            interface.subnetwork = self.config.subnetwork
        if self.config.external_ip:
            interface.access_configs = [
                compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
            ]
        scheduling = compute_v1.Scheduling(on_host_maintenance="TERMINATE")
        if request.spot:
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "DELETE"
            scheduling.automatic_restart = False
        else:
            scheduling.provisioning_model = "STANDARD"
            scheduling.automatic_restart = True
        resource = compute_v1.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{offer.instance_type}",
            labels=_labels(request.tags),
            metadata=compute_v1.Metadata(items=metadata),
            tags=compute_v1.Tags(items=self._network_tags(request.cluster_id)),
            scheduling=scheduling,
            network_interfaces=[interface],
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=image_source(image),
                        disk_size_gb=self.config.boot_disk_gib,
                        disk_type=f"zones/{zone}/diskTypes/{self.config.boot_disk_type}",
                        labels=_labels(request.tags),
                    ),
                )
            ],
        )
        accelerator = self._accelerator(request)
        if accelerator is not None:
            resource.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_type=f"zones/{zone}/acceleratorTypes/{accelerator}",
                    accelerator_count=offer.gpu_count,
                )
            ]
        return resource

    def _accelerator(self, request: LaunchRequest) -> str | None:
        """N1 machines take GPUs as guest accelerators; A2, A3 and G2 have theirs built in."""
        offer = request.offer
        if not offer.instance_type.startswith("n1-"):
            return None
        labelled = dict(offer.labels).get("gcp_accelerator_type")
        if labelled:
            return labelled
        for marker, accelerator in _GPU_ACCELERATORS.items():
            if marker in offer.gpu.upper().split():
                return accelerator
        raise Terminal(request.action, f"no GCE accelerator type known for {offer.gpu!r}")

    def _network_tags(self, cluster_id: str) -> builtins.list[str]:
        return [*self.config.network_tags, cluster_network_tag(cluster_id)]

    # The firewall rule (providers.gcp_firewall).

    def _rule_spec(self, cluster_id: str, ports: tuple[int, ...]) -> RuleSpec:
        return RuleSpec(
            cluster_id=cluster_id,
            network=self.config.network,
            source_ranges=self.config.source_ranges,
            ports=ports,
        )

    async def admit_engine_port(self, cluster_id: str, *, port: int) -> None:
        """Make the cluster's firewall rule admit ``port`` (created on first use, widened
        when a new port is needed, otherwise reused as it is)."""
        if (cluster_id, port) in self._admitted:
            return
        name = firewall_rule_name(cluster_id)
        action = f"admitting the gateway to tcp:{port} with firewall rule {name}"
        rule = await self._firewall(name, action=action)
        if rule is None:
            body = self._rule_spec(cluster_id, (port,)).body()
            try:
                await self._firewall_change(
                    action,
                    partial(
                        self._firewalls.insert_unary,
                        request=compute_v1.InsertFirewallRequest(
                            project=self.config.project,
                            firewall_resource=compute_v1.Firewall.from_json(json.dumps(body)),
                            request_id=request_id(f"{name}:{port}", "firewall"),
                        ),
                        retry=None,
                    ),
                )
            except Terminal as error:
                if not isinstance(error.__cause__, google_exceptions.Conflict):
                    raise
                rule = await self._firewall(name, action=action)  # made by another controller
        if rule is not None:
            await self._widen(rule, cluster_id=cluster_id, port=port, action=action)
        self._admitted.add((cluster_id, port))

    async def _widen(
        self, rule: dict[str, Any], *, cluster_id: str, port: int, action: str
    ) -> None:
        name = str(rule.get("name", ""))
        if not is_ours(rule, cluster_id):
            raise Terminal(
                action,
                f"a firewall rule {name} exists that this cluster did not make; "
                "rename or delete it, or set firewall: check",
            )
        ports = tuple(sorted(_rule_ports(rule) | {port}))
        spec = self._rule_spec(cluster_id, ports)
        if not needs_update(rule, spec):
            return
        await self._firewall_change(
            action,
            partial(
                self._firewalls.patch_unary,
                project=self.config.project,
                firewall=name,
                firewall_resource=compute_v1.Firewall.from_json(json.dumps(spec.body())),
                retry=None,
            ),
        )

    async def preflight(self, cluster_id: str) -> None:
        """In ``check`` mode, refuse (``Terminal``, with the ``gcloud`` command to run) when
        no firewall rule admits the source ranges to every engine port of the cluster."""
        if self.config.firewall != "check":
            return
        action = f"checking the firewall rules of project {self.config.project}"
        listed = await self._retrying(
            action,
            lambda: builtins.list(self._firewalls.list(project=self.config.project, retry=None)),
        )
        rules = [json.loads(compute_v1.Firewall.to_json(rule)) for rule in listed]
        spec = self._rule_spec(cluster_id, ENGINE_PORTS)
        missing = missing_ports(rules, spec, instance_tags=self._network_tags(cluster_id))
        if missing:
            needed = self._rule_spec(cluster_id, missing)
            raise Terminal(
                action,
                f"no rule admits {', '.join(spec.source_ranges)} to tcp:"
                f"{','.join(str(p) for p in missing)} on the cluster's instances (network "
                f"tag {spec.target_tag}), so the gateway could not reach their engines; "
                f"create one: {needed.gcloud_command(self.config.project)}",
            )

    async def release_cluster(self, cluster_id: str) -> builtins.list[str]:
        """Delete what the provider made for the cluster besides instances (its firewall
        rule); refused while an instance of the cluster still exists. Returns what was
        deleted."""
        action = f"releasing cluster {cluster_id}"
        alive = [i.instance_id for i in await self.list(cluster_id) if not i.state.is_gone]
        if alive:
            raise Terminal(action, f"instances of the cluster still exist: {', '.join(alive)}")
        name = firewall_rule_name(cluster_id)
        rule = await self._firewall(name, action=action)
        if rule is None or not is_ours(rule, cluster_id):
            return []
        try:
            await self._firewall_change(
                action,
                partial(
                    self._firewalls.delete_unary,
                    project=self.config.project,
                    firewall=name,
                    retry=None,
                ),
            )
        except NotFound:
            return []
        self._admitted = {k for k in self._admitted if k[0] != cluster_id}
        return [f"firewall rule {name}"]

    async def _firewall(self, name: str, *, action: str) -> dict[str, Any] | None:
        try:
            raw = await self._retrying(
                action,
                lambda: self._firewalls.get(project=self.config.project, firewall=name, retry=None),
            )
        except NotFound:
            return None
        found: dict[str, Any] = json.loads(compute_v1.Firewall.to_json(raw))
        return found

    async def _firewall_change(self, action: str, call: Callable[[], compute_v1.Operation]) -> None:
        """Send a firewall insert, patch or delete and wait for its global operation."""
        operation = await self._retrying(action, call)
        await self._wait(operation, zone=None, action=action)

    # Reading instances.

    async def _search(self, tags: Mapping[str, str], *, action: str) -> builtins.list[Instance]:
        pages = await self._retrying(
            action,
            lambda: builtins.list(
                self._instances.aggregated_list(
                    request=compute_v1.AggregatedListInstancesRequest(
                        project=self.config.project, filter=_label_filter(tags)
                    ),
                    retry=None,
                )
            ),
        )
        found = [self._instance(raw) for _scope, scoped in pages for raw in scoped.instances]
        # Labels are lossy (lowercased); the verbatim tags decide.
        return [i for i in found if all(i.tags.get(k) == v for k, v in tags.items())]

    def _instance(self, raw: compute_v1.Instance) -> Instance:
        zone = raw.zone.rsplit("/", 1)[-1]
        metadata = {item.key: item.value for item in raw.metadata.items}
        try:
            tags = json.loads(metadata[TAGS_METADATA_KEY])
        except (KeyError, ValueError):
            tags = dict(raw.labels)
        interfaces = builtins.list(raw.network_interfaces)
        private = interfaces[0].network_i_p if interfaces else ""
        configs = builtins.list(interfaces[0].access_configs) if interfaces else []
        public = configs[0].nat_i_p if configs else ""
        return Instance(
            provider=ProviderName.GCP,
            instance_id=f"{zone}/{raw.name}",
            launch_id=tags.get(LAUNCH_ID_TAG) or launch_id_of(raw.name) or "",
            zone=zone,
            instance_type=raw.machine_type.rsplit("/", 1)[-1],
            state=_STATES.get(raw.status, InstanceState.PENDING),
            spot=raw.scheduling.provisioning_model == "SPOT",
            launched_at=_timestamp(raw.creation_timestamp),
            tags=tags,
            private_address=private or None,
            public_address=public or None,
        )

    # Plumbing.

    def _split(self, instance_id: str) -> tuple[str, str]:
        zone, _, name = instance_id.partition("/")
        if not zone or not name:
            raise NotFound(f"reading {instance_id!r}", "a GCE instance id is '<zone>/<name>'")
        return zone, name

    async def _wait(
        self,
        operation: compute_v1.Operation,
        *,
        zone: str | None,
        action: str,
        region: str | None = None,
    ) -> None:
        """Poll the zone (or region, or, with neither, global) operation until it is
        done, then raise its error if any."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.operation_timeout_seconds
        retry_after = self.config.throttle_retry_after
        while operation.status != compute_v1.Operation.Status.DONE:
            if loop.time() > deadline:
                raise Transient(action, f"operation {operation.name} still running", retry_after=60)
            await asyncio.sleep(self.config.operation_poll_seconds)
            poll: Callable[[], compute_v1.Operation] = (
                partial(
                    self._region_operations.get,
                    project=self.config.project,
                    region=region,
                    operation=operation.name,
                    retry=None,
                )
                if region is not None
                else partial(
                    self._global_operations.get,
                    project=self.config.project,
                    operation=operation.name,
                    retry=None,
                )
                if zone is None
                else partial(
                    self._zone_operations.get,
                    project=self.config.project,
                    zone=zone,
                    operation=operation.name,
                    retry=None,
                )
            )
            operation = await self._retrying(action, poll)
        _operation_error(operation, action, retry_after)

    async def _retrying(self, action: str, call: Callable[[], T]) -> T:
        """Run a blocking call that is safe to repeat in a thread, retrying server faults
        here; a rate limit (429, ``rateLimitExceeded``) is raised as :class:`Throttled` at
        once, and the controller records when to try again, as for EC2."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(retried_in_the_call),
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait_exponential(multiplier=self.config.retry_wait_seconds, max=30),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await asyncio.to_thread(call)
                except google_exceptions.GoogleAPICallError as error:
                    raise translate(
                        error, action, retry_after=self.config.throttle_retry_after
                    ) from error
        raise AssertionError("unreachable: tenacity reraises the last error")


def _rule_ports(rule: dict[str, Any]) -> set[int]:
    return allowed_ports(rule) or set()


def _timestamp(text: str) -> datetime:
    if not text:
        return datetime.now(tz=UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


__all__ = [
    "ENGINE_PORTS",
    "GcpConfig",
    "GcpProvider",
    "choose_image",
    "compact_policy_name",
    "image_source",
    "instance_name",
    "launch_id_of",
    "request_id",
    "translate",
]
