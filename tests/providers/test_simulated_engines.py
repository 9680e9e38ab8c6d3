"""The simulated cloud as a configured provider: catalog offers at catalog prices under
provider ``simulated``, engine-sim machines that answer after a drawn, scaled boot time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autoscaler.config import ConfigError, load_config, parse_config
from autoscaler.controller import offers_for
from catalog.model import ProviderName
from catalog.snapshot import load_bundled
from providers.base import BootSpec
from providers.local import EngineSimLauncher
from providers.simulated import FixedBootTime
from providers.simulated_engines import SimulatedBootLauncher, simulated_offers, spanned_gpus

EXAMPLE = Path(__file__).parents[2] / "examples" / "config-simulated-cloud.yaml"
BOOT = BootSpec(
    image="vllm/vllm-openai:v0.11.0",
    command=("vllm", "serve", "m"),
    port=8000,
    health_path="/health",
    model_id="meta-llama/Llama-3.1-70B-Instruct",
)


def test_the_example_config_sells_the_catalog_at_catalog_prices() -> None:
    config = load_config(EXAMPLE)
    assert config.providers.simulated is not None and config.providers.local is None
    catalog = load_bundled()
    sold = offers_for(config, catalog)
    assert sold and {o.provider for o in sold} == {ProviderName.SIMULATED}
    real = {o.key.split("/", 1)[1]: o for o in catalog.offers}
    assert len(sold) == len(real)
    for offer in sold:
        assert offer.key.startswith("simulated/")
        original = real[offer.key.split("/", 1)[1]]
        assert offer.on_demand_usd_per_hour == original.on_demand_usd_per_hour
        assert offer.spot_usd_per_hour == original.spot_usd_per_hour
        assert (offer.gpu, offer.gpu_count) == (original.gpu, original.gpu_count)
    assert any(o.gpu_count == 8 and "H100" in o.gpu for o in sold)


def test_clouds_and_regions_narrow_what_is_sold() -> None:
    catalog = load_bundled()
    aws = simulated_offers(catalog.offers, clouds=["aws"])
    assert aws and all(o.key.startswith("simulated/") for o in aws)
    assert {o.region for o in aws} <= {
        o.region for o in catalog.offers if o.provider.value == "aws"
    }
    one = simulated_offers(catalog.offers, clouds=["aws", "gcp"], regions={"us-east-1"})
    assert one and {o.region for o in one} == {"us-east-1"}


@pytest.mark.parametrize(
    ("simulated", "names"),
    [
        ({"boot_time_scale": 0}, "providers.simulated.boot_time_scale"),
        ({"clouds": ["azure"]}, "providers.simulated.clouds.0"),
        ({"clouds": []}, "providers.simulated.clouds"),
        ({"boot_seconds": 3}, "providers.simulated.boot_seconds"),
    ],
)
def test_a_bad_simulated_setting_names_the_key(simulated: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_config({"providers": {"simulated": simulated}}, source="c.yaml")


def test_a_machine_answers_after_the_drawn_boot_time_scaled() -> None:
    launcher = SimulatedBootLauncher(
        sim=EngineSimLauncher(time_scale=5.0),
        boot_time=FixedBootTime(200.0),
        boot_time_scale=0.05,
    )
    [offer] = [
        o
        for o in simulated_offers(load_bundled().offers, clouds=["aws"])
        if o.instance_type == "p5.48xlarge" and o.zone == "us-east-1a"
    ]
    command = launcher.command(
        BOOT, host="127.0.0.1", port=9999, offer=offer, secrets={"ENGINE_API_KEY": "k-123"}
    )
    argv = list(command.argv)
    assert argv[argv.index("--startup-delay") + 1] == "10.0"
    assert argv[argv.index("--gpu-count") + 1] == "8"
    assert argv[argv.index("--gpu") + 1] == offer.gpu
    assert argv[argv.index("--time-scale") + 1] == "5.0"
    assert "k-123" not in argv and command.env["ENGINE_SIM_API_KEY"] == "k-123"
    assert command.engine == "engine-sim"
    assert command.engine_reason is not None and "booting in 10.0s" in command.engine_reason


def test_boot_times_are_reproducible_for_a_seed() -> None:
    def delays(seed: int) -> list[str]:
        launcher = SimulatedBootLauncher(sim=EngineSimLauncher(), seed=seed)
        offer = simulated_offers(load_bundled().offers)[0]
        found = []
        for _ in range(3):
            argv = list(launcher.command(BOOT, host="h", port=1, offer=offer, secrets={}).argv)
            found.append(argv[argv.index("--startup-delay") + 1])
        return found

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)
    assert len(set(delays(7))) == 3


def test_a_group_leader_serves_with_the_gpus_of_every_member() -> None:
    argv = ("vllm", "serve", "m", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2")
    assert spanned_gpus(argv) == 16
    assert spanned_gpus(("python3", "-m", "sglang.launch_server", "--tp", "16")) == 16
    assert spanned_gpus(("vllm", "serve", "m")) == 1
    leader = dataclasses.replace(BOOT, command=argv)
    launcher = SimulatedBootLauncher(sim=EngineSimLauncher(), boot_time=FixedBootTime(1.0))
    offer = next(o for o in simulated_offers(load_bundled().offers) if o.gpu_count == 8)
    command = launcher.command(leader, host="h", port=1, offer=offer, secrets={})
    assert command.argv[list(command.argv).index("--gpu-count") + 1] == "16"


def test_a_stopped_machine_started_again_boots_in_a_start_time_draw() -> None:
    launcher = SimulatedBootLauncher(
        sim=EngineSimLauncher(),
        boot_time=FixedBootTime(200.0),
        start_time=FixedBootTime(60.0),
        boot_time_scale=0.05,
    )
    offer = simulated_offers(load_bundled().offers)[0]

    fresh = launcher.command(BOOT, host="h", port=1, offer=offer, secrets={})
    again = launcher.restart_command(BOOT, host="h", port=1, offer=offer, secrets={})

    assert fresh.argv[list(fresh.argv).index("--startup-delay") + 1] == "10.0"
    assert again.argv[list(again.argv).index("--startup-delay") + 1] == "3.0"
    assert again.engine_reason is not None and "cloud start time" in again.engine_reason
