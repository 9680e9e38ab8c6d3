"""The Prometheus alert rules: valid, unit-tested with promtool, and on metrics that exist.

promtool comes with Debian's ``prometheus`` package (``scripts/check --install`` installs
it). Without it these tests skip with a message, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from autoscaler.metrics import ControllerMetrics
from gateway.signals import Metrics as GatewayMetrics

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is required under CI=true (apt-get install prometheus)")
    pytest.skip("promtool not installed (apt-get install prometheus); alert rule tests skipped")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )


def test_alert_rules_are_valid() -> None:
    result = _run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = _run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _exported(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_every_alert_reads_a_metric_the_code_exports() -> None:
    exported = _exported(ControllerMetrics().registry) | _exported(GatewayMetrics().registry)
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in expressions for m in re.findall(r"\bautoscaler_[a-z_]+", e)}
    assert used, "the rules read no autoscaler metric"
    assert used <= exported, f"alerts read metrics nobody exports: {sorted(used - exported)}"
    alerts = {r.get("alert") for g in rules["groups"] for r in g["rules"]}
    for needed in (
        "TtftAboveTarget",
        "ScaleUpBlockedByBudget",
        "LaunchFailures",
        "OrphanInstances",
        "SlowColdStarts",
        "CatalogStale",
        "CatalogSyncFailing",
        "ControllerDown",
        "TtftAboveTargetAtMaxReplicas",
        "WorkloadSpendNearCeiling",
        "ReconcilePassOverrun",
        "WorkloadQuarantined",
    ):
        assert needed in alerts


def test_the_dashboard_reads_only_exported_metrics() -> None:
    import json

    dashboard = json.loads((RULES_DIR.parent / "grafana" / "autoscaler-dashboard.json").read_text())
    exported = _exported(ControllerMetrics().registry) | _exported(GatewayMetrics().registry)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bautoscaler_[a-z_]+", e)}
    assert used and used <= exported, sorted(used - exported)


def test_the_dashboard_shows_each_workloads_ttft_target_beside_its_measurement() -> None:
    import json

    dashboard = json.loads((RULES_DIR.parent / "grafana" / "autoscaler-dashboard.json").read_text())
    [panel] = [p for p in dashboard["panels"] if "TTFT" in p["title"]]
    exprs = [t["expr"] for t in panel["targets"]]
    assert any("autoscaler_gateway_ttft_seconds_bucket" in e for e in exprs)
    assert any("autoscaler_controller_workload_ttft_target_seconds" in e for e in exprs)
    assert all("by (project, workload" in e for e in exprs)  # one line pair per workload
