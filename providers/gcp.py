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
(its disk still costs money), so it reads as ``STOPPING``; only a deleted instance is gone.
Spot VMs are deleted on preemption; the preemption is reported from the
``compute.instances.preempted`` operations GCE records.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from google.api_core import exceptions as google_exceptions
from google.cloud import compute_v1
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from catalog.model import ProviderName
from providers.base import (
    CLUSTER_TAG,
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

T = TypeVar("T")

IMAGE_PROJECT = "deeplearning-platform-release"
DEFAULT_IMAGE_FAMILIES: Mapping[str, str] = {
    "12.1": "common-cu121-debian-11-py310",
    "12.3": "common-cu123-ubuntu-2204-py310",
    "12.4": "common-cu124-ubuntu-2204-py310",
    "default": "common-cu124-ubuntu-2204-py310",
}
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
_TRANSIENT_CODES = frozenset(
    {"RESOURCE_OPERATION_RATE_EXCEEDED", "RATE_LIMIT_EXCEEDED", "RESOURCE_NOT_READY"}
)
_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_STATES = {
    "PROVISIONING": InstanceState.PENDING,
    "STAGING": InstanceState.PENDING,
    "RUNNING": InstanceState.RUNNING,
    "STOPPING": InstanceState.STOPPING,
    "SUSPENDING": InstanceState.STOPPING,
    "SUSPENDED": InstanceState.STOPPING,
    "REPAIRING": InstanceState.STOPPING,
    "TERMINATED": InstanceState.STOPPING,
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

    ``image_families`` maps a CUDA pin ("12.4", or "default") to a Deep Learning VM image
    family in ``image_project``. ``client_options`` and ``credentials`` go to the client
    library unchanged (tests point ``api_endpoint`` at a local server).
    """

    project: str
    network: str = "global/networks/default"
    subnetwork: str | None = None
    image_project: str = IMAGE_PROJECT
    image_families: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGE_FAMILIES))
    boot_disk_gib: int = 200
    network_tags: tuple[str, ...] = ("autoscaler-engine",)
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
        if "default" not in self.image_families:
            raise ValueError("GcpConfig.image_families needs a 'default' entry")


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
    if status == 429 or status >= 500 or reasons & _RATE_REASONS:
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
    if codes & _TRANSIENT_CODES:
        raise Transient(action, detail, retry_after=retry_after)
    raise Terminal(action, detail)


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

    def close(self) -> None:
        """Close the HTTP sessions of the underlying clients."""
        for client in (self._instances, self._zone_operations, self._global_operations):
            client.transport.close()  # type: ignore[no-untyped-call]

    # The protocol.

    async def launch(self, request: LaunchRequest) -> Instance:
        action = request.action
        zone = request.offer.zone
        name = instance_name(request.cluster_id, request.launch_id)
        resource = self._resource(request, name=name)
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

    async def describe(self, instance_id: str) -> Instance:
        zone, name = self._split(instance_id)
        action = f"describing {instance_id}"
        raw = await self._retrying(
            action,
            lambda: self._instances.get(
                project=self.config.project, zone=zone, instance=name, retry=None
            ),
        )
        return self._instance(raw)

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
        families = self.config.image_families
        family = families.get(pin or "default", families["default"])
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
            tags=compute_v1.Tags(items=builtins.list(self.config.network_tags)),
            scheduling=scheduling,
            network_interfaces=[interface],
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=(
                            f"projects/{self.config.image_project}/global/images/family/{family}"
                        ),
                        disk_size_gb=self.config.boot_disk_gib,
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

    async def _wait(self, operation: compute_v1.Operation, *, zone: str, action: str) -> None:
        """Poll the zone operation until it is done, then raise its error if any."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.operation_timeout_seconds
        retry_after = self.config.throttle_retry_after
        while operation.status != compute_v1.Operation.Status.DONE:
            if loop.time() > deadline:
                raise Transient(action, f"operation {operation.name} still running", retry_after=60)
            await asyncio.sleep(self.config.operation_poll_seconds)
            operation = await self._retrying(
                action,
                partial(
                    self._zone_operations.get,
                    project=self.config.project,
                    zone=zone,
                    operation=operation.name,
                    retry=None,
                ),
            )
        _operation_error(operation, action, retry_after)

    async def _retrying(self, action: str, call: Callable[[], T]) -> T:
        """Run a blocking call that is safe to repeat in a thread, retrying transient faults."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Transient),
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


def _timestamp(text: str) -> datetime:
    if not text:
        return datetime.now(tz=UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


__all__ = [
    "DEFAULT_IMAGE_FAMILIES",
    "GcpConfig",
    "GcpProvider",
    "instance_name",
    "launch_id_of",
    "request_id",
    "translate",
]
