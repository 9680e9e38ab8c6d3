"""Python client of the management API.

>>> client = ManagementClient.from_env(project="acme")
>>> ref = client.ensure(WorkloadSpec(name="Support bot", slug="support-bot", model="…"))
>>> ref.action, ref.generation
('created', 1)

Connection errors and 5xx answers are retried with exponential backoff (tenacity); every
other error is raised as :class:`ApiError` with the API's stable code and details.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from autoscaler.spec import OnDrift, WorkloadSpec

DEFAULT_URL = "http://127.0.0.1:8001"


class ApiError(Exception):
    """An error answer of the management API."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


class ConfigError(Exception):
    """The client is missing a setting (URL, token or project)."""


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """What ``ensure`` did: ``action`` is created, unchanged, updated or ignored."""

    project_slug: str
    workload_slug: str
    generation: int
    action: str
    diff: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CreatedSecret:
    """A key or token just made. ``secret`` is shown this once."""

    id: str
    secret: str
    prefix: str
    name: str


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the controller sees it: what it wants of it (``desired_phase``:
    running or terminated), what has happened (``actual_phase``: pending, booting,
    ready, draining, terminating, terminated), and the engine's command line with its
    secrets masked (``None`` where not recorded)."""

    launch_id: str
    desired_phase: str
    actual_phase: str
    command: str | None


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A workload's desired and actual phase (see ``docs/architecture.md``, Status),
    its counts, endpoint, last error, and its replicas newest first."""

    desired_phase: str
    actual_phase: str
    desired: int | None
    ready: int
    endpoint: str
    last_error: str | None
    replicas: tuple[ReplicaStatus, ...]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ApiError) and exc.status >= 500


