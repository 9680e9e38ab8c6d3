"""Printing for the CLI: aligned tables for people, JSON or YAML for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
import yaml


def emit(data: Any, fmt: str) -> None:
    """Print ``data`` as ``json`` or ``yaml``."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str = "(none)"
) -> None:
    """Columns padded to their widest cell; ``empty`` when there are no rows."""
    if not rows:
        click.echo(empty)
        return
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    for line in (headers, *rows):
        cells = [str(c).ljust(w) for c, w in zip(line, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())
