"""The controller's Prometheus metrics, in a registry of their own.

Names start ``autoscaler_controller_`` (the gateway's start ``autoscaler_gateway_``);
``deploy/prometheus/alerts.yml`` alerts on them. Label values are bounded: workloads,
providers, phases, and refusal reasons from a fixed set (:func:`refusal_reason`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscaler.labels import metric_label_name

_WORKLOAD = ("project", "workload")
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BOOT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0)

REFUSAL_REASONS = (
    "workload_ceiling",
    "pool_ceiling",
    "max_instances",
    "fleet_ceiling",
    "no_offer",
)


def refusal_reason(text: str) -> str:
    """The bounded label for a refusal message from ``decide.budget`` or ``decide.plan``."""
    for needle, label in (
        ("max_instances", "max_instances"),
        ("fleet ceiling", "fleet_ceiling"),
        ("cloud pool ceiling", "pool_ceiling"),
        ("workload ceiling", "workload_ceiling"),
    ):
        if needle in text:
            return label
    return "no_offer"


class ControllerMetrics:
    """Every metric the controller exports; one instance per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.replicas = Gauge(
            "autoscaler_controller_replicas",
            "Replicas by phase (ledger rows not confirmed terminated).",
            (*_WORKLOAD, "phase"),
            registry=r,
        )
        self.desired = Gauge(
            "autoscaler_controller_desired_replicas",
            "Replicas the workload's policy wants now.",
            _WORKLOAD,
            registry=r,
        )
        self.workload_usd = Gauge(
            "autoscaler_controller_workload_usd_per_hour",
            "Hourly price of the workload's instances not confirmed terminated.",
            _WORKLOAD,
            registry=r,
        )
        self.workload_ceiling = Gauge(
            "autoscaler_controller_workload_ceiling_usd_per_hour",
            "The workload's hourly ceiling (absent when it has none).",
            _WORKLOAD,
            registry=r,
        )
        self.fleet_usd = Gauge(
            "autoscaler_controller_fleet_usd_per_hour",
            "Hourly price of every instance not confirmed terminated.",
            registry=r,
        )
        self.fleet_ceiling = Gauge(
            "autoscaler_controller_fleet_ceiling_usd_per_hour",
            "The fleet-wide hourly ceiling of the configuration (0: none).",
            registry=r,
        )
        self.refused = Counter(
            "autoscaler_controller_scale_up_refused",
            "Launches the budget (or a lack of offers) refused, by reason.",
            (*_WORKLOAD, "reason"),
            registry=r,
        )
        self.blocked = Gauge(
            "autoscaler_controller_scale_up_blocked",
            "1 while the workload wants more replicas than the budget or offers allow.",
            (*_WORKLOAD, "reason"),
            registry=r,
        )
        self.provider_errors = Counter(
            "autoscaler_controller_provider_errors",
            "Provider calls that failed, by provider, operation and error type.",
            ("provider", "operation", "code"),
            registry=r,
        )
        self.launches = Counter(
            "autoscaler_controller_launches",
            "Instances bought.",
            ("provider",),
            registry=r,
        )
        self.launch_to_ready = Histogram(
            "autoscaler_controller_launch_to_ready_seconds",
            "From the intent to the engine answering its health path.",
            ("provider",),
            buckets=_BOOT_BUCKETS,
            registry=r,
        )
        self.parked = Gauge(
            "autoscaler_controller_parked_replicas",
            "Parked replicas (confirmed asleep or stopped) of the workload's warm pool, by "
            "mode (sleeping, stopped).",
            (*_WORKLOAD, "mode"),
            registry=r,
        )
        self.parks = Counter(
            "autoscaler_controller_parks",
            "Replicas parked (the engine or the provider confirmed it), by provider and "
            "mode (sleeping, stopped).",
            ("provider", "mode"),
            registry=r,
        )
        self.resumes = Counter(
            "autoscaler_controller_resumes",
            "Parked replicas resumed (woken or started again), by provider and the mode "
            "they waited in.",
            ("provider", "mode"),
            registry=r,
        )
        self.resume_to_ready = Histogram(
            "autoscaler_controller_resume_to_ready_seconds",
            "From a parked replica's resume to its engine answering its health path, by "
            "provider and the path it came back by (sleeping: woken; stopped: started).",
            ("provider", "mode"),
            buckets=_BOOT_BUCKETS,
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "autoscaler_controller_reconcile_duration_seconds",
            "One reconcile pass over the fleet.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "autoscaler_controller_reconcile_errors",
            "Workload reconciles that failed (the others went on).",
            _WORKLOAD,
            registry=r,
        )
        self.pass_workloads = Gauge(
            "autoscaler_controller_pass_workloads",
            "Workloads of the last pass: stepped (kind=stepped: changed, a timer due, or "
            "due for their resync) or left alone (kind=left_alone: nothing they read "
            "changed); kind=batched: of the stepped, those whose one launch went in the "
            "pass's batch instead of a full step.",
            ("kind",),
            registry=r,
        )
        self.pass_overruns = Counter(
            "autoscaler_controller_pass_overruns",
            "Work cut short for taking more than its time: a workload past its share of a "
            "pass (kind=workload), or a pass past its budget, the rest continued in the "
            "next pass (kind=pass).",
            ("kind",),
            registry=r,
        )
        self.quarantined = Gauge(
            "autoscaler_controller_workload_quarantined",
            "1 while the controller keeps failing on the workload and retries it with backoff.",
            _WORKLOAD,
            registry=r,
        )
        self.last_reconcile = Gauge(
            "autoscaler_controller_last_reconcile_timestamp_seconds",
            "When the last pass finished (Unix seconds).",
            registry=r,
        )
        self.orphans = Counter(
            "autoscaler_controller_orphans_found",
            "Tagged instances the ledger did not know, by provider.",
            ("provider",),
            registry=r,
        )
        self.catalog_age = Gauge(
            "autoscaler_controller_catalog_age_seconds",
            "Age of the offer catalog placement uses.",
            registry=r,
        )
        self.catalog_max_age = Gauge(
            "autoscaler_controller_catalog_max_age_seconds",
            "The catalog age the configuration tolerates (catalog_max_age_sec).",
            registry=r,
        )
        self.catalog_syncs = Counter(
            "autoscaler_controller_catalog_syncs",
            "Catalog syncs and reloads by result: ok, failed (the previous catalog was "
            "kept), unreadable (a snapshot file that could not be read).",
            ("result",),
            registry=r,
        )
        self.ttft_target = Gauge(
            "autoscaler_controller_workload_ttft_target_seconds",
            "The workload's TTFT target: upper_allowed_latency_sec of its autoscaling "
            "policy, above which it scales up (absent for fixed and scheduled workloads).",
            _WORKLOAD,
            registry=r,
        )
        self.ttft_lower = Gauge(
            "autoscaler_controller_workload_ttft_lower_seconds",
            "The TTFT below which the workload may scale down (lower_allowed_latency_sec).",
            _WORKLOAD,
            registry=r,
        )
        self.max_replicas = Gauge(
            "autoscaler_controller_workload_max_replicas",
            "The most replicas the workload's policy allows (max_workers, or its fixed "
            "or scheduled count).",
            _WORKLOAD,
            registry=r,
        )
        self.spot_rate = Gauge(
            "autoscaler_controller_workload_spot_interruptions_per_hour",
            "The spot interruption rate the workload's spot spares weigh: measured from "
            "its spot machines of the last 7 days, with a prior of one per machine-week "
            "(decide.spot_rate; absent where the workload does not allow spot).",
            _WORKLOAD,
            registry=r,
        )
        self.spot_notices = Counter(
            "autoscaler_controller_spot_notices",
            "Spot interruption notices acted on (the replica drained and replaced), by "
            "provider and where the notice came from.",
            ("provider", "source"),
            registry=r,
        )
        self.leader = Gauge(
            "autoscaler_controller_leader",
            "1 while this controller holds the leader lock and reconciles (with sharding: "
            "shard 0's lease, which carries the orphan sweep and the catalog sync).",
            registry=r,
        )
        self.shards_owned = Gauge(
            "autoscaler_controller_shards_owned",
            "Shards (of 64) whose lease this controller holds, with sharding on.",
            registry=r,
        )
        self.workload_labels = WorkloadLabels()
        r.register(self.workload_labels)
        self._workloads: dict[tuple[str, str], WorkloadGauges] = {}

    def workload(self, project: str, workload: str) -> WorkloadGauges:
        """The workload's gauge children, each looked up once (:class:`WorkloadGauges`)."""
        key = (project, workload)
        gauges = self._workloads.get(key)
        if gauges is None:
            gauges = self._workloads[key] = WorkloadGauges(key)
        return gauges

    def forget_workload(self, project: str, workload: str) -> None:
        """Drop a gone workload's series so dashboards do not show it forever."""
        self._workloads.pop((project, workload), None)
        self.workload_labels.forget(project, workload)
        for gauge in (
            self.desired,
            self.workload_usd,
            self.workload_ceiling,
            self.ttft_target,
            self.ttft_lower,
            self.max_replicas,
            self.quarantined,
            self.spot_rate,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(project, workload)
        for phase in (
            "pending",
            "booting",
            "ready",
            "draining",
            "terminating",
            "parking",
            "parked",
        ):
            with contextlib.suppress(KeyError):
                self.replicas.remove(project, workload, phase)
        for mode in ("sleeping", "stopped"):
            with contextlib.suppress(KeyError):
                self.parked.remove(project, workload, mode)
        for reason in REFUSAL_REASONS:
            with contextlib.suppress(KeyError):
                self.blocked.remove(project, workload, reason)


class WorkloadGauges:
    """One workload's labelled gauge children, each looked up once and kept.

    ``Gauge.labels`` checks, converts and locks on every call, and a step sets some 18
    of a workload's gauges: with the children kept, a step pays a dictionary lookup for
    each. A child is made on its first use, so a workload exports the series its calls
    made, as before. Only :meth:`remove` and :meth:`ControllerMetrics.forget_workload`
    drop a series of these gauges, and they drop the kept child with it (a child kept
    after its series was removed would be set and never exported)."""

    __slots__ = ("_children", "_labels")

    def __init__(self, labels: tuple[str, str]) -> None:
        self._labels = labels
        self._children: dict[tuple[Gauge, str], Gauge] = {}

    def child(self, gauge: Gauge, extra: str = "") -> Gauge:
        """``gauge``'s child for this workload (and ``extra``, the third label's value
        of a gauge that has one): O(1) once made."""
        key = (gauge, extra)
        child = self._children.get(key)
        if child is None:
            labels = (*self._labels, extra) if extra else self._labels
            child = self._children[key] = gauge.labels(*labels)
        return child

    def remove(self, gauge: Gauge) -> None:
        """Drop the workload's series of a two-label ``gauge`` (none: nothing)."""
        if self._children.pop((gauge, ""), None) is not None:
            with contextlib.suppress(KeyError):
                gauge.remove(*self._labels)


class WorkloadLabels(Collector):
    """``autoscaler_controller_workload_labels``: one series per workload, value 1, with
    the workload's labels as ``label_<key>`` (the kube-state-metrics pattern), so any
    metric can be summed by team with a join, e.g.::

        sum by (label_team) (autoscaler_controller_workload_usd_per_hour
          * on (project, workload) group_left (label_team)
          autoscaler_controller_workload_labels)
    """

    NAME = "autoscaler_controller_workload_labels"

    def __init__(self) -> None:
        self._labels: dict[tuple[str, str], dict[str, str]] = {}

    def set(self, project: str, workload: str, labels: Mapping[str, str]) -> None:
        self._labels[(project, workload)] = {metric_label_name(k): v for k, v in labels.items()}

    def forget(self, project: str, workload: str) -> None:
        self._labels.pop((project, workload), None)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            self.NAME, "Each workload's labels as label_<key> (value 1), for joins by label."
        )
        for (project, workload), labels in sorted(dict(self._labels).items()):
            family.add_sample(self.NAME, {**labels, "project": project, "workload": workload}, 1.0)
        yield family
