"""The controller and the control plane.

``spec`` is the contract users write; ``store`` keeps state; ``decide`` holds the pure
decisions and ``reconcile`` the loops that carry them out; ``api`` is the management
HTTP API, ``sdk`` its Python client and ``cli`` the ``autoscaler`` command.

The names a user's script needs are importable from the package itself::

    from autoscaler import ManagementClient, DataClient, WorkloadSpec, Backend, ExecutionPolicy
    from autoscaler import LaunchClient  # Scale Launch's endpoint calls

They load on first use, so the processes that import only ``autoscaler.store`` (the
gateway) do not load the clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ManagementClient": "autoscaler.sdk",
    "DataClient": "autoscaler.sdk",
    "LaunchClient": "autoscaler.launch_client",
    "ApiError": "autoscaler.sdk",
    "GatewayError": "autoscaler.sdk",
    "WorkloadRef": "autoscaler.sdk",
    "WorkloadSpec": "autoscaler.spec",
    "Backend": "autoscaler.spec",
    "TaskType": "autoscaler.spec",
    "EndpointType": "autoscaler.spec",
    "ExecutionPolicy": "autoscaler.spec",
    "OnDrift": "autoscaler.spec",
}

__all__ = [
    "ApiError",
    "Backend",
    "DataClient",
    "EndpointType",
    "ExecutionPolicy",
    "GatewayError",
    "LaunchClient",
    "ManagementClient",
    "OnDrift",
    "TaskType",
    "WorkloadRef",
    "WorkloadSpec",
    "__version__",
]

if TYPE_CHECKING:
    from autoscaler.launch_client import LaunchClient
    from autoscaler.sdk import ApiError, DataClient, GatewayError, ManagementClient, WorkloadRef
    from autoscaler.spec import (
        Backend,
        EndpointType,
        ExecutionPolicy,
        OnDrift,
        TaskType,
        WorkloadSpec,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoscaler' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
