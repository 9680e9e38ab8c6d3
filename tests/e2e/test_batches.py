"""A batch of 300 requests through the real ``openai`` SDK against ``autoscaler run``
with engine-sim replicas: it wakes its workload from zero, survives the service being
stopped and started again midway, and ends with exactly one result line per request."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.helpers import RunningService, free_port, run_argv, wait_until

ADMIN = "ik_sdk_e2e-batch-admin-" + "b" * 20
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LINES = 300

pytestmark = pytest.mark.slow

SPEC = {
    "name": "Batch bot",
    "slug": "batch-bot",
    "model": MODEL,
    "backend": "vllm",
    "task_type": "text2text",
    "execution_policy": "autoscaling",
    "execution_policy_config": {
        "min_workers": 0,
        "max_workers": 2,
        "max_hourly_cost_usd": 1,
        "scale_to_zero_timeout_sec": 600,
        "workers": {
            "source": "cloud",
            "cloud_pool": {"gpu_pool": ["NVIDIA H100 80GB HBM3"], "max_hourly_cost_usd": 1},
        },
    },
}


def _input_file() -> bytes:
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 24,
            },
        }
        for i in range(LINES)
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_a_batch_wakes_its_workload_and_survives_a_restart_with_one_line_per_request(
    tmp_path: Path,
) -> None:
    api_port, gateway_port = free_port(), free_port()
    spec_file = tmp_path / "batch.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    config = tmp_path / "controller.yaml"
    config.write_text("cluster_id: laptop\ntick_sec: 1\nproviders:\n  local: {engine: sim}\n")
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    argv = run_argv(api_port=api_port, gateway_port=gateway_port, config=config)
    api = f"http://127.0.0.1:{api_port}"
    replicas_url = f"{api}/v1/projects/demo/workloads/batch-bot/replicas"
    headers = {"Authorization": f"Bearer {ADMIN}"}

    def replicas() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = httpx.get(replicas_url, headers=headers, timeout=5).json()[
            "items"
        ]
        return items

    base_url = f"http://127.0.0.1:{gateway_port}/endpoint/demo/batch-bot/v1"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo") as service:
        assert "created" in service.ok("apply", "-f", str(spec_file))
        key = service.ok("keys", "create", "batch-bot").split("secret:")[1].split()[0]
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
        uploaded = client.files.create(
            file=("requests.jsonl", io.BytesIO(_input_file())), purpose="batch"
        )
        assert uploaded.bytes > 0 and uploaded.purpose == "batch"
        assert replicas() == []  # at zero: min_workers 0 and no request yet
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert batch.status == "in_progress"
        wait_until(lambda: bool(replicas()), timeout=30, what="the batch to wake the workload")

        def completed() -> int:
            counts = client.batches.retrieve(batch.id).request_counts
            return 0 if counts is None else counts.completed

        wait_until(lambda: completed() >= 30, timeout=60, what="30 lines of the batch done")
        before = client.batches.retrieve(batch.id)
        service.stop()
    assert before.status == "in_progress", "the batch ended before the restart it should span"

    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo") as service:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while (done := client.batches.retrieve(batch.id)).status == "in_progress":
            assert time.monotonic() < deadline, f"batch still in progress: {done}"
            time.sleep(0.5)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (LINES, LINES)
        assert done.error_file_id is None and done.output_file_id is not None
        output = client.files.content(done.output_file_id).text.splitlines()
        listed = [b.id for b in client.batches.list()]
        service.stop()

    results = [json.loads(line) for line in output]
    custom_ids = [r["custom_id"] for r in results]
    assert len(custom_ids) == LINES
    assert sorted(custom_ids) == sorted(f"request-{i}" for i in range(LINES))
    assert len({r["id"] for r in results}) == LINES
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in results)
    assert listed == [batch.id]
