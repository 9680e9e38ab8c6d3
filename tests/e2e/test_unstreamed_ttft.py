"""TTFT means first token: one user sending long non-streamed generations, one after
another, to a fleet with room to spare must not look like a TTFT breach.

The gateway cannot see the first token of an answer that is not streamed (its first byte
follows the last token), so it keeps those requests out of its TTFT window; the engines'
own histograms (engine-sim exports vLLM's) time their first tokens, and the controller
scrapes them. Before, each answer's whole latency counted as its TTFT and this scenario
bought replicas.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from autoscaler.sdk import ManagementClient
from tests.helpers import RunningService, free_port, run_argv, wait_until

ADMIN = "ik_sdk_e2e-unstreamed-admin-" + "u" * 16
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
UPPER_SEC = 1.0
WINDOW_SEC = 5.0
REQUESTS = 6

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _spec() -> dict[str, Any]:
    return {
        "name": "Long answers",
        "slug": "long-answers",
        "model": MODEL,
        "backend": "vllm",
        "execution_policy": "autoscaling",
        "execution_policy_config": {
            "min_workers": 1,
            "max_workers": 4,
            "max_hourly_cost_usd": 10,
            "upper_allowed_latency_sec": UPPER_SEC,
            "lower_allowed_latency_sec": 0.2,
            "scale_up_time_window_sec": WINDOW_SEC,
            "scale_down_time_window_sec": 600,
            "workers": {
                "source": "cloud",
                "cloud_pool": {"gpu_pool": ["NVIDIA H100 80GB HBM3"], "max_hourly_cost_usd": 10},
            },
        },
    }


def test_sequential_unstreamed_long_generations_record_first_tokens_and_buy_nothing(
    tmp_path: Path,
) -> None:
    api_port, gateway_port = free_port(), free_port()
    config = tmp_path / "controller.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster_id": "ttft",
                "tick_sec": 1,
                "engine_metrics_sec": 1,
                "providers": {"local": {}},
            }
        )
    )
    spec_file = tmp_path / "long.yaml"
    spec_file.write_text(yaml.safe_dump(_spec()))
    argv = run_argv(
        api_port=api_port, gateway_port=gateway_port, config=config, extra=("--engine", "sim")
    )
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    api = f"http://127.0.0.1:{api_port}"
    with (
        RunningService(argv, env=env, api_url=api, token=ADMIN, project="acme") as service,
        ManagementClient(url=api, token=ADMIN, project="acme") as admin,
    ):
        service.ok("apply", "-f", str(spec_file))
        wait_until(
            lambda: [r["phase"] for r in admin.replicas("long-answers")] == ["ready"],
            timeout=60,
            what="the first replica",
        )
        key = admin.create_key("long-answers").secret
        base = f"http://127.0.0.1:{gateway_port}/endpoint/acme/long-answers/v1"
        url = f"{base}/chat/completions"
        latencies = []
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            wait_until(
                lambda: http.get(f"{base}/models").status_code == 200,
                timeout=10,
                what="the new data key at the gateway",
            )
            for n in range(REQUESTS):
                asked = time.monotonic()
                answer = http.post(
                    url,
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"essay {n}"}],
                        "max_tokens": 300,
                    },
                )
                assert answer.status_code == 200, answer.text
                latencies.append(time.monotonic() - asked)
        last = time.time()
        # The scenario: every answer, taken whole, is slower than the TTFT target.
        assert min(latencies) > UPPER_SEC, latencies

        def measured_after_the_window() -> bool:
            found = admin.signals("long-answers")
            at = found.get("at")
            engines = found.get("engines") or {}
            return (
                at is not None
                and _epoch(at) > last + WINDOW_SEC
                and engines.get("ttft_samples", 0) >= REQUESTS
            )

        wait_until(measured_after_the_window, timeout=60, what="a measurement past the window")
        measured = admin.signals("long-answers")
        replicas = admin.replicas("long-answers")
        decisions = admin.decisions("long-answers", limit=100)

    assert measured["gateway"]["ttft_samples"] == 0
    assert measured["gateway"]["unstreamed_answers"] == REQUESTS
    assert measured["engines"]["ttft_p95_s"] < UPPER_SEC  # first tokens came fast
    assert len(replicas) == 1, replicas  # nothing bought beyond the first replica
    assert not [d for d in decisions if d["kind"] == "scale" and "up" in d["reason"].split()[:3]]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
