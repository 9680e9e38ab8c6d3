"""Admission: the checks a spec passes before it is stored, beyond its own schema.

``WorkloadSpec`` checks what it can on its own (shapes, names, catalog GPU names, CUDA
pins). What needs the engines table, the sizing model or the registered workers is
checked here, by running the very functions the controller runs on the stored spec
(:func:`autoscaler.reconcile.provisioner.workload_boot`, the sizing estimate and
:func:`autoscaler.decide.inputs.model_size`), so a spec the API accepts is one the
controller can launch, and the controller reports the same words when a stored spec
stops passing (a worker deregistered, a catalog change).

Each problem names the field path, what is wrong and the value, like the schema's own
errors.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from autoscaler.decide.inputs import model_size
from autoscaler.reconcile.provisioner import workload_boot
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from catalog.sizing import command_batch_limits, command_line_flags, estimate_model_memory
from catalog.snapshot import load_bundled
from providers.engines import CommandError, parallel_size

PARALLEL_FLAGS = (
    "tensor-parallel-size",
    "pipeline-parallel-size",
    "data-parallel-size",
    "tp",
    "tp-size",
    "pp-size",
    "dp",
    "dp-size",
)
"""Engine flags that split a replica over GPUs or copies: whole numbers >= 1."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a spec cannot run: the field path, why, and the value given."""

    path: str
    message: str
    value: Any

    def as_detail(self) -> dict[str, Any]:
        return {"path": self.path, "message": self.message, "value": self.value}


def runnable_problems(spec: WorkloadSpec) -> list[Problem]:
    """Why the controller could not boot a replica of ``spec`` (empty: it can)."""
    problems: list[Problem] = []
    try:
        workload_boot(spec)
    except CommandError as exc:
        problems.append(Problem("command", str(exc), spec.command))
    except ValueError as exc:
        path = "vllm_version" if "vllm_version" in str(exc) else "command"
        problems.append(Problem(path, str(exc), getattr(spec, path)))
    if problems:
        return problems
    problems += _parallel_problems(spec.engine_command)
    problems += _parallel_machine_problems(spec)
    try:
        estimate_model_memory(spec.model, spec.engine_command, hint_gib=spec.model_memory_gib)
        model_size(spec)
        command_batch_limits(command_line_flags(spec.engine_command))  # what vLLM refuses to start
    except ValueError as exc:
        problems.append(Problem("command", str(exc), spec.command))
    return problems


def _parallel_problems(command: str | None) -> list[Problem]:
    problems = []
    for flag, value in command_line_flags(command).items():
        if flag in PARALLEL_FLAGS and not (value.isdigit() and int(value) >= 1):
            problems.append(
                Problem(
                    "command",
                    f"--{flag} must be a whole number of at least 1, got {value!r}",
                    command,
                )
            )
    return problems


def _parallel_machine_problems(spec: WorkloadSpec) -> list[Problem]:
    """A split over N GPUs (tensor x pipeline parallel in the user's command) needs a
    machine with N GPUs of the pool; refused when the catalog sells none."""
    try:
        size = parallel_size(backend=spec.backend.value, command=spec.engine_command)
    except CommandError:
        return []  # reported by _parallel_problems
    if size is None or size <= 1 or worker_ids_of(spec):
        return []
    policy = spec.execution_policy_config
    pool = policy.cloud_pool if isinstance(policy, AutoscalingPolicy) else None
    gpus = set(pool.gpu_pool) if pool else None
    shapes: dict[str, set[int]] = {}
    for offer in load_bundled().offers:
        if gpus is None or offer.gpu in gpus:
            shapes.setdefault(offer.gpu, set()).add(offer.gpu_count)
    if any(size in counts for counts in shapes.values()):
        return []
    sold = "; ".join(
        f"{gpu}: {', '.join(str(c) for c in sorted(counts))}"
        for gpu, counts in sorted(shapes.items())
    )
    return [
        Problem(
            "command",
            f"the command splits a replica over {size} GPUs (tensor x pipeline parallel), "
            f"but no machine with {size} GPUs of the pool is sold; GPUs per machine: "
            f"{sold or 'none'}",
            spec.command,
        )
    ]


def worker_ids_of(spec: WorkloadSpec) -> list[str]:
    """The private workers ``spec`` names (``worker_id`` and the policy's pool)."""
    ids = [spec.worker_id] if spec.worker_id else []
    policy = spec.execution_policy_config
    if isinstance(policy, AutoscalingPolicy):
        ids += policy.private_worker_ids
    return list(dict.fromkeys(ids))


def worker_problems(spec: WorkloadSpec, *, registered: Collection[str]) -> list[Problem]:
    """Workers ``spec`` names that are not registered in its project."""
    problems = []
    policy = spec.execution_policy_config
    pool = policy.private_worker_ids if isinstance(policy, AutoscalingPolicy) else []
    for worker in worker_ids_of(spec):
        if worker in registered:
            continue
        path = (
            "worker_id"
            if worker == spec.worker_id
            else (f"execution_policy_config.workers.private_worker_ids.{pool.index(worker)}")
        )
        known = ", ".join(sorted(registered)) or "none yet (autoscaler workers register)"
        problems.append(
            Problem(
                path,
                f"worker {worker!r} is not registered in this project; registered: {known}",
                worker,
            )
        )
    return problems


def secret_problems(spec: WorkloadSpec, *, stored: Collection[str]) -> list[Problem]:
    """The secret ``spec`` refers to, when it is not stored in its project."""
    name = spec.hf_token_secret
    if name is None or name in stored:
        return []
    known = ", ".join(sorted(stored)) or "none yet (autoscaler secrets create NAME --from-file F)"
    return [
        Problem(
            "hf_token_secret",
            f"secret {name!r} is not stored in this project; stored: {known}",
            name,
        )
    ]
