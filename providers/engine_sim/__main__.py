"""``python -m providers.engine_sim``: the same command as ``autoscaler engine-sim``."""

from providers.engine_sim.cli import command

if __name__ == "__main__":
    command(prog_name="python -m providers.engine_sim")
