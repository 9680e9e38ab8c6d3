"""The startup script an instance runs at first boot (EC2 user data, GCE startup-script).

The script (``bootstrap.sh``, rendered here with this launch's settings) checks the NVIDIA
driver against the CUDA pin, fetches the replica's secrets from the controller, pulls the
engine image, starts the engine container with the GPUs, host IPC, a model cache volume
and a restart policy, waits for the engine's health path, and reports to the controller.

The restart policy (``unless-stopped``) is what brings a warm pool's stopped machine back
into service: EC2 runs user data at first boot only, so on a start Docker alone starts
the container again, from the image and the weights already on the disk, and the
controller's health check makes the replica ready. (GCE runs the startup script at every
boot; it replaces the container, again from the disk's image and cache.)

The callback contract (the controller serves it; ``{url}`` is :attr:`BootCallback.url`,
every call carries ``Authorization: Bearer {token}``):

* ``GET {url}/secrets`` answers ``NAME=VALUE`` lines (Docker env-file format) with the
  values of the BootSpec's ``secret_env_names`` (the engine key, a Hugging Face token);
* ``POST {url}/status`` takes ``{"launch_id": ..., "state": "ready" | "failed" |
  "interrupted", "reason": ...}``.

Spot instances also watch their provider's interruption notice from the first step on:
EC2's instance metadata ``spot/instance-action`` (IMDSv2, every ``poll_seconds``) or
GCE's ``instance/preempted`` metadata. The first notice is reported as ``interrupted``
with the notice in the reason, from a watcher that outlives the script (its pid in
``$STATE_DIR/spot-notice-<launch id>.pid``), so the controller drains the replica and
starts its replacement while the machine still serves: EC2 gives two minutes, GCE 30
seconds. ``AUTOSCALER_EC2_METADATA_URL`` / ``AUTOSCALER_GCE_METADATA_URL`` in the
environment replace the metadata addresses (a test's fake metadata server).

Secret values are never rendered into the script: user data is readable by anyone who
may describe the instance, and the script text travels through logs and reprs. The
callback token is per instance and grants only these two calls for that instance.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from catalog.cuda import cuda_version
from providers.base import BootSpec
from providers.engines import engine_for

__all__ = [
    "DEFAULT_STATE_DIR",
    "RAY_PORT",
    "BootCallback",
    "GroupMode",
    "GroupRole",
    "SpotNotice",
    "group_mode_for",
    "min_driver_for",
    "render_startup_script",
    "startup_script_for",
    "with_startup_script",
]

DEFAULT_STATE_DIR = "/var/lib/autoscaler"

RAY_PORT = 6379
"""The port of a replica group's Ray head on its leader."""

GroupRole = Literal["leader", "worker"]
"""A replica group member's part (``None``: a machine of its own)."""

GroupMode = Literal["ray", "each-member"]
"""How a replica group runs its engine: ``ray`` (vLLM: the workers join the leader's Ray
cluster and the leader alone runs the engine over it) or ``each-member`` (SGLang: every
member runs the engine with its node rank and the leader's address filled in)."""

SpotNotice = Literal["ec2", "gce"]
"""Whose interruption notice a spot instance watches (``None``: not spot, no watcher)."""


@dataclass(frozen=True, slots=True)
class BootCallback:
    """Where the instance reports and fetches its secrets, and the token it proves itself
    with (kept out of the repr)."""

    url: str
    token: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"BootCallback.url must be an http(s) URL, got {self.url!r}")
        if not self.token:
            raise ValueError("BootCallback.token must not be empty")
        object.__setattr__(self, "url", self.url.rstrip("/"))


def min_driver_for(cuda: str | None) -> str:
    """The oldest NVIDIA driver that runs CUDA ``cuda`` ("" when nothing is pinned)."""
    if cuda is None:
        return ""
    return ".".join(str(part) for part in cuda_version(cuda).min_driver)


