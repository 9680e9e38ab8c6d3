# ruff: noqa: C408, E501  (the samples are kept as the documents write them)
"""The product documents' samples, run as users paste them, against ``autoscaler run``.

Each sample from the workload guide and the backends page is here with its code as
written, the package name being ``autoscaler``. What a reader has to fill in is filled
in the way a reader would: the placeholder worker id is a worker registered for the
test (an ``autoscaler agent`` running engine-sim), ``ik_live_...`` is a data key made
for the workload, and the OpenAI clients' ``base_url`` is this gateway. The local
provider stands in for the cloud as an A100 (the GPU the samples' pools name), serving
engine-sim replicas.

Every provisioned sample must reach a ready replica and answer through the gateway.
Here the scheduled samples are accepted as edits; ``tests/e2e/test_seed_schedules.py``
runs each of them inside its window (``autoscaler run --schedule-offset``) to a ready
replica answering through the gateway. The sample that declares autoscaling with no
config is refused naming the keys it lacks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Process, RunningService, autoscaler_cli, free_port, wait_until

pytestmark = pytest.mark.slow

ADMIN = "ik_sdk_seed-samples-admin-" + "s" * 20
PROJECT = "acme"


class Service:
    """The running service, a registered worker and the way to a data key."""

    def __init__(self, running: RunningService, *, gateway: str, worker_id: str) -> None:
        self.running = running
        self.gateway = gateway
        self.worker_id = worker_id

    def base_url(self, slug: str) -> str:
        return f"{self.gateway}/endpoint/{PROJECT}/{slug}/v1"

    def data_key(self, slug: str) -> str:
        from autoscaler import ManagementClient

        with ManagementClient.from_env(project=PROJECT) as mgmt:
            return mgmt.create_key(slug).secret

    def ready_replicas(self, slug: str) -> list[dict[str, Any]]:
        from autoscaler import ManagementClient

        with ManagementClient.from_env(project=PROJECT) as mgmt:
            generation = mgmt.get(slug)["generation"]
            return [
                r
                for r in mgmt.replicas(slug)
                if r["phase"] == "ready" and r["generation"] == generation
            ]

    def wait_ready(self, slug: str) -> list[dict[str, Any]]:
        wait_until(lambda: bool(self.ready_replicas(slug)), timeout=90, what=f"{slug} ready")
        return self.ready_replicas(slug)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("seeds")
    api_port, gateway_port = free_port(), free_port()
    api, gateway = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{gateway_port}"
    config = root / "controller.yaml"
    config.write_text(
        "cluster_id: seeds\ntick_sec: 1\nproviders:\n"
        "  local: {gpu: NVIDIA A100-SXM4-80GB, time_scale: 50}\n"
    )
    env = {"AUTOSCALER_DATA_DIR": str(root / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    argv = autoscaler_cli(
        "run", "--api-port", str(api_port), "--gateway-port", str(gateway_port),
        "--config", str(config),
    )  # fmt: skip
    agent_state = root / "agent"
    agent = autoscaler_cli(
        "agent", "--controller", api, "--token", ADMIN, "--project", PROJECT,
        "--name", "gpu-box", "--state-dir", str(agent_state), "--runtime", "engine-sim",
        "--bind-host", "127.0.0.1", "--heartbeat-seconds", "0.3", "--time-scale", "50",
    )  # fmt: skip
    saved = {
        k: os.environ.get(k)
        for k in ("AUTOSCALER_URL", "AUTOSCALER_SDK_TOKEN", "AUTOSCALER_GATEWAY_URL")
    }
    os.environ.update(
        AUTOSCALER_URL=api, AUTOSCALER_SDK_TOKEN=ADMIN, AUTOSCALER_GATEWAY_URL=gateway
    )
    try:
        with (
            RunningService(argv, env=env, api_url=api, token=ADMIN, project=PROJECT) as running,
            Process(agent, env=env),
        ):
            worker = agent_state / "worker.json"
            wait_until(
                lambda: worker.exists() and bool(worker.read_text()),
                timeout=30,
                what="the agent to register",
            )
            worker_id = json.loads(worker.read_text())["worker_id"]
            yield Service(running, gateway=gateway, worker_id=worker_id)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- chat / completion: text2text -------------------------------------------------------


def test_chat_fixed_cloud_then_its_policy_variations(service: Service) -> None:
    # provision_chat.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="Support bot",
        slug="support-bot",
        model="meta-llama/Llama-3.1-8B-Instruct",
        backend=Backend.VLLM,
        task_type="text2text",  # server default; explicit for clarity
        command="vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
        execution_policy=ExecutionPolicy.FIXED,
        execution_policy_config={"replicas": 1},
    ))  # fmt: skip
    assert (ref.project_slug, ref.workload_slug) == ("acme", "support-bot")
    service.wait_ready("support-bot")

    # call_chat.py
    from autoscaler import DataClient

    data = DataClient.from_env(project="acme")
    ep = data.endpoint("support-bot", api_key=service.data_key("support-bot"))
    out = ep.generate_text(prompt="Hola, ¿cuál es mi saldo?", temperature=0.2, max_tokens=300)
    assert out.text and out.model == "meta-llama/Llama-3.1-8B-Instruct"

    # Policy variations
    base = dict(
        name="Support bot",
        slug="support-bot",
        model="meta-llama/Llama-3.1-8B-Instruct",
        backend=Backend.VLLM,
        command="vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
    )
    mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 0,
            "max_workers": 5,
            "max_hourly_cost_usd": 5.0,  # required, must be > 0
            "workers": {
                "source": "cloud",
                "cloud_pool": {
                    "gpu_pool": ["NVIDIA A100-SXM4-80GB"],
                    "max_hourly_cost_usd": 5.0,
                    "max_instances": 5,
                    "allowed_cuda_versions": ["13.0"],  # optional CUDA pin
                },
            },
        }))  # fmt: skip
    out = ep.generate_text(prompt="and now?", max_tokens=8)
    assert out.text
    service.wait_ready("support-bot")

    scheduled = mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.SCHEDULED,
        execution_policy_config={"window": "Mon-Fri 08:00-20:00 Europe/Madrid"}))  # fmt: skip
    assert scheduled.action == "updated"

    private = mgmt.ensure(WorkloadSpec(**base,
        worker_id=service.worker_id,
        execution_policy=ExecutionPolicy.FIXED,
        execution_policy_config={"replicas": 2}))  # fmt: skip
    assert private.action == "updated"
    wait_until(
        lambda: len(service.ready_replicas("support-bot")) == 2,
        timeout=90,
        what="two replicas on the private worker",
    )
    assert {r["provider"] for r in service.ready_replicas("support-bot")} == {"private"}
    assert ep.generate_text(prompt="on my own box", max_tokens=8).text
    mgmt.close()


# --- embeddings ---------------------------------------------------------------------------


def test_embedding_scheduled_then_fixed_and_private_autoscaling(service: Service) -> None:
    # provision_embedding.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="Billing embeddings",
        slug="billing",
        model="BAAI/bge-large-en-v1.5",
        backend=Backend.VLLM,
        task_type="embedding",
        command="vllm serve BAAI/bge-large-en-v1.5 --task embed",
        execution_policy=ExecutionPolicy.SCHEDULED,
        execution_policy_config={"cron": "0 2 * * *"},  # nightly at 02:00
    ))  # fmt: skip
    assert ref.action == "created"

    base = dict(
        name="Billing embeddings", slug="billing",
        model="BAAI/bge-large-en-v1.5", backend=Backend.VLLM,
        task_type="embedding", command="vllm serve BAAI/bge-large-en-v1.5 --task embed",
    )  # fmt: skip
    mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.FIXED, execution_policy_config={"replicas": 1}))  # fmt: skip
    service.wait_ready("billing")

    # call_embedding.py
    from autoscaler import DataClient

    key = service.data_key("billing")
    data = DataClient.from_env(project="acme")
    emb = data.endpoint("billing", api_key=key).embed(input=["invoice #42", "refund policy"])
    assert len(emb.embeddings) == 2 and emb.model == "BAAI/bge-large-en-v1.5"

    mgmt.ensure(WorkloadSpec(**base, worker_id=service.worker_id,
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 1, "max_workers": 4,
            "workers": {"source": "private", "private_worker_ids": [service.worker_id]},
        }))  # fmt: skip
    wait_until(
        lambda: any(r["provider"] == "private" for r in service.ready_replicas("billing")),
        timeout=90,
        what="a replica on the private worker",
    )
    emb = data.endpoint("billing", api_key=key).embed(input=["a", "b"])
    assert len(emb.embeddings) == 2
    mgmt.close()


# --- image generation ---------------------------------------------------------------------


def test_text2image_autoscaling_cloud_answers_the_openai_images_route(service: Service) -> None:
    # provision_text2image.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="Poster maker",
        slug="poster-maker",
        model="stabilityai/stable-diffusion-3.5-large",
        backend=Backend.VLLM_OMNI,
        task_type="text2image",
        command="vllm-omni serve stabilityai/stable-diffusion-3.5-large",
        vllm_version="0.6.3",  # optional: pin the serving runtime
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 0, "max_workers": 3, "max_hourly_cost_usd": 5.0,
            "workers": {"source": "cloud", "cloud_pool": {
                "gpu_pool": ["NVIDIA A100-SXM4-80GB"], "max_hourly_cost_usd": 5.0, "max_instances": 3,
            }},
        },
    ))  # fmt: skip
    assert ref.action == "created"

    # call_text2image.py: scales from zero on this first request
    from openai import OpenAI

    client = OpenAI(
        base_url=service.base_url("poster-maker"),
        api_key=service.data_key("poster-maker"),
    )
    img = client.images.generate(
        model="stabilityai/stable-diffusion-3.5-large",
        prompt="A neon poster of a llama coding at night",
        size="1024x1024",
    )
    assert (img.data or [])[0].url
    assert service.ready_replicas("poster-maker")

    base = dict(
        name="Poster maker", slug="poster-maker",
        model="stabilityai/stable-diffusion-3.5-large", backend=Backend.VLLM_OMNI,
        task_type="text2image",
        command="vllm-omni serve stabilityai/stable-diffusion-3.5-large",
    )  # fmt: skip
    mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.FIXED, execution_policy_config={"replicas": 1}))  # fmt: skip
    service.wait_ready("poster-maker")
    img = client.images.generate(
        model="stabilityai/stable-diffusion-3.5-large", prompt="again", size="256x256"
    )
    assert (img.data or [])[0].url
    scheduled = mgmt.ensure(WorkloadSpec(**base, worker_id=service.worker_id,
        execution_policy=ExecutionPolicy.SCHEDULED,
        execution_policy_config={"cron": "0 1 * * *"}))  # fmt: skip
    assert scheduled.action == "updated"
    mgmt.close()


# --- text to speech ---------------------------------------------------------------------


def test_text2audio_fixed_private_worker_answers_the_speech_route(
    service: Service, tmp_path: Path
) -> None:
    # provision_text2audio.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="Voice over",
        slug="voice-over",
        model="hexgrad/Kokoro-82M",
        backend=Backend.VLLM_OMNI,
        task_type="text2audio",
        command="vllm-omni serve hexgrad/Kokoro-82M",
        worker_id=service.worker_id,  # private worker
        execution_policy=ExecutionPolicy.FIXED,
        execution_policy_config={"replicas": 1},
    ))  # fmt: skip
    assert ref.action == "created"
    [replica] = service.wait_ready("voice-over")
    assert replica["provider"] == "private"

    # call_text2audio.py
    from openai import OpenAI

    client = OpenAI(
        base_url=service.base_url("voice-over"),
        api_key=service.data_key("voice-over"),
    )
    speech = client.audio.speech.create(
        model="hexgrad/Kokoro-82M",
        voice="af_heart",
        input="Hola, su pedido va en camino.",
    )
    # The OpenAI SDK itself warns that this method reads the whole answer first.
    with pytest.warns(DeprecationWarning, match="doesn't actually stream"):
        speech.stream_to_file(tmp_path / "out.mp3")
    assert (tmp_path / "out.mp3").stat().st_size > 0

    base = dict(
        name="Voice over", slug="voice-over", model="hexgrad/Kokoro-82M",
        backend=Backend.VLLM_OMNI, task_type="text2audio",
        command="vllm-omni serve hexgrad/Kokoro-82M",
    )  # fmt: skip
    mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 0, "max_workers": 4, "max_hourly_cost_usd": 5.0,
            "workers": {"source": "cloud", "cloud_pool": {
                "gpu_pool": ["NVIDIA A100-SXM4-80GB"], "max_hourly_cost_usd": 5.0, "max_instances": 4,
            }},
        }))  # fmt: skip
    again = client.audio.speech.create(model="hexgrad/Kokoro-82M", voice="af_heart", input="Hi")
    assert again.content
    scheduled = mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.SCHEDULED,
        execution_policy_config={"cron": "0 6 * * *"}))  # fmt: skip
    assert scheduled.action == "updated"
    mgmt.close()


# --- speech to text ---------------------------------------------------------------------


def test_audio2text_autoscaling_cloud_answers_the_transcriptions_route(
    service: Service, tmp_path: Path
) -> None:
    # provision_audio2text.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="Transcriber",
        slug="transcriber",
        model="openai/whisper-large-v3",
        backend=Backend.VLLM_OMNI,
        task_type="audio2text",
        command="vllm-omni serve openai/whisper-large-v3",
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 0, "max_workers": 6, "max_hourly_cost_usd": 5.0,
            "workers": {"source": "cloud", "cloud_pool": {
                "gpu_pool": ["NVIDIA A100-SXM4-80GB"], "max_hourly_cost_usd": 5.0, "max_instances": 6,
            }},
        },
    ))  # fmt: skip
    assert ref.action == "created"

    # call_audio2text.py
    from openai import OpenAI

    client = OpenAI(
        base_url=service.base_url("transcriber"),
        api_key=service.data_key("transcriber"),
    )
    (tmp_path / "call.mp3").write_bytes(b"ID3" + bytes(4096))
    with open(tmp_path / "call.mp3", "rb") as audio:
        tr = client.audio.transcriptions.create(
            model="openai/whisper-large-v3",
            file=audio,
        )
    assert tr.text
    assert service.ready_replicas("transcriber")

    base = dict(
        name="Transcriber", slug="transcriber", model="openai/whisper-large-v3",
        backend=Backend.VLLM_OMNI, task_type="audio2text",
        command="vllm-omni serve openai/whisper-large-v3",
    )  # fmt: skip
    mgmt.ensure(WorkloadSpec(**base, worker_id=service.worker_id,
        execution_policy=ExecutionPolicy.FIXED, execution_policy_config={"replicas": 1}))  # fmt: skip
    wait_until(
        lambda: any(r["provider"] == "private" for r in service.ready_replicas("transcriber")),
        timeout=90,
        what="a transcriber on the private worker",
    )
    scheduled = mgmt.ensure(WorkloadSpec(**base,
        execution_policy=ExecutionPolicy.SCHEDULED,
        execution_policy_config={"cron": "0 0 * * *"}))  # fmt: skip
    assert scheduled.action == "updated"
    mgmt.close()


# --- async-only modalities -------------------------------------------------------------


def test_reranker_autoscaling_cloud_answers_an_async_job(service: Service) -> None:
    # provision_reranker.py
    from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    # Reranker — async-only. classification / reward follow the same shape.
    mgmt.ensure(WorkloadSpec(
        name="Search reranker",
        slug="search-reranker",
        model="BAAI/bge-reranker-v2-m3",
        backend=Backend.VLLM,
        task_type="reranker",  # also: "classification", "reward"
        command="vllm serve BAAI/bge-reranker-v2-m3 --task score",
        execution_policy=ExecutionPolicy.AUTOSCALING,
        execution_policy_config={
            "min_workers": 0, "max_workers": 3, "max_hourly_cost_usd": 5.0,
            "workers": {"source": "cloud", "cloud_pool": {
                "gpu_pool": ["NVIDIA A100-SXM4-80GB"], "max_hourly_cost_usd": 5.0, "max_instances": 3,
            }},
        },
    ))  # fmt: skip

    # Calling it: a job on the async data-plane API, which scales it from zero.
    from autoscaler import DataClient

    ep = DataClient.from_env(project="acme").endpoint(
        "search-reranker", api_key=service.data_key("search-reranker")
    )
    job = ep.submit_job(body={"query": "refund policy", "documents": ["invoice", "refunds"]})
    done = ep.job_result(job.id, timeout=120)
    assert done.status == "succeeded", done
    answer = (done.result or {})["body"]
    assert {r["index"] for r in answer["results"]} == {0, 1}, done.result
    assert service.ready_replicas("search-reranker")
    mgmt.close()


# --- the backends page ------------------------------------------------------------------


def test_backends_page_samples(service: Service) -> None:
    # vllm_workload.py
    from autoscaler import Backend, ManagementClient, WorkloadSpec

    mgmt = ManagementClient.from_env(project="acme")
    ref = mgmt.ensure(WorkloadSpec(
        name="support-bot",
        slug="support-bot-vllm",
        model="meta-llama/Llama-3.1-8B-Instruct",
        backend=Backend.VLLM,
        command="vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
        vllm_version="0.6.3",  # optional: pin the engine version
    ))  # fmt: skip
    assert ref.action == "created"
    service.wait_ready("support-bot-vllm")

    # embedding_workload.py
    from autoscaler import DataClient

    ref = mgmt.ensure(WorkloadSpec(
        name="billing-embeddings",
        slug="billing-embeddings",
        model="BAAI/bge-large-en-v1.5",
        backend=Backend.VLLM,
        command="vllm serve BAAI/bge-large-en-v1.5",
        task_type="embedding",
    ))  # fmt: skip
    service.wait_ready("billing-embeddings")
    data = DataClient.from_env(project="acme")
    key = service.data_key("billing-embeddings")
    emb = data.endpoint("billing-embeddings", api_key=key).embed(input=["a", "b"])
    assert len(emb.embeddings) == 2

    # autoscaling_workload.py: a cloud pool has no default dollar ceiling, so the spec
    # is refused at construction, naming what it lacks.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'max_workers' and 'max_hourly_cost_usd'"):
        WorkloadSpec(
            name="support-bot",
            slug="support-bot",
            model="meta-llama/Llama-3.1-8B-Instruct",
            backend=Backend.VLLM,
            command="vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
            execution_policy="autoscaling",
        )
    mgmt.close()


def test_the_package_exports_what_the_samples_import() -> None:
    import autoscaler
    from autoscaler import (
        Backend,
        DataClient,
        ExecutionPolicy,
        ManagementClient,
        OnDrift,
        WorkloadSpec,
    )

    assert Backend.VllmOmni.value == Backend.VLLM_OMNI.value == "vllm-omni"
    assert OnDrift.RECONCILE.value == "reconcile"
    assert {ManagementClient.__name__, DataClient.__name__, WorkloadSpec.__name__} == {
        "ManagementClient",
        "DataClient",
        "WorkloadSpec",
    }
    assert ExecutionPolicy.AUTOSCALING.value == "autoscaling"
    with pytest.raises(AttributeError):
        _ = autoscaler.Nothing
