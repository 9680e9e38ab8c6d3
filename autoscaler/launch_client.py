"""A client shaped like Scale Launch's ``LaunchClient``, over the management API.

Scripts written for Launch's model endpoints run here with the import changed to
``from autoscaler import LaunchClient``. How Launch's words map onto ours:

* **endpoint** → a workload. ``endpoint_name`` is its slug and its name, so it must be a
  slug (lowercase letters, digits and dashes).
* ``min_workers`` / ``max_workers`` → ``execution_policy: autoscaling`` with those
  bounds (Launch's defaults: 1 and 1); ``per_worker`` → ``per_worker``;
  ``endpoint_type`` (``sync``, ``streaming``, ``async``; Launch's default ``sync``) →
  ``endpoint_type``; ``labels`` → ``labels``. The spec's own rules apply: a sync or
  streaming endpoint needs ``min_workers >= 1``.
* ``gpu_type`` → the cloud pool: a Launch GPU name (``nvidia-ampere-a100``, ...) or one
  of ours (``NVIDIA A100-SXM4-80GB``); ``max_instances`` is ``max_workers`` and the
  hourly ceiling cloud workers need is the client's ``max_hourly_cost_usd`` (argument,
  else ``AUTOSCALER_MAX_HOURLY_COST_USD``). Without ``gpu_type`` the endpoint runs on the
  project's registered private workers (``autoscaler agent``).
* ``gpus`` is 0 or 1: a replica takes its worker's GPU; more is refused. ``cpus``,
  ``memory`` and ``storage`` are checked and accepted, and place nothing: replicas are
  placed by GPU, not by CPU or memory requests.
* **model bundle** → the model, backend and command of the workload, registered once with
  :meth:`LaunchClient.create_model_bundle` and kept in a JSON file on this machine
  (``AUTOSCALER_LAUNCH_BUNDLES``, else ``~/.config/autoscaler/launch-bundles.json``),
  per API URL and project. An endpoint naming an unknown bundle is refused and nothing
  is stored.
* ``api_key`` → the management token (an ``ik_sdk_…`` control token; unset: the
  ``AUTOSCALER_SDK_TOKEN`` variable); ``endpoint`` → the API URL (unset:
  ``AUTOSCALER_URL``); the project is the ``project`` argument, else
  ``AUTOSCALER_PROJECT``.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from autoscaler.sdk import DEFAULT_URL, ApiError, ConfigError, ManagementClient
from autoscaler.spec import Backend, EndpointType, TaskType, WorkloadSpec

LAUNCH_GPU_TYPES = {
    "nvidia-tesla-t4": "Tesla T4",
    "nvidia-ampere-a10": "NVIDIA A10G",
    "nvidia-ampere-a100": "NVIDIA A100-SXM4-40GB",
    "nvidia-ampere-a100e": "NVIDIA A100-SXM4-80GB",
    "nvidia-hopper-h100": "NVIDIA H100 80GB HBM3",
}
"""Launch's GPU names and the GPU each one buys here (MIG slices are not offered)."""

_MEMORY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """What a Launch bundle names here: the model, the serving backend and command."""

    name: str
    model: str
    backend: str
    command: str | None = None
    task_type: str = TaskType.TEXT2TEXT.value


@dataclass(frozen=True, slots=True)
class ModelEndpoint:
    """An endpoint as Launch's calls return it, read from the workload."""

    name: str
    endpoint_type: str | None
    model_bundle: str | None
    min_workers: int | None
    max_workers: int | None
    per_worker: int | None
    labels: dict[str, str] = field(default_factory=dict)
    status: str = ""


