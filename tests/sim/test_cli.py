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


def test_simulate_replays_a_day_drawn_from_a_rate_profile(
    tmp_path: Path, workload_file: Path
) -> None:
    """A whole day of the bundled Azure 2024 conversation week (Monday, scaled to a peak of
    0.1 req/s), token lengths from the 2023 conversation trace: the report covers 24 h,
    serves every drawn request, and the PNG is written. (Its wall time is measured in
    docs/simulate.md, not asserted.)"""
    from autoscaler.sim.profile import load_rate_profile, poisson_trace
    from autoscaler.sim.trace import load_trace

    traces = Path(__file__).parents[2] / "traces"
    profile = traces / "azure2024_conv_week_rate_digitized.csv"
    drawn = poisson_trace(
        load_rate_profile(profile).day(1).with_peak(0.1),
        load_trace(traces / "azure2023_conv.csv"),
        seed=4,
    )
    report, plot = tmp_path / "report.json", tmp_path / "day.png"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--trace", str(profile),
            "--day", "1",
            "--peak-rps", "0.1",
            "--workload", str(workload_file),
            "--seed", "4",
            "--report", str(report),
            "--plot", str(plot),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "day 1, peak 0.1 req/s, tokens azure2023_conv.csv" in result.output
    data = json.loads(report.read_text())
    assert data["requests"] == len(drawn)
    assert data["served"] + data["refused_too_long"] == len(drawn)
    assert data["duration_s"] >= 86_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_names_bad_profile_options(tmp_path: Path, workload_file: Path) -> None:
    profile = Path(__file__).parents[2] / "traces" / "azure2024_conv_week_rate_digitized.csv"
    trace = write_trace(tmp_path / "trace.csv", constant(rps=1.0, seconds=60))
    cases = [
        (["--trace", str(profile), "--day", "9"], "day must be 0-6"),
        (["--trace", str(profile), "--peak-rps", "0"], "must be > 0 requests/s, got 0"),
        (["--trace", str(profile), "--day", "1", "--week"], "--day and --week exclude"),
        (["--trace", str(trace), "--day", "1"], "apply to a rate profile only"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["simulate", *args, "--workload", str(workload_file)])
        assert result.exit_code != 0
        assert message in result.output, result.output


def test_simulate_reads_mooncake_jsonl_and_compares_routings(
    tmp_path: Path, workload_file: Path
) -> None:
    trace = tmp_path / "shared.jsonl"
    rows = [
        {
            "timestamp": 500 * k,
            "input_length": 4096,
            "output_length": 8,
            "hash_ids": [*range(7), 100 + k],
        }
        for k in range(200)
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    rates = {}
    for routing in ("prefix", "least-work"):
        report = tmp_path / f"{routing}.json"
        result = CliRunner().invoke(
            main,
            [
                "simulate",
                "--trace", str(trace),
                "--workload", str(workload_file),
                "--routing", routing,
                "--report", str(report),
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"routing             {routing}: prefix cache hits" in result.output
        data = json.loads(report.read_text())
        assert data["routing"] == routing and data["served"] == 200
        rates[routing] = data["prefix_hit_rate"]
    # Seven shared blocks of eight: once warm, every request finds 3,584 of its 4,096
    # tokens cached on the replica that holds them.
    assert rates["prefix"] > 0.8
    assert rates["least-work"] <= rates["prefix"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5}\n', encoding="utf-8")
    result = CliRunner().invoke(
        main, ["simulate", "--trace", str(bad), "--workload", str(workload_file)]
    )
    assert result.exit_code != 0
    assert "bad.jsonl:1: missing field(s) output_length, hash_ids" in result.output
