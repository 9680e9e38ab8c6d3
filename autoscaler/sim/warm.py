"""The simulator's warm-pool assumptions: how long parking and resuming a replica take,
and what a parked replica costs, in one place, each with its source. The world
(``autoscaler.sim.world``) and the oracle (``autoscaler.sim.oracle``) read them from
here; ``docs/simulate.md`` ("Warm pools") states them. The figures themselves are the
project's shared models: the simulated cloud's stop and start (``providers.simulated``),
the disks' prices (``catalog.storage``) and the sleep-mode timings (``catalog.wake``).

Three start paths (``autoscaler.decide.warm``):

* **fresh**: the simulated cloud's boot draw (``CloudSettings.boot_median_s``, 180 s
  median, lognormal): buy, boot, pull the image, download and load the weights.
* **start** a stopped machine: the cloud's start draw, :data:`START_MEDIAN_S` (75 s,
  lognormal sigma :data:`START_SIGMA`): the machine's start (EC2: 5-17 s pending, 20-25 s
  until the OS answers; C. Percival, "EC2 boot time benchmarking", 2021) and the engine's
  load of the weights from its own disk (30-100 s for vLLM: the reload that sleep mode
  avoids; vLLM blog "Zero-Reload Model Switching with vLLM Sleep Mode", 2025-10).
  Stopping takes :data:`STOP_S`, billed as running. A start finds a stocked-out offer
  stocked out (a stopped machine is tied to its zone).
* **wake** a sleeping engine: :func:`wake_seconds`, one pass of the weights over the GPU's
  host link (level 1) or a read from the local disk and that pass (level 2): 0.1-6 s as
  vLLM's blog measured for level 1, against 30-100 s for a reload; llm-d's fast model
  actuation reports 4 s against 85 s for a cold pod. Falling asleep takes
  :func:`sleep_seconds`.

Prices: a sleeping replica keeps its machine and pays its full price. A stopped machine
pays its 200 GB boot disk only (:func:`stopped_usd_per_hour`): EBS gp3 at $0.08 per
GB-month for EC2 offers ($0.0219/h), pd-balanced at $0.10 for GCE ones ($0.0274/h). A
spot machine cannot be stopped (EC2: a one-time spot request's instance cannot be).
"""

from __future__ import annotations

from catalog import storage, wake
from catalog.model import Offer
from providers.simulated import START_TIME, SimulationConfig

START_MEDIAN_S = START_TIME.median_seconds
"""Median seconds from starting a stopped machine until its engine serves."""

START_SIGMA = START_TIME.sigma
"""Lognormal spread of a start (as the fresh boot's: p95 about 1.8x the median)."""

STOP_S = SimulationConfig().stop_seconds
"""Seconds from asking a machine to stop until it is stopped, billed as running."""


def stopped_usd_per_hour(offer: Offer) -> float:
    """What a stopped machine of ``offer`` costs an hour: its boot disk
    (``catalog.storage``, as the provisioner records it)."""
    return storage.stopped_usd_per_hour(offer)


def sleep_seconds(*, weights_bytes: float, offer: Offer, level: int) -> float:
    """How long the engine on ``offer`` takes to fall asleep (``catalog.wake``)."""
    return wake.sleep_seconds(
        weights_bytes=weights_bytes, gpu=offer.gpu, level=_level(level), gpu_count=offer.gpu_count
    )


def wake_seconds(*, weights_bytes: float, offer: Offer, level: int) -> float:
    """How long a sleeping engine on ``offer`` takes to serve again (``catalog.wake``)."""
    return wake.wake_seconds(
        weights_bytes=weights_bytes, gpu=offer.gpu, level=_level(level), gpu_count=offer.gpu_count
    )


def _level(level: int) -> wake.SleepLevel:
    if level == 1:
        return 1
    if level == 2:
        return 2
    raise ValueError(f"sleep level must be 1 or 2, got {level}")
