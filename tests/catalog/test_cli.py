"""``autoscaler catalog`` through click's CliRunner, sync included (moto + local fakes)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from autoscaler.cli.catalog import register
from catalog.model import ProviderName
from catalog.snapshot import load_catalog
from tests.catalog.conftest import AWS_PRICES, AWS_SPOT, gcp_fake, write_previous
from tests.catalog.fakes import AwsPricingFake, serve_in_thread


@pytest.fixture
def cli() -> click.Group:
    @click.group()
    def root() -> None:
        pass

    register(root)
    return root


def run(cli: click.Group, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["catalog", *args])
    return result.exit_code, result.output


def test_list_a100_80gb_under_45_is_cheapest_first_with_age(
    cli: click.Group, tmp_path: Path
) -> None:
    code, out = run(
        cli,
        "list",
        "--gpu",
        "NVIDIA A100-SXM4-80GB",
        "--max-price",
        "45",
        "-o",
        "json",
        "--data-dir",
        str(tmp_path),
    )
    assert code == 0, out
    document = json.loads(out)
    prices = [o["usd_per_hour"] for o in document["offers"]]
    assert prices and prices == sorted(prices) and max(prices) <= 45
    assert "p4de.24xlarge" in {o["instance_type"] for o in document["offers"]}
    assert document["catalog"]["location"].startswith("bundled")
    assert document["catalog"]["age_seconds"] > 0


def test_list_table_prints_snapshot_age_and_rows(cli: click.Group, tmp_path: Path) -> None:
    code, out = run(
        cli, "list", "--gpu", "a100-80gb", "--max-price", "45", "--data-dir", str(tmp_path)
    )
    assert code == 0, out
    assert "days old" in out
    assert "a2-ultragpu-1g" in out


def test_cuda_13_list_never_shows_a_v100(cli: click.Group, tmp_path: Path) -> None:
    code, out = run(
        cli, "list", "--cuda", "13.0", "-o", "json", "--explain", "--data-dir", str(tmp_path)
    )
    assert code == 0, out
    document = json.loads(out)
    assert all("V100" not in o["gpu"] for o in document["offers"])
    assert any(r["reason"] == "cuda" and "V100" in r["detail"] for r in document["rejected"])


def test_unknown_gpu_suggests_the_right_name(cli: click.Group) -> None:
    code, out = run(cli, "list", "--gpu", "NVIDIA A100-SXM-80GB")
    assert code == 2
    assert "did you mean 'NVIDIA A100-SXM4-80GB'?" in out
    code, out = run(cli, "show", "H1OO")
    assert code == 2
    assert "did you mean 'NVIDIA H100 80GB HBM3'?" in out


def test_explain_table_counts_rejections_by_reason(cli: click.Group, tmp_path: Path) -> None:
    code, out = run(
        cli, "list", "--gpu", "H100", "--max-price", "50", "--explain", "--data-dir", str(tmp_path)
    )
    assert code == 0, out
    assert "rejected by reason:" in out
    assert "over-ceiling" in out and "gpu:" in out


def test_show_describes_a_gpu_and_its_cuda_versions(cli: click.Group, tmp_path: Path) -> None:
    code, out = run(cli, "show", "v100", "--data-dir", str(tmp_path))
    assert code == 0, out
    assert "Tesla V100-SXM2-16GB" in out
    assert "compute capability 7.0" in out
    cuda_line = next(line for line in out.splitlines() if "CUDA versions" in line)
    assert "12.9" in cuda_line and "13.0" not in cuda_line


@pytest.mark.usefixtures("aws_env")
def test_sync_rebuilds_the_snapshot_from_the_fakes(
    cli: click.Group, tmp_path: Path, moto_url: str
) -> None:
    write_previous(tmp_path)
    aws_fake = AwsPricingFake(on_demand=dict(AWS_PRICES), spot=dict(AWS_SPOT))
    with serve_in_thread(aws_fake.app()) as aws_url, serve_in_thread(gcp_fake().app()) as gcp_url:
        code, out = run(
            cli,
            "sync",
            "--data-dir",
            str(tmp_path),
            "--aws-region",
            "us-east-1",
            "--aws-endpoint",
            f"ec2={moto_url}",
            "--aws-endpoint",
            f"ec2_spot={aws_url}",
            "--aws-endpoint",
            f"pricing={aws_url}",
            "--gcp-project",
            "demo",
            "--gcp-region",
            "us-central1",
            "--gcp-compute-endpoint",
            gcp_url,
            "--gcp-billing-endpoint",
            gcp_url,
            "--gcp-anonymous",
        )
    assert code == 0, out
    assert "aws us-east-1: 4 ->" in out
    snapshot = load_catalog(tmp_path)
    assert snapshot.source.startswith("sync:")
    providers = {o.provider for o in snapshot.offers}
    assert providers == {ProviderName.AWS, ProviderName.GCP}
    assert not any(o.instance_type.startswith("old") for o in snapshot.offers)
    code, out = run(cli, "list", "--gpu", "L4", "--data-dir", str(tmp_path))
    assert "g2-standard-8" in out and "minutes old" in out


@pytest.mark.usefixtures("aws_env")
def test_failing_sync_exits_nonzero_and_keeps_the_old_snapshot(
    cli: click.Group, tmp_path: Path, moto_url: str
) -> None:
    path = write_previous(tmp_path)
    before = path.read_bytes()
    fake = AwsPricingFake(on_demand=dict(AWS_PRICES), fail_with="AccessDeniedException")
    with serve_in_thread(fake.app()) as url:
        code, out = run(
            cli,
            "sync",
            "--provider",
            "aws",
            "--data-dir",
            str(tmp_path),
            "--aws-region",
            "us-east-1",
            "--aws-endpoint",
            f"ec2={moto_url}",
            "--aws-endpoint",
            f"ec2_spot={url}",
            "--aws-endpoint",
            f"pricing={url}",
        )
    assert code == 1
    assert "sync failed" in out and "previous catalog is unchanged" in out
    assert path.read_bytes() == before


def test_sync_without_gcp_project_says_what_is_missing(
    cli: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    code, out = run(cli, "sync", "--provider", "gcp", "--data-dir", str(tmp_path))
    assert code == 2
    assert "--gcp-project" in out
