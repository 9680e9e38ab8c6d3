"""A PUT of the spec already stored changes nothing: the generation stays, and neither
the controller nor the gateway is woken to look again."""

from __future__ import annotations

from typing import Any

import httpx

from tests.boot.conftest import BootApiServer
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SPEC: dict[str, Any] = {
    "name": "Support bot",
    "slug": "support-bot",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "execution_policy": "fixed",
    "execution_policy_config": {"replicas": 1},
}


def test_an_unchanged_put_keeps_the_generation_and_wakes_nothing(
    boot_api: BootApiServer,
) -> None:
    url = f"{boot_api.url}/v1/projects/acme/workloads/support-bot"
    created = httpx.put(url, json=SPEC, headers=AUTH)
    assert created.status_code == 201, created.text
    assert boot_api.wakes == 1
    again = httpx.put(url, json=SPEC, headers=AUTH)
    assert again.status_code == 200, again.text
    assert (again.json()["action"], again.json()["generation"]) == ("unchanged", 1)
    assert again.json()["workload"]["updated_at"] == created.json()["workload"]["updated_at"]
    assert boot_api.wakes == 1
    changed = httpx.put(
        url, json={**SPEC, "execution_policy_config": {"replicas": 2}}, headers=AUTH
    )
    assert (changed.json()["action"], changed.json()["generation"]) == ("updated", 2)
    assert boot_api.wakes == 2  # a changed spec is still picked up at once
