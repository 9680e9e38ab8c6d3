"""The boot callback routes on a live API (SQLite and PostgreSQL): secrets for the
instance that proves itself, status reports stored as facts, the right refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api.boot import BootSecrets
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from tests.boot.conftest import HF_TOKEN, BootApiServer, Launch, add_launch
from tests.conftest import ADMIN_TOKEN

Sessions = async_sessionmaker[AsyncSession]


def _url(api: BootApiServer, launch_id: str, what: str) -> str:
    return f"{api.url}/v1/boot/{launch_id}/{what}"


async def _row(store: Sessions, launch_id: str) -> Instance:
    async with store() as s:
        row = await s.get(Instance, launch_id)
    assert row is not None
    return row


async def test_the_instance_gets_its_engine_key_and_the_hf_token_as_an_env_file(
    boot_api: BootApiServer, store: Sessions
) -> None:
    launch = await add_launch(store)
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            _url(boot_api, launch.launch_id, "secrets"), headers=launch.auth()
        )

    assert answer.status_code == 200
    assert answer.text.splitlines() == [
        f"ENGINE_API_KEY={launch.engine_key}",
        f"HF_TOKEN={HF_TOKEN}",
    ]
    assert answer.headers["cache-control"] == "no-store"


async def test_an_engine_without_an_api_key_gets_no_engine_key(
    boot_api: BootApiServer, store: Sessions
) -> None:
    launch = await add_launch(store, backend="ollama")
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            _url(boot_api, launch.launch_id, "secrets"), headers=launch.auth()
        )

    assert answer.status_code == 200
    assert answer.text.splitlines() == [f"HF_TOKEN={HF_TOKEN}"]


@pytest.mark.parametrize("what", ["secrets", "status"])
async def test_a_wrong_missing_or_other_launchs_token_is_401(
    boot_api: BootApiServer, store: Sessions, what: str
) -> None:
    launch, other = await add_launch(store), await add_launch(store)
    body = {"launch_id": launch.launch_id, "state": "ready", "reason": ""}
    async with httpx.AsyncClient() as client:
        for headers in (
            {},
            launch.auth("0" * 64),
            other.auth(),  # another instance's token
            {"Authorization": f"Bearer {ADMIN_TOKEN}"},  # a control token is not a boot token
            {"Authorization": f"Bearer {launch.engine_key}"},  # nor is the engine key
        ):
            url = _url(boot_api, launch.launch_id, what)
            answer = await (
                client.get(url, headers=headers)
                if what == "secrets"
                else client.post(url, headers=headers, json=body)
            )
            assert answer.status_code == 401, headers
            assert launch.engine_key not in answer.text
            assert answer.json()["error"]["code"] == "unauthorized"
    assert boot_api.wakes == 0


async def test_an_unknown_launch_is_404(boot_api: BootApiServer, store: Sessions) -> None:
    launch = await add_launch(store)
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            _url(boot_api, "ln-00000000000000000000", "secrets"), headers=launch.auth()
        )

    assert answer.status_code == 404
    assert "ln-00000000000000000000" in answer.json()["error"]["message"]


@pytest.mark.parametrize("fact", ["terminate_requested_at", "terminated_confirmed_at"])
async def test_a_launch_being_terminated_or_gone_is_410(
    boot_api: BootApiServer, store: Sessions, fact: str
) -> None:
    now = datetime.now(UTC)
    if fact == "terminate_requested_at":
        launch = await add_launch(store, terminate_requested_at=now)
    else:
        launch = await add_launch(store, terminate_requested_at=now, terminated_confirmed_at=now)
    async with httpx.AsyncClient() as client:
        secrets = await client.get(
            _url(boot_api, launch.launch_id, "secrets"), headers=launch.auth()
        )
        status = await client.post(
            _url(boot_api, launch.launch_id, "status"),
            headers=launch.auth(),
            json={"launch_id": launch.launch_id, "state": "ready"},
        )

    assert secrets.status_code == status.status_code == 410
    assert launch.engine_key not in secrets.text


async def test_failed_is_stored_as_last_error_and_wakes_the_controller(
    boot_api: BootApiServer, store: Sessions
) -> None:
    launch = await add_launch(store)
    reason = "NVIDIA driver 535.104.05 is older than 550.54.14, which CUDA 12.4 needs"
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            _url(boot_api, launch.launch_id, "status"),
            headers=launch.auth(),
            json={"launch_id": launch.launch_id, "state": "failed", "reason": reason},
        )

    assert answer.status_code == 202
    row = await _row(store, launch.launch_id)
    assert row.last_error == f"boot failed: {reason}"
    assert row.ready_at is None and row.terminate_requested_at is None  # liveness acts on it
    assert boot_api.wakes == 1


async def test_ready_alone_does_not_make_a_replica_serve(
    boot_api: BootApiServer, store: Sessions
) -> None:
    launch = await add_launch(store)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            _url(boot_api, launch.launch_id, "status"),
            headers=launch.auth(),
            json={"launch_id": launch.launch_id, "state": "ready", "reason": ""},
        )

    assert answer.status_code == 202
    assert answer.json()["phase"] == "booting"
    row = await _row(store, launch.launch_id)
    assert row.ready_at is None and row.last_error is None  # the health check decides
    assert boot_api.wakes == 1


def _ec2_notice(at: datetime) -> str:
    when = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f'ec2 spot interruption notice: {{"action": "terminate", "time": "{when}"}}'


async def test_a_spot_notice_records_the_reclaim_and_drains_only_a_close_one(
    boot_api: BootApiServer, store: Sessions
) -> None:
    """EC2's notice carries its action time: a serving replica two minutes from it keeps
    serving (the controller drains it when due), one within the drain margin is drained
    at once, a booting one is left to the controller to terminate."""
    later, close = await add_launch(store), await add_launch(store)
    booting = await add_launch(store, backend="sglang")
    async with store() as s, s.begin():
        await s.execute(
            update(Instance)
            .where(Instance.launch_id.in_([later.launch_id, close.launch_id]))
            .values(ready_at=datetime.now(UTC))
        )
    now = datetime.now(UTC).replace(microsecond=0)
    notices = {
        later.launch_id: _ec2_notice(now + timedelta(seconds=120)),
        close.launch_id: _ec2_notice(now + timedelta(seconds=20)),
        booting.launch_id: _ec2_notice(now + timedelta(seconds=120)),
    }

    async with httpx.AsyncClient() as client:
        answers = [
            await client.post(
                _url(boot_api, launch.launch_id, "status"),
                headers=launch.auth(),
                json={
                    "launch_id": launch.launch_id,
                    "state": "interrupted",
                    "reason": notices[launch.launch_id],
                },
            )
            for launch in (later, close, booting)
        ]

    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.json()["phase"] for a in answers] == ["ready", "draining", "booting"]
    serving = await _row(store, later.launch_id)
    assert serving.last_error == f"spot notice: {notices[later.launch_id]}"
    assert serving.reclaim_at == now + timedelta(seconds=120)
    assert serving.drain_requested_at is None and serving.terminate_requested_at is None
    drained = await _row(store, close.launch_id)
    assert drained.drain_requested_at is not None and drained.terminate_requested_at is None
    still_booting = await _row(store, booting.launch_id)
    assert (still_booting.last_error or "").startswith(f"spot notice: {notices[booting.launch_id]}")
    assert still_booting.drain_requested_at is None  # the controller terminates it
    assert boot_api.wakes == 3


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"launch_id": "ln-someone-else", "state": "ready"}, "launch_id"),
        ({"state": "booted"}, "state"),
        ({"state": "failed", "reason": "x" * 2001}, "reason"),
    ],
)
async def test_a_bad_report_is_422_naming_the_field(
    boot_api: BootApiServer, store: Sessions, body: dict[str, str], names: str
) -> None:
    launch = await add_launch(store)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            _url(boot_api, launch.launch_id, "status"),
            headers=launch.auth(),
            json={"launch_id": launch.launch_id, **body},
        )

    assert answer.status_code == 422
    assert names in answer.text
    assert (await _row(store, launch.launch_id)).last_error is None


async def test_hf_token_file_of_the_config_wins_and_an_unreadable_one_is_503(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_from_the_file\n")
    api = BootApiServer(database_url, secrets=BootSecrets(hf_token_file=token_file))
    with api:
        async with open_store(database_url) as engine:
            launch = await add_launch(session_factory(engine))
        url = _url(api, launch.launch_id, "secrets")
        async with httpx.AsyncClient() as client:
            from_file = await client.get(url, headers=launch.auth())
            token_file.unlink()
            unreadable = await client.get(url, headers=launch.auth())

    assert from_file.text.splitlines()[-1] == "HF_TOKEN=hf_from_the_file"
    assert unreadable.status_code == 503
    assert f"cannot read hf_token_file {token_file}" in unreadable.json()["error"]["message"]
    assert launch.engine_key not in unreadable.text


async def _set_row(store: Sessions, launch_id: str, **values: Any) -> None:
    async with store() as s, s.begin():
        await s.execute(update(Instance).where(Instance.launch_id == launch_id).values(**values))


async def _group_of_two(store: Sessions, **values: Any) -> tuple[Launch, Launch]:
    """Two launches on record as one replica group: (leader, worker)."""
    leader = await add_launch(store)
    worker = await add_launch(store)
    for launch, role in ((leader, "leader"), (worker, "worker")):
        await _set_row(
            store,
            launch.launch_id,
            group_id=leader.launch_id,
            group_role=role,
            group_size=2,
            **values,
        )
    return leader, worker


async def test_a_group_worker_learns_its_leaders_address_once_the_leader_is_launched(
    boot_api: BootApiServer, store: Sessions
) -> None:
    leader, worker = await _group_of_two(store, url=None)
    async with httpx.AsyncClient() as client:
        before = await client.get(_url(boot_api, worker.launch_id, "group"), headers=worker.auth())
        await _set_row(store, leader.launch_id, url="http://10.0.0.5:8000")
        after = await client.get(_url(boot_api, worker.launch_id, "group"), headers=worker.auth())
        # engines reached through a tunnel
        await _set_row(
            store, leader.launch_id, url="http://127.0.0.1:18000", private_address="10.0.0.9"
        )
        tunnelled = await client.get(
            _url(boot_api, worker.launch_id, "group"), headers=worker.auth()
        )
        other = await client.get(_url(boot_api, worker.launch_id, "group"), headers=leader.auth())
        lone = await add_launch(store)
        alone = await client.get(_url(boot_api, lone.launch_id, "group"), headers=lone.auth())

    assert before.json() == {"role": "worker", "size": 2, "leader_address": None}
    assert after.json() == {"role": "worker", "size": 2, "leader_address": "10.0.0.5"}
    # the machine's own private address, not the tunnel's
    assert tunnelled.json() == {"role": "worker", "size": 2, "leader_address": "10.0.0.9"}
    assert other.status_code == 401  # a member proves itself with its own token only
    assert alone.status_code == 404


async def test_a_group_workers_ready_is_its_check_in_and_a_leaders_is_not(
    boot_api: BootApiServer, store: Sessions
) -> None:
    leader, worker = await _group_of_two(store)
    async with httpx.AsyncClient() as client:
        for launch in (leader, worker):
            answer = await client.post(
                _url(boot_api, launch.launch_id, "status"),
                headers=launch.auth(),
                json={"launch_id": launch.launch_id, "state": "ready", "reason": ""},
            )
            assert answer.status_code == 202

    joined = (await _row(store, worker.launch_id)).joined_at
    assert joined is not None and joined <= datetime.now(UTC)
    assert (await _row(store, leader.launch_id)).joined_at is None  # its health decides
    for launch in (leader, worker):
        assert (await _row(store, launch.launch_id)).ready_at is None