class ManagementClient:
    """Synchronous client; one per project. Use as a context manager or call ``close``."""

    def __init__(
        self,
        *,
        url: str,
        token: str,
        project: str,
        timeout: float = 30.0,
        retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not token:
            raise ConfigError("no token: set AUTOSCALER_SDK_TOKEN (an ik_sdk_… control token)")
        if not project:
            raise ConfigError("no project: pass project=… or set AUTOSCALER_PROJECT")
        self.project = project
        self._retries = retries
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_env(
        cls, project: str | None = None, *, url: str | None = None, **kwargs: Any
    ) -> ManagementClient:
        """Read ``AUTOSCALER_URL``, ``AUTOSCALER_SDK_TOKEN`` and ``AUTOSCALER_PROJECT``."""
        return cls(
            url=url or os.environ.get("AUTOSCALER_URL", DEFAULT_URL),
            token=os.environ.get("AUTOSCALER_SDK_TOKEN", ""),
            project=project or os.environ.get("AUTOSCALER_PROJECT", ""),
            **kwargs,
        )

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __del__(self) -> None:
        # Scripts written like the product's samples never close their clients; the
        # pooled connections close with the client instead of leaking sockets.
        http = getattr(self, "_http", None)
        if http is not None:
            http.close()

    # -- workloads --------------------------------------------------------------------

    def ensure(
        self, spec: WorkloadSpec | Mapping[str, Any], *, on_drift: OnDrift | str = OnDrift.RECONCILE
    ) -> WorkloadRef:
        """Create or update the workload by its slug (idempotent)."""
        body = spec.canonical() if isinstance(spec, WorkloadSpec) else dict(spec)
        slug = body.get("slug")
        if not isinstance(slug, str) or not slug:
            raise ValueError("the spec has no slug")
        data = self._call(
            "PUT",
            self._workload_path(slug),
            json=body,
            params={"on_drift": OnDrift(on_drift).value},
        )
        return _ref(data)

    def update(
        self,
        slug: str,
        changes: Mapping[str, Any],
        *,
        on_drift: OnDrift | str = OnDrift.RECONCILE,
    ) -> WorkloadRef:
        """Change part of a workload: ``changes`` is a JSON merge patch on its stored spec
        (nested objects merge, ``None`` removes a key, lists replace), validated like
        ``ensure``. ``client.update("bot", {"execution_policy_config": {"replicas": 2}})``
        """
        data = self._call(
            "PATCH",
            self._workload_path(slug),
            content=json.dumps(dict(changes)),
            headers={"Content-Type": "application/merge-patch+json"},
            params={"on_drift": OnDrift(on_drift).value},
        )
        return _ref(data)

    def get(self, slug: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("GET", self._workload_path(slug))
        return found

    def list(self, *, labels: str | None = None) -> builtins.list[dict[str, Any]]:
        """The project's workloads; ``labels`` keeps those matching a selector
        (``"team=search,tier!=batch"``, see :mod:`autoscaler.labels`)."""
        params = {} if labels is None else {"label_selector": labels}
        items: builtins.list[dict[str, Any]] = self._call(
            "GET", f"/v1/projects/{self.project}/workloads", params=params
        )["items"]
        return items

    def delete(self, slug: str) -> dict[str, Any]:
        deleted: dict[str, Any] = self._call("DELETE", self._workload_path(slug))
        return deleted

    def replicas(self, slug: str) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = self._call(
            "GET", self._workload_path(slug) + "/replicas"
        )["items"]
        return items

    def status(self, slug: str) -> WorkloadStatus:
        """The workload's desired and actual phase, and each replica's."""
        status = self.get(slug)["status"]
        return WorkloadStatus(
            desired_phase=status["desired_phase"],
            actual_phase=status["actual_phase"],
            desired=status["desired"],
            ready=status["ready"],
            endpoint=status["endpoint"],
            last_error=status["last_error"],
            replicas=tuple(
                ReplicaStatus(
                    launch_id=r["launch_id"],
                    desired_phase=r["desired_phase"],
                    actual_phase=r["actual_phase"],
                    command=r.get("command"),
                )
                for r in self.replicas(slug)
            ),
        )

    def signals(self, slug: str) -> dict[str, Any]:
        """What the gateway and the engines last measured for the workload."""
        found: dict[str, Any] = self._call("GET", self._workload_path(slug) + "/signals")
        return found

    def decisions(self, slug: str, *, limit: int = 20) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = self._call(
            "GET", self._workload_path(slug) + "/decisions", params={"limit": limit}
        )["items"]
        return items

    # -- keys and tokens ----------------------------------------------------------------

    def create_key(self, slug: str, *, name: str = "") -> CreatedSecret:
        """A data key (``ik_live_…``) for the gateway, scoped to this workload."""
        return _secret(self._call("POST", self._workload_path(slug) + "/keys", json={"name": name}))

    def list_keys(self, slug: str) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = self._call(
            "GET", self._workload_path(slug) + "/keys"
        )["items"]
        return items

    def revoke_key(self, slug: str, key_id: str) -> dict[str, Any]:
        revoked: dict[str, Any] = self._call(
            "DELETE", self._workload_path(slug) + f"/keys/{key_id}"
        )
        return revoked

    def create_project_token(self, *, name: str = "") -> CreatedSecret:
        """A control token for this project (needs an admin token)."""
        return _secret(
            self._call("POST", f"/v1/projects/{self.project}/tokens", json={"name": name})
        )

    def create_secret(self, name: str, value: str) -> dict[str, Any]:
        """Store ``value`` as the project's secret ``name`` (a workload refers to it as
        ``hf_token_secret``); the answer names it and never holds the value."""
        created: dict[str, Any] = self._call(
            "POST", f"/v1/projects/{self.project}/secrets", json={"name": name, "value": value}
        )
        return created

    def replace_secret(self, name: str, value: str) -> dict[str, Any]:
        """Replace the value of the project's secret ``name``, also while workloads use it
        (a rotated token; replicas get it at their next boot); the answer names it and
        never holds the value. ``secret_not_found`` (404) when there is none."""
        replaced: dict[str, Any] = self._call(
            "PUT", f"/v1/projects/{self.project}/secrets/{name}", json={"value": value}
        )
        return replaced

    def list_secrets(self) -> builtins.list[dict[str, Any]]:
        """The project's secrets: ``name`` and ``created_at`` each, never values."""
        items: builtins.list[dict[str, Any]] = self._call(
            "GET", f"/v1/projects/{self.project}/secrets"
        )["items"]
        return items

    def delete_secret(self, name: str) -> dict[str, Any]:
        """Delete a secret; refused (``secret_in_use``) while a workload refers to it."""
        deleted: dict[str, Any] = self._call(
            "DELETE", f"/v1/projects/{self.project}/secrets/{name}"
        )
        return deleted

    # -- plumbing -----------------------------------------------------------------------

    def _workload_path(self, slug: str) -> str:
        return f"/v1/projects/{self.project}/workloads/{slug}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        @retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self._retries),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
        )
        def attempt() -> Any:
            response = self._http.request(method, path, **kwargs)
            if response.is_error:
                raise _api_error(response)
            return response.json()

        return attempt()


def _ref(data: Mapping[str, Any]) -> WorkloadRef:
    return WorkloadRef(
        project_slug=data["project"],
        workload_slug=data["workload"]["slug"],
        generation=data["generation"],
        action=data["action"],
        diff=data["diff"],
        warnings=data["warnings"],
    )


def _secret(data: Mapping[str, Any]) -> CreatedSecret:
    return CreatedSecret(
        id=data["id"], secret=data["secret"], prefix=data["prefix"], name=data["name"]
    )


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error["code"], error["message"], error["details"])
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:500] or "no body")


# The data plane's client lives beside this one; ``from autoscaler.sdk import DataClient``.
from autoscaler.data_client import DataClient, Endpoint, GatewayError  # noqa: E402

__all__ = [
    "ApiError",
    "ConfigError",
    "CreatedSecret",
    "DataClient",
    "Endpoint",
    "GatewayError",
    "ManagementClient",
    "ReplicaStatus",
    "WorkloadRef",
    "WorkloadStatus",
]
