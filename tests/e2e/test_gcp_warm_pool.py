"""A warm pool on GCE, run by the ``autoscaler controller`` command against a local fake of
the Compute REST API (``tests/fakes/gcp_compute.py``), configured as a user would: the
project, a zone, the API endpoint and a service account key file (whose token requests
the fake answers). A replica is refilled and stopped; the controller is killed with
SIGKILL while GCE still shows the VM ``STOPPING``; a new controller confirms the stop from
GCE, bills the stopped VM for its boot disk, starts it when a request comes, and the
replica serves (its engine is an engine-sim process at the address every VM is reached
by). The ledger is checked against GCE at each step."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sqlalchemy import update

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.workloads import ensure_workload
from catalog.snapshot import Snapshot, snapshot_path, write_snapshot
from catalog.storage import stopped_usd_per_hour
from tests.e2e.test_aws_moto import _controller_argv, _ledger, _start, _stop
from tests.e2e.test_aws_warm_pool import _spec as warm_spec
from tests.fakes.gcp_compute import FakeGceServer
from tests.helpers import Process, autoscaler_cli, free_port, http_ok, wait_until
from tests.providers.test_gcp import OFFER, ZONE

pytestmark = pytest.mark.slow

PROJECT = "acme-serving"
L4 = OFFER  # g2-standard-4, one NVIDIA L4, in us-central1-a
CATALOG = Snapshot(offers=(L4,), taken_at=datetime.now(UTC), source="test catalog")


def _key_file(path: Path, token_uri: str) -> Path:
    """A service account key as the console downloads it, its token endpoint the fake's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    document = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": f"autoscaler@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


def _spec() -> WorkloadSpec:
    return warm_spec(gpu=L4.gpu)


def _vms(gce: FakeGceServer) -> dict[str, str]:
    """The fake's VMs as the controller names their ids (``zone/name``), with status."""
    with gce._lock:
        return {f"{zone}/{name}": vm["status"] for (zone, name), vm in gce.instances.items()}


def test_a_stopped_vm_survives_a_sigkill_and_serves_again(tmp_path: Path) -> None:
    gce = FakeGceServer()
    gce.start()
    gce.hold_stops = True  # the first stop stays STOPPING until the controller is killed
    gce.settle_every(0.2)
    engine_port = free_port()
    model = _spec().model
    engine = Process(autoscaler_cli("engine-sim", "--port", str(engine_port), "--model", model))
    key_file = _key_file(tmp_path / "sa.json", f"{gce.endpoint}/token")
    data_dir = tmp_path / "data"
    write_snapshot(CATALOG, snapshot_path(data_dir))
    settings: dict[str, Any] = {
        "cluster_id": f"warm-{uuid.uuid4().hex[:8]}",
        "callback_url": "http://127.0.0.1:9",  # no VM here runs its startup script
        "tick_sec": 0.5,
        "orphan_grace_sec": 3600,
        "providers": {
            "gcp": {
                "project": PROJECT,
                "zones": [ZONE],
                "endpoint": gce.endpoint,
                "credentials_file": str(key_file),
                "engine_address": f"127.0.0.1:{engine_port}",
            }
        },
    }
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump(settings))
    db = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"

    async def create() -> None:
        async with open_store(db) as store, session_factory(store)() as s, s.begin():
            await ensure_workload(
                s, project="acme", spec=_spec(), on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
            )

    async def request_arrives() -> None:
        async with open_store(db) as store, session_factory(store)() as s, s.begin():
            await s.execute(update(Workload).values(last_request_at=datetime.now(UTC)))

    def rows() -> list[LedgerRow]:
        return asyncio.run(_ledger(db))

    argv = _controller_argv(db, config, data_dir)
    try:
        with engine:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{engine_port}/health"), what="engine")
            asyncio.run(create())
            first = _start(argv)
            try:  # the pool is refilled: a VM launched, made ready, drained, stopped
                wait_until(
                    lambda: "STOPPING" in _vms(gce).values(),
                    timeout=90,
                    what="the controller stopping a VM",
                )
            finally:
                first_output = _stop(first, signal.SIGKILL)
            [row] = rows()
            assert phase_of(row) is Phase.PARKING and row.prefill, first_output
            assert row.hourly_usd == pytest.approx(L4.on_demand_usd_per_hour)  # not confirmed
            assert _vms(gce) == {row.instance_id: "STOPPING"}
            gce.hold_stops = False

            second = _start(argv)
            try:
                wait_until(
                    lambda: phase_of(rows()[0]) is Phase.PARKED,
                    timeout=60,
                    what="the stop confirmed from GCE",
                )
                [parked] = rows()
                assert parked.launch_id == row.launch_id
                assert parked.hourly_usd == pytest.approx(stopped_usd_per_hour(L4))
                assert parked.running_usd_per_hour == pytest.approx(L4.on_demand_usd_per_hour)

                asyncio.run(request_arrives())  # scale from zero: the stopped VM first

                def refilled() -> bool:  # started and ready, and a fresh VM parked after it
                    found = {r.launch_id: phase_of(r) for r in rows()}
                    return found.get(row.launch_id) is Phase.READY and sorted(
                        found.values()
                    ) == sorted([Phase.READY, Phase.PARKED])

                wait_until(refilled, timeout=90, what="the stopped VM started, the pool refilled")
                ledger = rows()
                vms = _vms(gce)
                resumed = next(r for r in ledger if r.launch_id == row.launch_id)
                answer = httpx.post(  # it serves where the started VM is reached
                    f"{resumed.url}/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    timeout=10,
                )
            finally:
                output = _stop(second)
    finally:
        gce.stop()
    assert resumed.resumed_at is not None, output
    assert resumed.hourly_usd == pytest.approx(L4.on_demand_usd_per_hour)
    refill = next(r for r in ledger if r.launch_id != row.launch_id)
    assert refill.prefill and refill.hourly_usd == pytest.approx(stopped_usd_per_hour(L4))
    # One VM per open row, none untracked: the started one runs, the refill is stopped.
    assert vms == {resumed.instance_id: "RUNNING", refill.instance_id: "TERMINATED"}
    assert all(r.terminated_confirmed_at is None for r in ledger)
    assert answer.status_code == 200, answer.text
    # Every API call was authorised by the key file: a JWT it signed (google-auth's
    # self-signed JWT for service accounts), or the token its grant was answered with.
    assert gce.authorizations
    for authorization in gce.authorizations:
        assert authorization == "Bearer fake-gce-token" or _signed_by(
            authorization.removeprefix("Bearer "), key_file
        ), authorization


def _signed_by(token: str, key_file: Path) -> bool:
    """Whether ``token`` is an RS256 JWT issued by the key file's account with its key."""
    document = json.loads(key_file.read_text())
    key = serialization.load_pem_private_key(document["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    try:
        key.public_key().verify(
            base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
            f"{header}.{payload}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        return False
    return bool(claims["iss"] == document["client_email"])
