"""The simulated cloud as a provider for ``autoscaler run``: watch large models placed
and started on a laptop.

It sells the catalog's AWS and GCP offers at their catalog prices, relabeled as provider
``simulated`` (zone, instance type, GPUs and prices unchanged), so placement, the budget
and the parallel flags work exactly as for the real clouds while nothing is bought. Each
machine is an ``engine-sim`` process on this machine (through
:class:`providers.local.LocalProvider`, so a restarted service still finds, lists and
terminates them) simulating the offer's GPUs: its ``/health`` answers only after a boot
time drawn from the simulator's own distribution (lognormal, median 180 s, as in
``autoscaler simulate``) multiplied by ``boot_time_scale``, so a demo waits seconds
rather than minutes. engine-sim refuses to serve a model the machine's GPUs cannot hold,
as a real engine would fail to load it.

What it does not simulate here: stock-outs, quotas and spot interruptions (those are
``autoscaler simulate``'s, on its own clock).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from catalog.model import Offer, ProviderName
from providers.base import BootSpec
from providers.local import EngineSimLauncher, LaunchCommand
from providers.simulated import START_TIME, BootTimeDistribution, LogNormalBootTime

__all__ = ["SimulatedBootLauncher", "simulated_offers", "spanned_gpus"]

SOLD_CLOUDS = (ProviderName.AWS, ProviderName.GCP)


def simulated_offers(
    offers: Iterable[Offer],
    *,
    clouds: Collection[str] = ("aws", "gcp"),
    regions: Collection[str] | None = None,
) -> tuple[Offer, ...]:
    """The catalog offers of ``clouds`` (in ``regions``, when given) as the simulated
    cloud sells them: the same offer under provider ``simulated``."""
    return tuple(
        dataclasses.replace(o, provider=ProviderName.SIMULATED)
        for o in offers
        if o.provider in SOLD_CLOUDS
        and o.provider.value in clouds
        and (regions is None or o.region in regions)
    )


_SPLIT_FLAGS = (
    ("--tensor-parallel-size", "-tp", "--tp", "--tp-size"),
    ("--pipeline-parallel-size", "-pp", "--pp", "--pp-size"),
)


def spanned_gpus(argv: Sequence[str]) -> int:
    """The GPUs an engine command line splits the model over: tensor parallel times
    pipeline parallel (1 when it sets neither)."""
    total = 1
    for names in _SPLIT_FLAGS:
        for i, arg in enumerate(argv[:-1]):
            if arg in names and argv[i + 1].isdigit():
                total *= int(argv[i + 1])
                break
    return total


@dataclass(slots=True)
class SimulatedBootLauncher:
    """engine-sim for the offer's GPUs, healthy after a drawn boot time.

    ``boot_time`` is the simulator's distribution (seconds a cloud machine takes to
    boot); each draw is multiplied by ``boot_time_scale``. Draws come from one generator
    seeded with ``seed``, in launch order. A machine started again after a stop boots in
    a draw of ``start_time`` instead (the simulator's, :data:`providers.simulated.START_TIME`:
    its disk already holds the image and the weights), times the same scale.
    """

    sim: EngineSimLauncher
    boot_time: BootTimeDistribution = field(default_factory=LogNormalBootTime)
    start_time: BootTimeDistribution = START_TIME
    boot_time_scale: float = 0.1
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.boot_time_scale > 0:
            raise ValueError(f"boot_time_scale must be > 0, got {self.boot_time_scale}")
        self._rng = random.Random(self.seed)

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        return self._booting(
            boot,
            host=host,
            port=port,
            offer=offer,
            secrets=secrets,
            after=self.boot_time,
            what="boot",
        )

    def restart_command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        return self._booting(
            boot,
            host=host,
            port=port,
            offer=offer,
            secrets=secrets,
            after=self.start_time,
            what="start",
        )

    def _booting(
        self,
        boot: BootSpec,
        *,
        host: str,
        port: int,
        offer: Offer,
        secrets: Mapping[str, str],
        after: BootTimeDistribution,
        what: str,
    ) -> LaunchCommand:
        seconds = after.sample(self._rng) * self.boot_time_scale
        engine = dataclasses.replace(self.sim, startup_delay=round(seconds, 3), gpu=None)
        # A replica group's leader serves with the GPUs of every member (its command's
        # tensor x pipeline split); each machine is simulated by one process all the same.
        gpus = max(offer.gpu_count, spanned_gpus(boot.command))
        served = dataclasses.replace(offer, gpu_count=gpus)
        command = engine.command(boot, host=host, port=port, offer=served, secrets=secrets)
        reason = (
            f"the simulated cloud: engine-sim on {gpus} x {offer.gpu}, "
            f"booting in {seconds:.1f}s (a drawn cloud {what} time x {self.boot_time_scale:g})"
        )
        return dataclasses.replace(command, engine_reason=reason)
