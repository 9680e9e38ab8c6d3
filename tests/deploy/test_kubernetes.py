"""The Kustomize manifests under deploy/kubernetes: rendered by ``kubectl kustomize``,
validated offline against the Kubernetes schemas (``kubernetes-validate``, strict), and
held to this checkout: the commands parse, the probes and the scraped port exist, the
configuration loads, every budget and autoscaler points at a Deployment that exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from autoscaler.config import parse_config
from tests.deploy.test_deploy_files import DEPLOY, parses

KUSTOMIZE = DEPLOY / "kubernetes"
VALIDATE_VERSION = "1.30.0"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl is not installed (scripts/check --install installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "deprecated" not in run.stderr.lower(), run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def _of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for deployment in _of(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment["metadata"]["name"], container


def test_every_built_in_resource_is_valid_against_the_kubernetes_schemas(
    rendered: list[dict[str, Any]],
) -> None:
    kinds = {d["kind"] for d in rendered}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "ServiceMonitor",
    } <= kinds
    for doc in rendered:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Services below
        kubernetes_validate.validate(doc, VALIDATE_VERSION, strict=True)


def test_the_validator_refuses_a_broken_resource(rendered: list[dict[str, Any]]) -> None:
    [deployment, *_] = _of(rendered, "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VALIDATE_VERSION, strict=True)


def test_containers_run_commands_this_checkout_has(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    seen = set()
    for name, container in _containers(rendered):
        argv = [
            a.replace("$(AUTOSCALER_DB_URL)", "postgresql+asyncpg://db/a")
            for a in container["args"]
        ]
        context = parses(argv, tmp_path)
        assert context.params["host"] == "0.0.0.0", name
        assert context.params["database_url"].startswith("postgresql"), name
        seen.add(argv[0])
        env = {e["name"] for e in container["env"]}
        assert {"AUTOSCALER_DB_URL", "AUTOSCALER_ADMIN_TOKEN"} <= env, name
        assert container["resources"]["requests"] and container["resources"]["limits"], name
    assert seen == {"run", "gateway"}


def test_probes_reach_the_health_routes_on_declared_ports(rendered: list[dict[str, Any]]) -> None:
    health = {"run": "/healthz", "gateway": "/health"}
    for name, container in _containers(rendered):
        ports = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert check["port"] in ports, f"{name} {probe}"
            assert check["path"] == health[container["args"][0]], f"{name} {probe}"


def test_the_configuration_the_controller_mounts_loads(rendered: list[dict[str, Any]]) -> None:
    [config_map] = _of(rendered, "ConfigMap")
    config = parse_config(yaml.safe_load(config_map["data"]["controller.yaml"]), source="kustomize")
    assert config.fleet_max_hourly_cost_usd is not None  # a fleet ceiling is set
    [controller] = [c for _, c in _containers(rendered) if c["args"][0] == "run"]
    mounted = {m["mountPath"] for m in controller["volumeMounts"]}
    path = controller["args"][controller["args"].index("--config") + 1]
    assert str(Path(path).parent) in mounted


def test_budgets_autoscalers_and_monitors_point_at_what_exists(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = {d["metadata"]["name"]: d for d in _of(rendered, "Deployment")}
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    for pdb in _of(rendered, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selects(selector, labels) for labels in pod_labels), pdb["metadata"]["name"]
    assert {p["metadata"]["name"] for p in _of(rendered, "PodDisruptionBudget")} >= {
        "autoscaler-controller",
        "autoscaler-gateway",
    }
    [hpa] = _of(rendered, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in deployments
    assert target["name"] == "autoscaler-gateway" and hpa["spec"]["minReplicas"] >= 2
    assert deployments["autoscaler-controller"]["spec"]["replicas"] >= 2  # a standby leader
    services = _of(rendered, "Service")
    for monitor in _of(rendered, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if selects(selector, s["metadata"]["labels"])]
        assert matched, "the ServiceMonitor selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matched)


def test_every_pod_on_the_shared_store_gets_one_sealing_key_from_a_secret(
    rendered: list[dict[str, Any]],
) -> None:
    """Processes sharing PostgreSQL read the engine-key sealing key from the environment
    only; a pod without it would store engine keys in the clear."""
    sources = set()
    for name, container in _containers(rendered):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "AUTOSCALER_DB_URL" in env, name
        ref = env["AUTOSCALER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]
        sources.add((ref["name"], ref["key"]))
    assert len(sources) == 1  # one key for every controller and gateway
