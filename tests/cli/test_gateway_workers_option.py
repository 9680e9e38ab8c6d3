"""``--gateway-workers`` / ``--workers`` and ``gateway_workers``: a count of at least 1 or
``auto``; anything else is refused before anything starts, naming what is allowed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from autoscaler.cli import main
from autoscaler.config import ConfigError, parse_config


@pytest.mark.parametrize(
    ("command", "flag"), [("run", "--gateway-workers"), ("gateway", "--workers")]
)
@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_worker_count_that_is_not_a_count_or_auto_is_refused(
    command: str, flag: str, value: str
) -> None:
    args = [command, flag, value, "--db", "sqlite+aiosqlite:///unused.db"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"{value!r}: expected a count of at least 1, or 'auto'" in result.output


def test_the_config_takes_a_count_or_auto_and_refuses_zero() -> None:
    assert parse_config({"cluster_id": "c"}, source="t").gateway_workers == 1
    assert (
        parse_config({"cluster_id": "c", "gateway_workers": "auto"}, source="t").gateway_workers
        == "auto"
    )
    assert parse_config({"cluster_id": "c", "gateway_workers": 4}, source="t").gateway_workers == 4
    with pytest.raises(ConfigError, match="gateway_workers"):
        parse_config({"cluster_id": "c", "gateway_workers": 0}, source="t")
