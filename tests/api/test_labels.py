"""Labels through the API and the SDK: stored with the spec, listed by selector, and a
selector that cannot be read answers 422 naming it."""

from __future__ import annotations

import httpx
import pytest

from autoscaler.sdk import ApiError, ManagementClient
from autoscaler.spec import WorkloadSpec
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _spec(slug: str, **labels: str) -> WorkloadSpec:
    return WorkloadSpec(name=slug, slug=slug, model="m", labels=labels)


def test_list_by_selector_through_the_sdk_and_raw_http(api_server: ApiServer) -> None:
    with ManagementClient(url=api_server.url, token=ADMIN_TOKEN, project="acme") as client:
        client.ensure(_spec("chat", team="search", tier="prod"))
        client.ensure(_spec("embed", team="search"))
        client.ensure(_spec("ads-bot", team="ads"))

        assert {w["slug"] for w in client.list(labels="team=search")} == {"chat", "embed"}
        assert [w["slug"] for w in client.list(labels="team=search,!tier")] == ["embed"]
        assert len(client.list()) == 3
        assert client.get("chat")["spec"]["labels"] == {"team": "search", "tier": "prod"}

        with pytest.raises(ApiError) as info:
            client.list(labels="team=a b")
        assert (info.value.status, info.value.code) == (422, "invalid_selector")
        assert info.value.details[0]["path"] == "label_selector"

    raw = httpx.get(
        f"{api_server.url}/v1/projects/acme/workloads",
        params={"label_selector": "team!=search"},
        headers=HEADERS,
    )
    assert [w["slug"] for w in raw.json()["items"]] == ["ads-bot"]


def test_a_bad_label_is_refused_at_apply_and_nothing_is_stored(api_server: ApiServer) -> None:
    url = f"{api_server.url}/v1/projects/acme/workloads/chat"
    body = {"name": "chat", "slug": "chat", "model": "m", "labels": {"team": "has space"}}
    response = httpx.put(url, json=body, headers=HEADERS)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["path"] == "labels"
    assert "has space" in detail["message"]
    assert httpx.get(url, headers=HEADERS).status_code == 404


def test_a_merge_patch_sets_and_removes_single_labels(api_server: ApiServer) -> None:
    url = f"{api_server.url}/v1/projects/acme/workloads/chat"
    with ManagementClient(url=api_server.url, token=ADMIN_TOKEN, project="acme") as client:
        client.ensure(_spec("chat", team="search", tier="prod"))
    patched = httpx.patch(
        url,
        json={"labels": {"tier": None, "owner": "ana"}},
        headers={**HEADERS, "Content-Type": "application/merge-patch+json"},
    )
    assert patched.status_code == 200, patched.text
    assert httpx.get(url, headers=HEADERS).json()["spec"]["labels"] == {
        "owner": "ana",
        "team": "search",
    }
