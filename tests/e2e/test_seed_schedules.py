# ruff: noqa: C408  (the samples are kept as the documents write them)
"""The product documents' scheduled samples, run as users paste them, each inside its
window: ``autoscaler run --schedule-offset`` reads the schedules on a shifted clock.

Every scheduled sample of the workload guide (a daytime window, four nightly or morning
crons) is applied to a service whose schedule clock is moved five minutes past the
sample's next opening, and must reach a ready replica and answer its call sample through
the gateway. One windows' worth of offsets cannot serve them all (the crons' hour-long
runs do not overlap), so the service is started once per sample on the same state, with
the same ports, and the same registered worker (an ``autoscaler agent`` running
engine-sim) for the sample pinned to a private worker. The rest is as in
``tests/e2e/test_seed_samples.py``: ``ik_live_...`` is a data key made for the workload,
the OpenAI clients' ``base_url`` is this gateway, and the local provider stands in for
the cloud as an A100.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from tests.helpers import Process, RunningService, autoscaler_cli, free_port, wait_until

pytestmark = pytest.mark.slow

ADMIN = "ik_sdk_seed-schedules-admin-" + "s" * 20
PROJECT = "acme"
INTO_THE_WINDOW = timedelta(minutes=5)


def offset_into(config: dict[str, str]) -> int:
    """Seconds from now to five minutes after the schedule next opens (worked out here,
    apart from the product's schedule code)."""
    now = datetime.now(UTC)
    if "cron" in config:  # the samples' crons are in UTC, the default time zone
        trigger = CronTrigger.from_crontab(config["cron"], timezone=UTC)
        opens = trigger.get_next_fire_time(None, now)
    else:
        assert config["window"] == "Mon-Fri 08:00-20:00 Europe/Madrid"
        madrid = ZoneInfo("Europe/Madrid")
        day = now.astimezone(madrid).date() + timedelta(days=1)
        while day.weekday() >= 5:
            day += timedelta(days=1)
        opens = datetime.combine(day, time(8, 0), tzinfo=madrid)
    assert opens is not None
    return int((opens + INTO_THE_WINDOW - now).total_seconds())


class Rehearsal:
    """``autoscaler run`` started per sample with a schedule offset, on one state."""

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.stack = stack
        self.api_port, self.gateway_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.config = root / "controller.yaml"
        self.config.write_text(
            "cluster_id: seed-schedules\ntick_sec: 1\nproviders:\n"
            "  local: {gpu: NVIDIA A100-SXM4-80GB, time_scale: 50}\n"
        )
        self.env = {"AUTOSCALER_DATA_DIR": str(root / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
        self.worker_id: str | None = None

    @contextlib.contextmanager
    def inside(self, config: dict[str, str]) -> Iterator[None]:
        """The service, its schedules read inside ``config``'s next window; on the way
        out, its start lines must have said the clock is shifted."""
        offset = offset_into(config)
        argv = autoscaler_cli(
            "run", "--api-port", str(self.api_port), "--gateway-port", str(self.gateway_port),
            "--config", str(self.config), "--schedule-offset", str(offset),
        )  # fmt: skip
        running = RunningService(argv, env=self.env, api_url=self.api, token=ADMIN, project=PROJECT)
        with running:
            self._register_worker()
            yield
        output = running.stop()
        shown = timedelta(seconds=offset)
        hours, rest = divmod(int(shown.total_seconds()), 3600)
        assert f"SCHEDULE CLOCK SHIFTED +{hours}h{rest // 60:02d}m{rest % 60:02d}s" in output

    def _register_worker(self) -> None:
        if self.worker_id is not None:
            return
        state = self.root / "agent"
        agent = autoscaler_cli(
            "agent", "--controller", self.api, "--token", ADMIN, "--project", PROJECT,
            "--name", "gpu-box", "--state-dir", str(state), "--runtime", "engine-sim",
            "--bind-host", "127.0.0.1", "--heartbeat-seconds", "0.3", "--time-scale", "50",
        )  # fmt: skip
        self.stack.enter_context(Process(agent, env=self.env))
        worker = state / "worker.json"
        wait_until(
            lambda: worker.exists() and bool(worker.read_text()),
            timeout=30,
            what="the agent to register",
        )
        self.worker_id = json.loads(worker.read_text())["worker_id"]

    def base_url(self, slug: str) -> str:
        return f"{self.gateway}/endpoint/{PROJECT}/{slug}/v1"

    def data_key(self, slug: str) -> str:
        from autoscaler import ManagementClient

        with ManagementClient.from_env(project=PROJECT) as mgmt:
            return mgmt.create_key(slug).secret

    def wait_ready(self, slug: str) -> list[dict[str, Any]]:
        from autoscaler import ManagementClient

        def ready() -> list[dict[str, Any]]:
            with ManagementClient.from_env(project=PROJECT) as mgmt:
                generation = mgmt.get(slug)["generation"]
                return [
                    r
                    for r in mgmt.replicas(slug)
                    if r["phase"] == "ready" and r["generation"] == generation
                ]

        wait_until(lambda: bool(ready()), timeout=90, what=f"{slug} ready inside its window")
        return ready()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    names = ("AUTOSCALER_URL", "AUTOSCALER_SDK_TOKEN", "AUTOSCALER_GATEWAY_URL")
    saved = {k: os.environ.get(k) for k in names}
    with contextlib.ExitStack() as stack:
        service = Rehearsal(tmp_path_factory.mktemp("seed-schedules"), stack)
        os.environ.update(
            AUTOSCALER_URL=service.api,
            AUTOSCALER_SDK_TOKEN=ADMIN,
            AUTOSCALER_GATEWAY_URL=service.gateway,
        )
        try:
            yield service
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_the_daytime_chat_window_serves_inside_it(rehearsal: Rehearsal) -> None:
    window = {"window": "Mon-Fri 08:00-20:00 Europe/Madrid"}
    with rehearsal.inside(window):
        from autoscaler import Backend, DataClient, ExecutionPolicy, ManagementClient, WorkloadSpec

        mgmt = ManagementClient.from_env(project="acme")
        base = dict(
            name="Support bot",
            slug="support-bot",
            model="meta-llama/Llama-3.1-8B-Instruct",
            backend=Backend.VLLM,
            command="vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
        )
        # Scheduled: daytime-only assistant.
        mgmt.ensure(WorkloadSpec(**base,
            execution_policy=ExecutionPolicy.SCHEDULED,
            execution_policy_config={"window": "Mon-Fri 08:00-20:00 Europe/Madrid"}))  # fmt: skip
        rehearsal.wait_ready("support-bot")

        data = DataClient.from_env(project="acme")
        ep = data.endpoint("support-bot", api_key=rehearsal.data_key("support-bot"))
        out = ep.generate_text(prompt="Hola, ¿cuál es mi saldo?", temperature=0.2, max_tokens=300)
        assert out.text and out.model == "meta-llama/Llama-3.1-8B-Instruct"
        scale = mgmt.decisions("support-bot")
        assert any(
            d["kind"] == "scale" and d["reason"].startswith("scheduled (schedule clock +")
            for d in scale
        ), scale
        data.close()
        mgmt.close()


def test_the_nightly_embedding_cron_serves_inside_its_run(rehearsal: Rehearsal) -> None:
    with rehearsal.inside({"cron": "0 2 * * *"}):
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
        rehearsal.wait_ready("billing")

        # call_embedding.py
        from autoscaler import DataClient

        data = DataClient.from_env(project="acme")
        emb = data.endpoint("billing", api_key=rehearsal.data_key("billing")).embed(
            input=["invoice #42", "refund policy"]
        )
        assert len(emb.embeddings) == 2 and emb.model == "BAAI/bge-large-en-v1.5"
        data.close()
        mgmt.close()


def test_the_overnight_render_on_a_private_worker_serves_inside_its_run(
    rehearsal: Rehearsal,
) -> None:
    with rehearsal.inside({"cron": "0 1 * * *"}):
        from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

        mgmt = ManagementClient.from_env(project="acme")
        base = dict(
            name="Poster maker", slug="poster-maker",
            model="stabilityai/stable-diffusion-3.5-large", backend=Backend.VLLM_OMNI,
            task_type="text2image",
            command="vllm-omni serve stabilityai/stable-diffusion-3.5-large",
        )  # fmt: skip
        # Scheduled (private worker): batch render overnight on your hardware.
        mgmt.ensure(WorkloadSpec(**base, worker_id=rehearsal.worker_id,
            execution_policy=ExecutionPolicy.SCHEDULED,
            execution_policy_config={"cron": "0 1 * * *"}))  # fmt: skip
        [replica] = rehearsal.wait_ready("poster-maker")
        assert replica["provider"] == "private"

        # call_text2image.py
        from openai import OpenAI

        client = OpenAI(
            base_url=rehearsal.base_url("poster-maker"),
            api_key=rehearsal.data_key("poster-maker"),
        )
        img = client.images.generate(
            model="stabilityai/stable-diffusion-3.5-large",
            prompt="A neon poster of a llama coding at night",
            size="1024x1024",
        )
        assert (img.data or [])[0].url
        client.close()
        mgmt.close()


def test_the_morning_briefings_cron_serves_speech_inside_its_run(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    with rehearsal.inside({"cron": "0 6 * * *"}):
        from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

        mgmt = ManagementClient.from_env(project="acme")
        base = dict(
            name="Voice over", slug="voice-over", model="hexgrad/Kokoro-82M",
            backend=Backend.VLLM_OMNI, task_type="text2audio",
            command="vllm-omni serve hexgrad/Kokoro-82M",
        )  # fmt: skip
        # Scheduled (cloud): generate daily briefings each morning.
        mgmt.ensure(WorkloadSpec(**base,
            execution_policy=ExecutionPolicy.SCHEDULED,
            execution_policy_config={"cron": "0 6 * * *"}))  # fmt: skip
        rehearsal.wait_ready("voice-over")

        # call_text2audio.py
        from openai import OpenAI

        client = OpenAI(
            base_url=rehearsal.base_url("voice-over"),
            api_key=rehearsal.data_key("voice-over"),
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
        client.close()
        mgmt.close()


def test_the_overnight_transcription_cron_serves_inside_its_run(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    with rehearsal.inside({"cron": "0 0 * * *"}):
        from autoscaler import Backend, ExecutionPolicy, ManagementClient, WorkloadSpec

        mgmt = ManagementClient.from_env(project="acme")
        base = dict(
            name="Transcriber", slug="transcriber", model="openai/whisper-large-v3",
            backend=Backend.VLLM_OMNI, task_type="audio2text",
            command="vllm-omni serve openai/whisper-large-v3",
        )  # fmt: skip
        # Scheduled (cloud): transcribe the day's recordings overnight.
        mgmt.ensure(WorkloadSpec(**base,
            execution_policy=ExecutionPolicy.SCHEDULED,
            execution_policy_config={"cron": "0 0 * * *"}))  # fmt: skip
        rehearsal.wait_ready("transcriber")

        # call_audio2text.py
        from openai import OpenAI

        client = OpenAI(
            base_url=rehearsal.base_url("transcriber"),
            api_key=rehearsal.data_key("transcriber"),
        )
        (tmp_path / "call.mp3").write_bytes(b"ID3" + bytes(4096))
        with open(tmp_path / "call.mp3", "rb") as audio:
            tr = client.audio.transcriptions.create(
                model="openai/whisper-large-v3",
                file=audio,
            )
        assert tr.text
        client.close()
        mgmt.close()
