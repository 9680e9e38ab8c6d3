"""The CLI as a user runs it: subprocesses against a running ``autoscaler run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import Process, RunningService, autoscaler_cli, free_port, http_ok, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
ADMIN = "ik_sdk_cli-test-admin-" + "y" * 20


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """One ``autoscaler run`` for the module; each test works in a project of its own."""
    api_port, gateway_port = free_port(), free_port()
    env = {
        "AUTOSCALER_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "AUTOSCALER_ADMIN_TOKEN": ADMIN,
    }
    argv = autoscaler_cli("run", "--api-port", str(api_port), "--gateway-port", str(gateway_port))
    url = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=url, token=ADMIN, project="unused") as service:
        yield service


@pytest.fixture
def service(running: RunningService, request: pytest.FixtureRequest) -> RunningService:
    project = request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    return running.with_project(project)


def test_apply_twice_then_edit(service: RunningService, tmp_path: Path) -> None:
    path = tmp_path / "bot.yaml"
    shutil.copy(EXAMPLES / "chat-fixed.yaml", path)

    first = service.cli("apply", "-f", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "workload/support-bot created (generation 1)"

    second = service.cli("apply", "-f", str(path))
    assert second.stdout.strip() == "workload/support-bot unchanged (generation 1)"

    doc = yaml.safe_load(path.read_text())
    doc["execution_policy_config"]["replicas"] = 2
    path.write_text(yaml.safe_dump(doc))
    third = service.cli("apply", "-f", str(path))
    assert third.returncode == 0
    assert "workload/support-bot updated (generation 2)" in third.stdout
    assert "execution_policy_config.replicas: 1 -> 2" in third.stdout

    listed = service.cli("get")
    assert listed.returncode == 0
    header, row = listed.stdout.strip().splitlines()
    assert header.split()[:3] == ["SLUG", "NAME", "MODEL"]
    assert row.startswith("support-bot") and "fixed x2" in row

    described = service.cli("describe", "support-bot")
    assert described.returncode == 0
    assert "Generation:  2" in described.stdout
    assert "meta-llama/Llama-3.1-8B-Instruct" in described.stdout
    assert "Replicas" in described.stdout and "Recent decisions" in described.stdout

    as_json = json.loads(service.cli("get", "support-bot", "-o", "json").stdout)
    assert as_json["generation"] == 2


def test_bad_file_exits_2_naming_the_field_and_changes_nothing(
    service: RunningService, tmp_path: Path
) -> None:
    good = tmp_path / "good.yaml"
    shutil.copy(EXAMPLES / "chat-fixed.yaml", good)
    assert service.cli("apply", "-f", str(good)).returncode == 0

    doc = yaml.safe_load(good.read_text())
    bad_docs = [
        {**doc, "model": "changed/but-not-applied"},
        {
            **doc,
            "slug": "second",
            "execution_policy": "autoscaling",
            "execution_policy_config": {"min_replicas": 1, "max_workers": 2},
        },
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(bad_docs))
    result = service.cli("apply", "-f", str(bad))
    assert result.returncode == 2
    assert "document 2 (second): execution_policy_config" in result.stderr
    assert "did you mean 'min_workers'" in result.stderr

    after = json.loads(service.cli("get", "-o", "json").stdout)
    assert [(w["slug"], w["spec"]["model"], w["generation"]) for w in after] == [
        ("support-bot", "meta-llama/Llama-3.1-8B-Instruct", 1)
    ]


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("empty.yaml", "", "no workload documents"),
        ("comments.yaml", "# nothing here\n", "no workload documents"),
        ("broken.yaml", "name: [unclosed\n", "not valid YAML/JSON"),
        ("broken.json", "{", "not valid YAML/JSON"),
        ("scalar.yaml", "just a string\n", "document 1 is not a mapping"),
    ],
)
def test_unreadable_files_exit_2(
    service: RunningService, tmp_path: Path, name: str, text: str, says: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = service.cli("apply", "-f", str(path))
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


def test_a_command_the_engine_refuses_exits_2_and_stores_nothing(
    service: RunningService, tmp_path: Path
) -> None:
    doc = yaml.safe_load((EXAMPLES / "chat-fixed.yaml").read_text())
    doc["command"] = "autoscaler engine-sim --model x"
    path = tmp_path / "bad-command.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = service.cli("apply", "-f", str(path))
    assert result.returncode == 2
    assert "command: command serves model 'autoscaler'" in result.stderr
    assert json.loads(service.cli("get", "-o", "json").stdout) == []


def test_a_live_endpoint_that_may_scale_to_zero_exits_2_with_the_reason(
    service: RunningService, tmp_path: Path
) -> None:
    doc = yaml.safe_load((EXAMPLES / "chat-fixed.yaml").read_text())
    doc.update(endpoint_type="streaming", per_worker=1, execution_policy_config={"replicas": 0})
    path = tmp_path / "streaming.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = service.cli("apply", "-f", str(path))
    assert result.returncode == 2
    assert "endpoint_type: endpoint_type 'streaming' needs at least one replica" in result.stderr
    assert "replicas is 0, allowed: 1 or more" in result.stderr
    assert json.loads(service.cli("get", "-o", "json").stdout) == []


def test_get_lists_by_label_selector(service: RunningService) -> None:
    assert service.cli("apply", "-f", str(EXAMPLES / "chat-fixed.yaml")).returncode == 0
    assert service.cli("apply", "-f", str(EXAMPLES / "embedding-fixed.yaml")).returncode == 0

    chosen = json.loads(service.ok("get", "-l", "team=support", "-o", "json"))
    assert [w["slug"] for w in chosen] == ["support-bot"]
    assert len(json.loads(service.ok("get", "-l", "!team", "-o", "json"))) == 1
    assert "team=support" in service.ok("get", "-l", "team")

    bad = service.cli("get", "-l", "team=a b")
    assert bad.returncode == 2
    assert "label_selector" in bad.stderr and "Traceback" not in bad.stderr


def test_apply_every_example_in_one_file_list(service: RunningService, tmp_path: Path) -> None:
    # The private-worker example names placeholder ids: register a worker for each.
    placeholders = ("wrk_0123456789abcdef", "wrk_fedcba9876543210")
    workers = [
        json.loads(service.ok("workers", "register", "-o", "json"))["id"] for _ in placeholders
    ]
    files = []
    for example in sorted(EXAMPLES.glob("*.yaml")):
        if example.name.startswith("config-"):
            continue  # a controller configuration, not a workload
        text = example.read_text()
        for placeholder, worker in zip(placeholders, workers, strict=True):
            text = text.replace(placeholder, worker)
        copy = tmp_path / example.name
        copy.write_text(text)
        files.append(copy)
    args = [arg for f in files for arg in ("-f", str(f))]
    result = service.cli("apply", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" created (generation 1)") == len(files)
    assert len(json.loads(service.cli("get", "-o", "json").stdout)) == len(files)


def test_keys_lifecycle_and_delete(service: RunningService) -> None:
    assert service.cli("apply", "-f", str(EXAMPLES / "chat-fixed.yaml")).returncode == 0
    created = json.loads(service.cli("keys", "create", "support-bot", "-o", "json").stdout)
    assert created["secret"].startswith("ik_live_")
    listed = service.cli("keys", "list", "support-bot")
    assert created["id"] in listed.stdout and created["secret"] not in listed.stdout
    assert service.cli("keys", "revoke", "support-bot", created["id"]).returncode == 0
    deleted = service.cli("delete", "support-bot")
    assert deleted.stdout.strip() == "workload/support-bot deleted"
    missing = service.cli("get", "support-bot")
    assert missing.returncode == 1
    assert "no workload 'support-bot'" in missing.stderr


def test_missing_token_and_unreachable_server_are_clear(service: RunningService) -> None:
    env = {k: v for k, v in service.env.items() if k != "AUTOSCALER_SDK_TOKEN"}
    no_token = subprocess.run(autoscaler_cli("get"), env=env, capture_output=True, text=True)
    assert no_token.returncode == 2
    assert "AUTOSCALER_SDK_TOKEN" in no_token.stderr
    down = subprocess.run(
        autoscaler_cli("get", "--url", f"http://127.0.0.1:{free_port()}"),
        env=service.env,
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1
    assert "cannot reach the management API" in down.stderr


def test_first_start_prints_an_admin_token_once(tmp_path: Path) -> None:
    port = free_port()
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ""}
    argv = autoscaler_cli("run", "--api-port", str(port), "--gateway-port", str(free_port()))
    outputs = []
    for _ in range(2):
        with Process(argv, env=env) as proc:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="run")
            outputs.append(proc.stop())
    assert "export AUTOSCALER_SDK_TOKEN=ik_sdk_" in outputs[0]
    assert "AUTOSCALER_SDK_TOKEN" not in outputs[1]


def test_patch_changes_part_of_a_workload(service: RunningService) -> None:
    assert service.cli("apply", "-f", str(EXAMPLES / "chat-fixed.yaml")).returncode == 0
    done = service.cli(
        "patch", "support-bot", "--patch", '{"execution_policy_config": {"replicas": 2}}'
    )
    assert done.returncode == 0, done.stderr
    assert "workload/support-bot updated (generation 2)" in done.stdout
    assert "execution_policy_config.replicas: 1 -> 2" in done.stdout
    stored = json.loads(service.ok("get", "support-bot", "-o", "json"))
    assert stored["spec"]["execution_policy_config"]["replicas"] == 2
    assert stored["spec"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"

    bad = service.cli("patch", "support-bot", "--patch", "backend: tgi")
    assert bad.returncode == 2
    assert "backend: unknown backend 'tgi'" in bad.stderr
    assert json.loads(service.ok("get", "support-bot", "-o", "json"))["generation"] == 2


def test_edit_applies_what_the_editor_saved(service: RunningService, tmp_path: Path) -> None:
    assert service.cli("apply", "-f", str(EXAMPLES / "chat-fixed.yaml")).returncode == 0
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nsed -i "s/replicas: 1/replicas: 3/" "$1"\n')
    editor.chmod(0o755)
    env = {**service.env, "EDITOR": str(editor), "VISUAL": str(editor)}
    done = subprocess.run(
        autoscaler_cli("edit", "support-bot"), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "workload/support-bot updated (generation 2)" in done.stdout
    stored = json.loads(service.ok("get", "support-bot", "-o", "json"))
    assert stored["spec"]["execution_policy_config"]["replicas"] == 3

    untouched = {**service.env, "EDITOR": "true", "VISUAL": "true"}
    same = subprocess.run(
        autoscaler_cli("edit", "support-bot"), env=untouched, capture_output=True, text=True
    )
    assert same.returncode == 0 and "unchanged" in same.stdout


@pytest.mark.parametrize("role", ["run", "controller"])
def test_a_bad_schedule_offset_exits_2_naming_the_option(role: str, tmp_path: Path) -> None:
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        autoscaler_cli(role, "--schedule-offset", "9 hours"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--schedule-offset" in done.stderr
    assert "'9 hours' is not like '+9h', '-30m', '1h30m' or a number of seconds" in done.stderr
