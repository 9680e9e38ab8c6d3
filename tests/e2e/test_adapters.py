"""LoRA adapters through ``autoscaler run`` on this machine: a workload with
``llm_loras`` boots engine-sim replicas with vLLM's adapter flags, ``describe`` shows
them, the real ``openai`` SDK lists the adapters and calls ``model="<adapter>"`` through
the gateway, and adding an adapter rolls the replicas, the new name answered once a
replica booted with it is ready."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers import RunningService, free_port, run_argv, wait_until

ADMIN = "ik_sdk_e2e-lora-admin-" + "z" * 20
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SPEC = {
    "name": "Adapters",
    "slug": "adapters",
    "model": MODEL,
    "llm_loras": [{"name": "sql", "source": "acme/llama-3.1-8b-sql-lora"}],
    "execution_policy": "fixed",
    "execution_policy_config": {"replicas": 1},
}

pytestmark = pytest.mark.slow


def test_adapters_are_loaded_listed_routed_and_rolled(tmp_path: Path) -> None:
    api_port, gateway_port = free_port(), free_port()
    spec_file = tmp_path / "adapters.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    config = tmp_path / "controller.yaml"
    config.write_text("cluster_id: laptop\ntick_sec: 1\nproviders:\n  local: {}\n")
    argv = run_argv(api_port=api_port, gateway_port=gateway_port, config=config)
    api = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo") as service:
        cli = service.ok
        assert "created" in cli("apply", "-f", str(spec_file))
        replicas_url = f"{api}/v1/projects/demo/workloads/adapters/replicas"

        def ready() -> list[dict[str, object]]:
            answer = httpx.get(replicas_url, headers={"Authorization": f"Bearer {ADMIN}"})
            return [r for r in answer.json()["items"] if r["phase"] == "ready"]

        wait_until(lambda: len(ready()) == 1, timeout=60, what="a ready replica")
        described = cli("describe", "adapters")
        assert "--enable-lora --max-loras 1 --lora-modules sql=acme/llama-3.1-8b-sql-lora" in (
            described
        )

        key = cli("keys", "create", "adapters").split("secret:")[1].split()[0]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/endpoint/demo/adapters/v1",
            api_key=key,
            max_retries=0,
            timeout=60,
        )
        wait_until(lambda: _key_works(client), timeout=10, what="the new data key")
        models = {m.id: m for m in client.models.list()}
        assert list(models) == [MODEL, "sql"]
        assert models["sql"].model_extra == {"root": "acme/llama-3.1-8b-sql-lora", "parent": MODEL}
        for name in ("sql", MODEL):
            answer = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert answer.model == name
            assert answer.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert "The model `nope` does not exist." in str(unknown.value)

        # Adding an adapter rolls the replica; the gateway holds a request for the new
        # adapter until a replica booted with it is ready, then sends it there.
        patch = '{"llm_loras": [{"name": "sql", "source": "acme/llama-3.1-8b-sql-lora"}, ' + (
            '{"name": "support", "source": "/models/support-lora"}]}'
        )
        assert "updated" in cli("patch", "adapters", "--patch", patch)
        wait_until(
            lambda: "support" in [m.id for m in client.models.list()],
            timeout=10,
            what="the new adapter listed",
        )
        answer = client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.model == "support"
        wait_until(lambda: len(ready()) == 1, timeout=60, what="the rollout to finish")
        assert "support=/models/support-lora" in cli("describe", "adapters")
        service.stop()


def _key_works(client: openai.OpenAI) -> bool:
    try:
        client.models.list()
    except openai.AuthenticationError:
        return False
    return True
