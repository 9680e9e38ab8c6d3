"""The shipped Dockerfile and systemd unit start commands this checkout actually has."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest

from autoscaler.cli import main

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


def parses(argv: list[str], tmp_path: Path) -> click.Context:
    """Parse ``autoscaler ARGV`` as the CLI would, without running it."""
    argv = [str(tmp_path / "controller.yaml") if a.startswith("/etc/") else a for a in argv]
    (tmp_path / "controller.yaml").write_text("cluster_id: test\n")
    name, *rest = argv
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"autoscaler has no command {name!r}"
    return command.make_context(name, rest)


def test_systemd_unit_starts_a_real_command(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "autoscaler.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.+)$", unit, flags=re.MULTILINE)
    program, *argv = shlex.split(exec_start)
    assert program.endswith("/autoscaler")
    context = parses(argv, tmp_path)
    assert context.params["host"] == "0.0.0.0"
    assert context.params["config_path"] is not None


def test_dockerfile_copies_what_exists_and_runs_a_real_command(tmp_path: Path) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, flags=re.MULTILINE):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    [entrypoint] = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.MULTILINE)
    [cmd] = re.findall(r"^CMD (.+)$", dockerfile, flags=re.MULTILINE)
    assert json.loads(entrypoint) == ["autoscaler"]
    assert parses(json.loads(cmd), tmp_path).params["host"] == "0.0.0.0"


def test_a_misspelt_flag_would_be_caught(tmp_path: Path) -> None:
    with pytest.raises(click.UsageError):
        parses(["run", "--hots", "0.0.0.0"], tmp_path)