def render_startup_script(
    *,
    boot: BootSpec,
    launch_id: str,
    callback: BootCallback,
    warmup: Sequence[str] = (),
    cache_mount: str = "/root/.cache/huggingface",
    state_dir: str = DEFAULT_STATE_DIR,
    health_timeout_seconds: int = 1800,
    poll_seconds: int = 5,
    spot_notice: SpotNotice | None = None,
    group_role: GroupRole | None = None,
    group_size: int = 1,
    group_mode: GroupMode = "ray",
) -> str:
    """The bash script that boots ``boot`` on a fresh GPU instance and reports back.

    ``group_role`` makes the instance a member of a replica group of ``group_size``, on
    the host's network. With ``group_mode`` ``ray``, the leader runs a Ray head and, once
    every member has joined, the engine over the Ray cluster; a worker polls ``GET
    {callback}/group`` for the leader's address, joins its Ray cluster and serves nothing
    itself. With ``each-member``, every member polls that address, puts it in place of
    ``${GROUP_LEADER_ADDRESS}`` in its engine command and runs the engine; the leader's
    answers its health path once every member has joined, the workers serve nothing."""
    settings: Mapping[str, str | int] = {
        "LAUNCH_ID": launch_id,
        "IMAGE": boot.image,
        "ENGINE_PORT": boot.port,
        "HEALTH_PATH": boot.health_path,
        "CUDA_VERSION": boot.cuda_version or "",
        "MIN_DRIVER": min_driver_for(boot.cuda_version),
        "CALLBACK_URL": callback.url,
        "CALLBACK_TOKEN": callback.token,
        "CONTAINER_NAME": f"engine-{launch_id}",
        "STATE_DIR": state_dir,
        "CACHE_DIR": f"{state_dir}/model-cache",
        "CACHE_MOUNT": cache_mount,
        "HEALTH_TIMEOUT_SECONDS": health_timeout_seconds,
        "POLL_SECONDS": poll_seconds,
        "SPOT_NOTICE": spot_notice or "",
        "GROUP_ROLE": group_role or "",
        "GROUP_SIZE": group_size,
        "GROUP_MODE": group_mode,
        "RAY_PORT": RAY_PORT,
    }
    arrays: Mapping[str, Sequence[str]] = {
        "ENGINE_ARGV": boot.command,
        "ENGINE_ENV": [f"{key}={value}" for key, value in sorted(boot.env.items())],
        "SECRET_NAMES": boot.secret_env_names,
        "WARMUP_ARGV": warmup,
    }
    lines = ["#!/usr/bin/env bash", f"# autoscaler startup script for {launch_id}"]
    lines += [f"{name}={shlex.quote(str(value))}" for name, value in settings.items()]
    # Secret references such as '${ENGINE_API_KEY}' stay literal; the body expands them.
    lines.append("# shellcheck disable=SC2016")
    lines += [
        f"{name}=({' '.join(shlex.quote(v) for v in values)})" for name, values in arrays.items()
    ]
    return "\n".join(lines) + "\n\n" + _body()


def startup_script_for(
    *,
    boot: BootSpec,
    backend: str,
    launch_id: str,
    callback: BootCallback,
    spot_notice: SpotNotice | None = None,
    group_role: GroupRole | None = None,
    group_size: int = 1,
) -> str:
    """The startup script for a BootSpec made by :func:`providers.engines.boot_spec`."""
    engine = engine_for(backend)
    warmup = [part.replace("{model}", boot.model_id) for part in engine.warmup]
    return render_startup_script(
        boot=boot,
        launch_id=launch_id,
        callback=callback,
        warmup=warmup,
        cache_mount=engine.cache_dir,
        spot_notice=spot_notice,
        group_role=group_role,
        group_size=group_size,
        group_mode=group_mode_for(backend),
    )


def group_mode_for(backend: str) -> GroupMode:
    """How ``backend`` spans a replica group's machines (SGLang runs on every member)."""
    return "each-member" if backend == "sglang" else "ray"


def with_startup_script(
    boot: BootSpec,
    *,
    backend: str,
    launch_id: str,
    callback: BootCallback,
    spot_notice: SpotNotice | None = None,
    group_role: GroupRole | None = None,
    group_size: int = 1,
) -> BootSpec:
    """``boot`` with its startup script rendered for this launch."""
    script = startup_script_for(
        boot=boot,
        backend=backend,
        launch_id=launch_id,
        callback=callback,
        spot_notice=spot_notice,
        group_role=group_role,
        group_size=group_size,
    )
    return dataclasses.replace(boot, startup_script=script)


def _body() -> str:
    return resources.files("providers").joinpath("bootstrap.sh").read_text()
