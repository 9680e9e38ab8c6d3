"""Engine keys are encrypted at rest; the code around the ledger sees them in the clear."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from autoscaler.spec import OnDrift
from autoscaler.store import sealed
from autoscaler.store import secrets as secrets_store
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.workloads import ensure_workload
from providers.base import utc
from tests.reconcile.world import fixed

KEY = bytes(range(32))


@pytest.fixture
def sealing() -> Iterator[None]:
    sealed.use_key(KEY)
    yield
    sealed.use_key(None)


def _row(engine_key: str, *, workload_id: int) -> LedgerRow:
    return LedgerRow(
        launch_id="ln-sealed",
        workload_id=workload_id,
        project="acme",
        workload_slug="bot",
        spec_generation=1,
        provider="aws",
        offer_key="aws/us-east-1a/g6.xlarge",
        region="us-east-1",
        zone="us-east-1a",
        instance_type="g6.xlarge",
        gpu="NVIDIA L4",
        gpu_count=1,
        spot=False,
        hourly_usd=0.8,
        engine_key=engine_key,
        intent_at=utc(1_750_000_000),
    )


async def test_the_stored_engine_key_is_sealed_and_reads_back_in_the_clear(
    tmp_path: Path, sealing: None
) -> None:
    secret = "k" * 32
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        sessions = session_factory(engine)
        async with sessions() as s, s.begin():
            made = await ensure_workload(
                s, project="acme", spec=fixed("bot"), on_drift=OnDrift.RECONCILE, now=utc(0)
            )
            s.add(_row(secret, workload_id=made.workload.id))
        async with engine.connect() as conn:
            raw = await conn.scalar(text("SELECT engine_key FROM instances"))
        async with sessions() as s:
            row = await s.get(LedgerRow, "ln-sealed")
    assert raw.startswith(sealed.PREFIX) and secret not in raw
    assert len(raw) <= 100  # fits the column on PostgreSQL
    assert row is not None and row.engine_key == secret
    assert secret.encode() not in (tmp_path / "state.db").read_bytes()


def test_another_key_cannot_open_it_and_says_what_to_set() -> None:
    sealed_text = sealed.Sealer(KEY).seal("k" * 32)
    with pytest.raises(sealed.SecretKeyError) as caught:
        sealed.Sealer(bytes(32)).open(sealed_text)
    assert sealed.KEY_ENV in str(caught.value)


def test_the_key_comes_from_the_environment_or_an_owner_only_file(tmp_path: Path) -> None:
    encoded = base64.urlsafe_b64encode(KEY).decode()
    assert sealed.load_key(None, environ={sealed.KEY_ENV: encoded}) == KEY
    key_file = tmp_path / "given.key"
    key_file.write_text(encoded + "\n")
    assert sealed.load_key(None, environ={sealed.KEY_FILE_ENV: str(key_file)}) == KEY
    made = sealed.load_key(tmp_path / "data", environ={})
    assert made is not None and len(made) == 32
    path = tmp_path / "data" / sealed.KEY_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sealed.load_key(tmp_path / "data", environ={}) == made  # kept across starts
    assert sealed.load_key(None, environ={}) is None


async def test_a_stored_secret_that_looks_sealed_is_sealed_all_the_same(
    tmp_path: Path, sealing: None
) -> None:
    value = sealed.PREFIX + "my-token-value"
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        sessions = session_factory(engine)
        async with sessions() as s, s.begin():
            await secrets_store.create_secret(s, project="acme", name="hf", value=value, now=utc(0))
        async with engine.connect() as conn:
            raw = await conn.scalar(text("SELECT value FROM secrets"))
        async with sessions() as s:
            [stored] = await secrets_store.list_secrets(s, project="acme")
    assert raw != value and "my-token-value" not in raw
    assert stored.value == value
