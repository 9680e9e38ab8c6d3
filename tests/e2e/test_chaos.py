"""``bench.chaos`` in small: a few trials of the real controller process SIGKILLed
against moto's EC2 server with provider faults injected, and the checker it relies on
shown to catch each kind of breach."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import (
    FLEET_CEILING,
    INVARIANTS,
    MOTO_AMI,
    SCENARIOS,
    Cloud,
    Observer,
    TrialResult,
    run_trials,
)
from providers.base import CLUSTER_TAG, LAUNCH_ID_TAG

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # four trials of several process starts each, on two cores
def test_controller_killed_under_faults_keeps_every_money_invariant(tmp_path: Path) -> None:
    report = run_trials(
        len(SCENARIOS),
        seed=7,
        kills=2,
        jobs=2,  # two at a time, each trial in a worker process with a world of its own
        scenarios=SCENARIOS,
        faults=("eventual", "lost", "timeout", "server_error"),
        workdir=tmp_path,
    )
    table = report.table()
    assert {(r.scenario, r.fault) for r in report.results} == {
        ("launch", "eventual"),
        ("scale_down", "lost"),
        ("replace", "timeout"),
        ("delete", "server_error"),
    }
    assert report.totals() == dict.fromkeys(INVARIANTS, 0), table
    assert sum(r.kills for r in report.results) >= 2 * len(SCENARIOS) - 1, table
    assert all(r.machines > 0 and r.observations > 0 for r in report.results), table
    assert all(r.settled >= 1 for r in report.results), table  # each bought and came up
    assert all(r.peak_usd_per_hour <= FLEET_CEILING for r in report.results), table


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    cloud = Cloud(seed=1)
    yield cloud
    cloud.stop()


def _ledger(path: Path, rows: list[tuple[str, str | None, bool, float]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE instances (launch_id TEXT, instance_id TEXT, "
            "terminated_confirmed_at TEXT, hourly_usd REAL)"
        )
        db.executemany(
            "INSERT INTO instances VALUES (?, ?, ?, ?)",
            [(a, b, "2026-01-01" if closed else None, usd) for a, b, closed, usd in rows],
        )


def _machine(cloud: Cloud, cluster: str, launch_id: str) -> str:
    answer = cloud.ec2.run_instances(
        ImageId=MOTO_AMI,
        InstanceType="g5.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": CLUSTER_TAG, "Value": cluster},
                    {"Key": LAUNCH_ID_TAG, "Value": launch_id},
                ],
            }
        ],
    )
    return str(answer["Instances"][0]["InstanceId"])


def _observe(cloud: Cloud, cluster: str, db: Path) -> TrialResult:
    result = TrialResult(scenario="check", fault="none")
    Observer(cloud=cloud, cluster=cluster, db_path=db, result=result, interval=1).observe()
    return result


def test_the_checker_sees_a_machine_the_ledger_never_heard_of(cloud: Cloud, tmp_path: Path) -> None:
    _ledger(tmp_path / "db", [("ln-known", None, False, 1.0)])
    _machine(cloud, "c-untracked", "ln-known")
    stray = _machine(cloud, "c-untracked", "ln-stray")
    result = _observe(cloud, "c-untracked", tmp_path / "db")
    assert result.breaches["untracked"] == {stray}
    assert result.count("false_terminations") == result.count("duplicated") == 0


def test_the_checker_sees_a_running_machine_marked_terminated(cloud: Cloud, tmp_path: Path) -> None:
    machine = _machine(cloud, "c-false", "ln-a")
    _ledger(tmp_path / "db", [("ln-a", machine, True, 1.0)])
    assert _observe(cloud, "c-false", tmp_path / "db").breaches["false_terminations"] == {machine}


def test_the_checker_sees_duplicates_and_overruns(cloud: Cloud, tmp_path: Path) -> None:
    one = _machine(cloud, "c-dup", "ln-a")
    _machine(cloud, "c-dup", "ln-a")
    _machine(cloud, "c-dup", "ln-b")
    _machine(cloud, "c-dup", "ln-c")
    _ledger(
        tmp_path / "db",
        [("ln-a", one, False, 1.006), ("ln-b", None, False, 1.006), ("ln-c", None, False, 1.006)],
    )
    result = _observe(cloud, "c-dup", tmp_path / "db")
    assert result.count("duplicated") == 1
    assert result.count("ceiling_overruns") == 1  # four machines at $1.006/h: $4.02 > $3.10
    assert result.peak_usd_per_hour > FLEET_CEILING
