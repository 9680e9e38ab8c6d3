"""A live management API serving the boot callback, and launches written to its store."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api.app import create_app
from autoscaler.api.boot import BootSecrets, configure_boot
from autoscaler.api.deps import ApiState
from autoscaler.reconcile.provisioner import boot_token, new_launch_id
from autoscaler.service import ensure_admin_token, utc_now
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from autoscaler.store.workloads import ensure_workload
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

HF_TOKEN = "hf_" + "e" * 34


class BootApiServer(ApiServer):
    """The management API as ``autoscaler run`` serves it, counting controller wake-ups."""

    def __init__(self, database_url: str, *, secrets: BootSecrets | None = None) -> None:
        super().__init__(database_url)
        self.secrets = secrets
        self.wakes = 0

    def _wake(self) -> None:
        self.wakes += 1

    async def _serve(self) -> None:
        async with open_store(self.database_url) as engine:
            sessions = session_factory(engine)
            await ensure_admin_token(sessions, announce=lambda _text: None)
            app = create_app(ApiState(sessions=sessions, now=utc_now, on_change=self._wake))
            if self.secrets is not None:
                configure_boot(app, self.secrets)
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
            self._server = uvicorn.Server(config)
            await self._server.serve()


@pytest.fixture
def boot_api(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[BootApiServer]:
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    server = BootApiServer(database_url)
    with server:
        yield server


@pytest.fixture
async def store(
    boot_api: BootApiServer, database_url: str
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The API's database, opened from the test (as the controller would)."""
    async with open_store(database_url) as engine:
        yield session_factory(engine)


@dataclass(frozen=True)
class Launch:
    launch_id: str
    engine_key: str

    @property
    def token(self) -> str:
        return boot_token(launch_id=self.launch_id, engine_key=self.engine_key)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


async def add_launch(
    sessions: async_sessionmaker[AsyncSession],
    *,
    backend: str = "vllm",
    terminate_requested_at: datetime | None = None,
    terminated_confirmed_at: datetime | None = None,
    spec_extra: dict[str, Any] | None = None,
) -> Launch:
    """A booting AWS replica of a workload (its spec's fields ``spec_extra`` added), as
    the provisioner records it."""
    now = datetime.now(UTC)
    spec = WorkloadSpec.model_validate(
        {
            "name": "chat",
            "slug": f"chat-{backend}",
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "backend": backend,
            "execution_policy": "fixed",
            "execution_policy_config": {"replicas": 1},
            **(spec_extra or {}),
        }
    )
    launch = Launch(new_launch_id(), secrets.token_urlsafe(24))
    async with sessions() as s, s.begin():
        result = await ensure_workload(
            s, project="acme", spec=spec, on_drift=OnDrift.RECONCILE, now=now
        )
        s.add(
            Instance(
                launch_id=launch.launch_id,
                workload_id=result.workload.id,
                project="acme",
                workload_slug=spec.slug,
                spec_generation=1,
                provider="aws",
                offer_key="aws/us-east-1a/g5.xlarge",
                region="us-east-1",
                zone="us-east-1a",
                instance_type="g5.xlarge",
                gpu="NVIDIA A10G",
                gpu_count=1,
                hourly_usd=1.006,
                instance_id="i-0123456789abcdef0",
                url="http://10.0.0.7:8000",
                engine_key=launch.engine_key,
                intent_at=now,
                launched_at=now,
                terminate_requested_at=terminate_requested_at,
                terminated_confirmed_at=terminated_confirmed_at,
            )
        )
    return launch