class LaunchClient:
    """Launch's endpoint calls on this project's management API (see the module text)."""

    def __init__(
        self,
        api_key: str | None = None,
        endpoint: str | None = None,
        *,
        project: str | None = None,
        max_hourly_cost_usd: float | None = None,
        bundles_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._url = endpoint or os.environ.get("AUTOSCALER_URL", DEFAULT_URL)
        self._mgmt = ManagementClient(
            url=self._url,
            token=api_key or os.environ.get("AUTOSCALER_SDK_TOKEN", ""),
            project=project or os.environ.get("AUTOSCALER_PROJECT", ""),
        )
        self.project = self._mgmt.project
        cost = max_hourly_cost_usd
        if cost is None and os.environ.get("AUTOSCALER_MAX_HOURLY_COST_USD"):
            raw = os.environ["AUTOSCALER_MAX_HOURLY_COST_USD"]
            try:
                cost = float(raw)
            except ValueError:
                raise ConfigError(
                    f"AUTOSCALER_MAX_HOURLY_COST_USD is {raw!r}; allowed: a number of dollars > 0"
                ) from None
        self._max_hourly_cost_usd = cost
        default = Path.home() / ".config" / "autoscaler" / "launch-bundles.json"
        self._bundles_path = Path(
            bundles_path or os.environ.get("AUTOSCALER_LAUNCH_BUNDLES") or default
        )

    def close(self) -> None:
        self._mgmt.close()

    def __enter__(self) -> LaunchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bundles ------------------------------------------------------------------------

    def create_model_bundle(
        self,
        name: str,
        *,
        model: str,
        backend: Backend | str = Backend.VLLM,
        command: str | None = None,
        task_type: TaskType | str = TaskType.TEXT2TEXT,
    ) -> ModelBundle:
        """Register (or replace) a bundle: what endpoints naming ``name`` will serve.
        Checked like a workload's model, backend, command and task type."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"model bundle name {name!r}: allowed: a non-empty string")
        probe = _validated(
            {
                "name": name,
                "slug": "bundle-check",
                "model": model,
                "backend": backend,
                "command": command,
                "task_type": task_type,
            }
        )
        bundle = ModelBundle(
            name=name,
            model=probe.model,
            backend=probe.backend.value,
            command=probe.command,
            task_type=probe.task_type.value,
        )
        stored = self._read_bundles()
        mine = stored.setdefault(self._scope(), {})
        mine[name] = {
            "model": bundle.model,
            "backend": bundle.backend,
            "command": bundle.command,
            "task_type": bundle.task_type,
        }
        # Owner-only, as every file of ours: a bundle's command may carry a credential.
        self._bundles_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._bundles_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(stored, indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)  # a file left by an earlier write keeps its mode otherwise
        tmp.replace(self._bundles_path)
        return bundle

    def get_model_bundle(self, name: str) -> ModelBundle:
        found = self._read_bundles().get(self._scope(), {}).get(name)
        if found is None:
            known = sorted(self._read_bundles().get(self._scope(), {}))
            raise LookupError(
                f"unknown model bundle {name!r} in project {self.project!r} "
                f"(known: {', '.join(known) or 'none'}); create it first with "
                f"LaunchClient.create_model_bundle({name!r}, model=..., backend=..., command=...)"
            )
        return ModelBundle(name=name, **found)

    def list_model_bundles(self) -> builtins.list[ModelBundle]:
        mine = self._read_bundles().get(self._scope(), {})
        return [ModelBundle(name=n, **b) for n, b in sorted(mine.items())]

    # -- endpoints ----------------------------------------------------------------------

    def create_model_endpoint(
        self,
        endpoint_name: str,
        model_bundle: str | ModelBundle,
        cpus: int | float = 3,
        memory: str = "8Gi",
        storage: str | None = None,
        gpus: int = 0,
        min_workers: int = 1,
        max_workers: int = 1,
        per_worker: int | None = None,
        gpu_type: str | None = None,
        endpoint_type: str = "sync",
        high_priority: bool | None = None,
        update_if_exists: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> ModelEndpoint:
        """Create the endpoint as a workload (or update it with ``update_if_exists``).
        A keyword Launch has that is not listed here is refused by Python (TypeError)."""
        _check_resources(cpus=cpus, memory=memory, storage=storage, gpus=gpus)
        bundle = (
            model_bundle
            if isinstance(model_bundle, ModelBundle)
            else self.get_model_bundle(model_bundle)
        )
        body: dict[str, Any] = {
            "name": endpoint_name,
            "slug": endpoint_name,
            "model": bundle.model,
            "backend": bundle.backend,
            "command": bundle.command,
            "task_type": bundle.task_type,
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": min_workers,
                "max_workers": max_workers,
                "workers": self._workers(gpu_type, max_workers),
                **self._ceiling(gpu_type),
            },
            "endpoint_type": endpoint_type,
            "per_worker": per_worker,
            "labels": {**(labels or {}), "launch-bundle": _label_value(bundle.name)},
        }
        spec = _validated(body)
        if not update_if_exists and self._exists(endpoint_name):
            raise ValueError(
                f"model endpoint {endpoint_name!r} already exists in project "
                f"{self.project!r}; pass update_if_exists=True to update it"
            )
        self._mgmt.ensure(spec)
        return self.get_model_endpoint(endpoint_name)

    def list_model_endpoints(self) -> builtins.list[ModelEndpoint]:
        return [_endpoint(w) for w in self._mgmt.list()]

    def get_model_endpoint(self, endpoint_name: str) -> ModelEndpoint:
        return _endpoint(self._mgmt.get(endpoint_name))

    def edit_model_endpoint(
        self,
        *,
        model_endpoint: str | ModelEndpoint,
        model_bundle: str | ModelBundle | None = None,
        cpus: int | float | None = None,
        memory: str | None = None,
        storage: str | None = None,
        gpus: int | None = None,
        min_workers: int | None = None,
        max_workers: int | None = None,
        per_worker: int | None = None,
        gpu_type: str | None = None,
        high_priority: bool | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> ModelEndpoint:
        """Change what is given and keep the rest: a merge patch on the workload, checked
        like ``ManagementClient.update``. Changing only bounds or labels keeps the
        running replicas."""
        name = model_endpoint.name if isinstance(model_endpoint, ModelEndpoint) else model_endpoint
        _check_resources(cpus=cpus, memory=memory, storage=storage, gpus=gpus)
        patch: dict[str, Any] = {}
        if model_bundle is not None:
            bundle = (
                model_bundle
                if isinstance(model_bundle, ModelBundle)
                else self.get_model_bundle(model_bundle)
            )
            patch.update(
                model=bundle.model,
                backend=bundle.backend,
                command=bundle.command,
                task_type=bundle.task_type,
            )
            patch["labels"] = {"launch-bundle": _label_value(bundle.name)}
        config: dict[str, Any] = {}
        if min_workers is not None:
            config["min_workers"] = min_workers
        if max_workers is not None:
            config["max_workers"] = max_workers
        if gpu_type is not None or max_workers is not None:
            current = self._mgmt.get(name)["spec"]["execution_policy_config"]
            source = (current.get("workers") or {}).get("source", "cloud")
            if gpu_type is not None:
                config["workers"] = self._workers(gpu_type, max_workers or current["max_workers"])
                config.update(self._ceiling(gpu_type))
            elif source == "cloud":
                config["workers"] = {"cloud_pool": {"max_instances": max_workers}}
        if config:
            patch["execution_policy"] = "autoscaling"
            patch["execution_policy_config"] = config
        if per_worker is not None:
            patch["per_worker"] = per_worker
        if labels is not None:
            patch["labels"] = {**patch.get("labels", {}), **labels}
        if patch:
            self._mgmt.update(name, patch)
        return self.get_model_endpoint(name)

    def delete_model_endpoint(self, model_endpoint_name: str | ModelEndpoint) -> bool:
        name = (
            model_endpoint_name.name
            if isinstance(model_endpoint_name, ModelEndpoint)
            else model_endpoint_name
        )
        self._mgmt.delete(name)
        return True

    # -- plumbing -----------------------------------------------------------------------

    def _workers(self, gpu_type: str | None, max_workers: int) -> dict[str, Any]:
        if gpu_type is None:
            workers = self._mgmt._call("GET", f"/v1/projects/{self.project}/workers")["items"]
            if not workers:
                raise ValueError(
                    f"no gpu_type given and project {self.project!r} has no registered "
                    "private worker: register one (autoscaler agent) or pass gpu_type "
                    f"(one of {', '.join(LAUNCH_GPU_TYPES)}) for a cloud pool"
                )
            return {"source": "private", "private_worker_ids": [w["id"] for w in workers]}
        gpu = LAUNCH_GPU_TYPES.get(gpu_type, gpu_type)
        return {"source": "cloud", "cloud_pool": {"gpu_pool": [gpu], "max_instances": max_workers}}

    def _ceiling(self, gpu_type: str | None) -> dict[str, Any]:
        if gpu_type is None:
            return {}
        if self._max_hourly_cost_usd is None:
            raise ConfigError(
                f"gpu_type {gpu_type!r} buys cloud GPUs, which need an hourly ceiling: pass "
                "LaunchClient(max_hourly_cost_usd=...) or set AUTOSCALER_MAX_HOURLY_COST_USD"
            )
        return {"max_hourly_cost_usd": self._max_hourly_cost_usd}

    def _exists(self, slug: str) -> bool:
        try:
            self._mgmt.get(slug)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _scope(self) -> str:
        return f"{self._url.rstrip('/')}#{self.project}"

    def _read_bundles(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            loaded: dict[str, dict[str, dict[str, Any]]] = json.loads(
                self._bundles_path.read_text()
            )
        except FileNotFoundError:
            return {}
        return loaded


def _validated(body: Mapping[str, Any]) -> WorkloadSpec:
    try:
        return WorkloadSpec.model_validate(body)
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc


def _check_resources(
    *, cpus: float | None, memory: str | None, storage: str | None, gpus: int | None
) -> None:
    if cpus is not None and (isinstance(cpus, bool) or not cpus > 0):
        raise ValueError(f"cpus is {cpus!r}; allowed: a number > 0")
    for key, value in (("memory", memory), ("storage", storage)):
        if value is not None and not (isinstance(value, str) and _MEMORY_RE.match(value)):
            raise ValueError(f"{key} is {value!r}; allowed: a quantity such as '8Gi'")
    if gpus is not None and (isinstance(gpus, bool) or gpus not in (0, 1)):
        raise ValueError(
            f"gpus is {gpus!r}; allowed: 0 or 1 (a replica takes one worker's GPU here)"
        )


def _label_value(name: str) -> str:
    """A bundle name as a label value (which allows 63 of [-_.a-zA-Z0-9])."""
    return re.sub(r"[^-_.a-zA-Z0-9]", "-", name)[:63].strip("-_.") or "bundle"


def _endpoint(workload: Mapping[str, Any]) -> ModelEndpoint:
    spec = workload["spec"]
    config = spec.get("execution_policy_config") or {}
    labels = dict(spec.get("labels") or {})
    bundle = labels.pop("launch-bundle", None)
    return ModelEndpoint(
        name=workload["slug"],
        endpoint_type=spec.get("endpoint_type"),
        model_bundle=bundle,
        min_workers=config.get("min_workers"),
        max_workers=config.get("max_workers"),
        per_worker=spec.get("per_worker"),
        labels=labels,
        status=(workload.get("status") or {}).get("actual_phase", ""),
    )


# EndpointType is re-exported so that Launch-style code can name its values.
__all__ = ["LAUNCH_GPU_TYPES", "EndpointType", "LaunchClient", "ModelBundle", "ModelEndpoint"]
