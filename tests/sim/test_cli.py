"""``autoscaler simulate`` end to end: a tiny trace, a JSON report and a PNG timeline."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from autoscaler.cli import main
from tests.sim.conftest import constant, write_trace


def test_simulate_writes_report_and_plot(tmp_path: Path, workload_file: Path) -> None:
    trace = write_trace(tmp_path / "trace.csv", constant(rps=2.0, seconds=240))
    report, plot = tmp_path / "report.json", tmp_path / "timeline.png"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--trace", str(trace),
            "--workload", str(workload_file),
            "--rate-scale", "2",
            "--rate-mode", "compress",
            "--ttft-slo", "0.8",
            "--seed", "3",
            "--report", str(report),
            "--plot", str(plot),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "requests served     480 of 480" in result.output
    assert "time compressed 2x" in result.output
    data = json.loads(report.read_text())
    assert data["served"] == 480
    assert data["ttft_target_s"] == 0.8
    assert data["slo_attainment"] == 1.0
    assert data["oracle"]["cost_usd"] <= data["cost_usd"]
    assert data["timeline"] and data["events"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_names_a_bad_trace(tmp_path: Path, workload_file: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("when,in,out\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["simulate", "--trace", str(trace), "--workload", str(workload_file)]
    )
    assert result.exit_code != 0
    assert "bad.csv" in result.output and "header" in result.output


def test_simulate_overlays_the_trace_by_default(tmp_path: Path, workload_file: Path) -> None:
    trace = write_trace(tmp_path / "trace.csv", constant(rps=1.0, seconds=240))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--trace", str(trace),
            "--workload", str(workload_file),
            "--rate-scale", "2",
            "--report", str(report),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "requests served     480 of 480" in result.output
    assert "trace overlaid 2x on its own time axis" in result.output
    data = json.loads(report.read_text())
    assert data["rate_mode"] == "overlay"
    # The overlaid trace keeps its four minutes; compressed it would last two.
    assert data["duration_s"] >= 239
