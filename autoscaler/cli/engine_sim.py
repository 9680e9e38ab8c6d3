"""``autoscaler engine-sim``: the simulated engine, the same command as ``python -m
providers.engine_sim``."""

from __future__ import annotations

import click

from providers.engine_sim.cli import command


def register(group: click.Group) -> None:
    """Add the ``engine-sim`` command to ``group``."""
    group.add_command(command, name="engine-sim")
