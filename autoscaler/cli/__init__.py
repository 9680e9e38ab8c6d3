"""The ``autoscaler`` command: one click group, one module per family of subcommands.

Each module in ``COMMAND_MODULES`` exposes ``register(group)``. The modules import their
heavy dependencies inside the command functions, so ``autoscaler --help`` stays fast and
a client command never loads the server stack.
"""

from __future__ import annotations

import importlib

import click

COMMAND_MODULES: tuple[str, ...] = (
    "autoscaler.cli.serve",
    "autoscaler.cli.workloads",
    "autoscaler.cli.catalog",
    "autoscaler.cli.engine_sim",
    "autoscaler.cli.agent",
    "autoscaler.cli.controller",
    "autoscaler.cli.simulate",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpu-autoscaler")
def main() -> None:
    """GPU inference autoscaler: declare workloads, get scaled, routed endpoints."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(main)


_register_all()
