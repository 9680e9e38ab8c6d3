"""The GCE firewall rule that lets the gateway reach a cluster's engines.

GCE admits nothing from outside a VPC by default, so an engine on a GCE instance is
unreachable until a rule allows the gateway's address range to its port. Each cluster
gets one rule, ``as-<cluster hash>-engine``, which allows TCP to the engine ports from
``source_ranges`` on instances carrying the cluster's network tag (the same name). The
rule's description marks it as ours (``autoscaler:cluster=<id>``): the provider only ever
changes or deletes a rule carrying its own cluster's marker.

Two ways to run (``GcpConfig.firewall``):

* ``manage`` (the default): the provider creates the rule on the first launch that
  needs it, adds a port when an engine with another port is launched, reuses it after,
  and deletes it when the cluster is released (``autoscaler cluster release``).
* ``check``: the operator owns the rules; the controller refuses to start until a rule
  admits the source ranges to every engine port on the cluster's instances, and says
  the exact ``gcloud`` command that would create one.

This module is pure: building the rule, reading whether a rule admits what is needed,
and the command text. The calls are in :mod:`providers.gcp`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MARKER_PREFIX = "autoscaler:cluster="


def cluster_network_tag(cluster_id: str) -> str:
    """The network tag every instance of the cluster carries (a valid GCE tag)."""
    return f"as-{hashlib.sha256(cluster_id.encode()).hexdigest()[:6]}-engine"


def firewall_rule_name(cluster_id: str) -> str:
    """The cluster's managed firewall rule (firewall names and tags are separate spaces)."""
    return cluster_network_tag(cluster_id)


def marker(cluster_id: str) -> str:
    return f"{MARKER_PREFIX}{cluster_id}"


def is_ours(rule: Mapping[str, Any], cluster_id: str) -> bool:
    """Whether a rule (as the REST API returns it) is the managed rule of this cluster."""
    return marker(cluster_id) in str(rule.get("description", "")).split()


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """What the cluster's rule must say."""

    cluster_id: str
    network: str
    source_ranges: tuple[str, ...]
    ports: tuple[int, ...]

    @property
    def name(self) -> str:
        return firewall_rule_name(self.cluster_id)

    @property
    def target_tag(self) -> str:
        return cluster_network_tag(self.cluster_id)

    def body(self) -> dict[str, Any]:
        """The rule as a REST resource."""
        return {
            "name": self.name,
            "network": self.network,
            "direction": "INGRESS",
            "priority": 1000,
            "description": (
                f"{marker(self.cluster_id)} admits the gateway to the engines; "
                "managed by the GPU autoscaler and deleted with the cluster"
            ),
            "sourceRanges": list(self.source_ranges),
            "targetTags": [self.target_tag],
            "allowed": [{"IPProtocol": "tcp", "ports": [str(p) for p in sorted(self.ports)]}],
        }

    def gcloud_command(self, project: str) -> str:
        """The command that creates a rule this spec accepts."""
        rules = ",".join(f"tcp:{p}" for p in sorted(self.ports))
        return (
            f"gcloud compute firewall-rules create {self.name} --project {project} "
            f"--network {self.network.rsplit('/', 1)[-1]} --direction INGRESS --action ALLOW "
            f"--rules {rules} --source-ranges {','.join(self.source_ranges)} "
            f"--target-tags {self.target_tag}"
        )


def allowed_ports(rule: Mapping[str, Any]) -> set[int] | None:
    """The TCP ports a rule allows; ``None`` when it allows every TCP port."""
    ports: set[int] = set()
    for entry in rule.get("allowed", []) or []:
        protocol = str(entry.get("IPProtocol", "")).lower()
        if protocol not in ("tcp", "all"):
            continue
        listed = entry.get("ports") or []
        if not listed:
            return None
        for text in listed:
            low, _, high = str(text).partition("-")
            ports.update(range(int(low), int(high or low) + 1))
    return ports


def _covers(ranges: Iterable[str], wanted: str) -> bool:
    need = ipaddress.ip_network(wanted, strict=False)
    for text in ranges:
        have = ipaddress.ip_network(text, strict=False)
        if have.version == need.version and need.subnet_of(have):  # type: ignore[arg-type]
            return True
    return False


def _same_network(rule_network: str, wanted: str) -> bool:
    return rule_network.rsplit("/", 1)[-1] == wanted.rsplit("/", 1)[-1]


def admits(rule: Mapping[str, Any], spec: RuleSpec, *, instance_tags: Sequence[str]) -> set[int]:
    """The ports of ``spec`` that ``rule`` admits from every source range to the instances."""
    if rule.get("disabled") or str(rule.get("direction", "INGRESS")) != "INGRESS":
        return set()
    if not _same_network(str(rule.get("network", "")), spec.network):
        return set()
    targets = rule.get("targetTags") or []
    if targets and not set(targets) & set(instance_tags):
        return set()
    if rule.get("targetServiceAccounts"):
        return set()
    sources = rule.get("sourceRanges") or []
    if not all(_covers(sources, wanted) for wanted in spec.source_ranges):
        return set()
    ports = allowed_ports(rule)
    return set(spec.ports) if ports is None else set(spec.ports) & ports


def missing_ports(
    rules: Iterable[Mapping[str, Any]], spec: RuleSpec, *, instance_tags: Sequence[str]
) -> tuple[int, ...]:
    """The engine ports no rule admits (empty: the gateway can reach every engine)."""
    open_ports: set[int] = set()
    for rule in rules:
        open_ports |= admits(rule, spec, instance_tags=instance_tags)
    return tuple(sorted(set(spec.ports) - open_ports))


def needs_update(rule: Mapping[str, Any], spec: RuleSpec) -> bool:
    """Whether our rule lacks a port or says other source ranges or targets than the spec."""
    ports = allowed_ports(rule)
    if ports is not None and not set(spec.ports) <= ports:
        return True
    if sorted(rule.get("sourceRanges") or []) != sorted(spec.source_ranges):
        return True
    return list(rule.get("targetTags") or []) != [spec.target_tag]


__all__ = [
    "RuleSpec",
    "admits",
    "allowed_ports",
    "cluster_network_tag",
    "firewall_rule_name",
    "is_ours",
    "marker",
    "missing_ports",
    "needs_update",
]
