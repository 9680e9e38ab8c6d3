"""Schemathesis over the management API's own OpenAPI document, with every check.

Conformance included: every status code, header and body the server answers must be in
the document, schema-valid requests must be accepted and invalid ones refused, a method
a path lacks must answer 405 with the right ``Allow``; the stateful phase follows the
document's links (create a workload, then read, key and delete it). Bounded in time for
CI. Afterwards the store must still hold only specs the service can read.

One check is left out for two operations: ``positive_data_acceptance`` on the workload
``PUT`` and ``PATCH`` (a merge patch makes a spec, judged by the same rules). The
workload spec has rules across fields that its JSON schema does not express (an
autoscaling policy needs max_workers and a $/h ceiling, image and audio modalities need
vllm-omni, a vllm_version must be a version of a vLLM engine...), so a body valid by the
schema can break one, and the right answer is then 422 with every problem listed. Every
other check runs on those operations, and that check on every other operation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from autoscaler.spec import WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Workload
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

FUZZ_SECONDS = 25
PUT_SECONDS = 15
STATEFUL_SECONDS = 20
WORKLOAD_PUT = "PUT /v1/projects/{project}/workloads/{slug}"
WORKLOAD_PATCH = "PATCH /v1/projects/{project}/workloads/{slug}"


def _schemathesis(url: str, *, cwd: Path, seconds: int, extra: list[str]) -> str:
    """Run schemathesis against ``url``; its report, asserting it found nothing."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            *extra,
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--max-time",
            str(seconds),
            "--workers",
            "1",
            "--seed",
            "17",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=seconds * 3 + 30,
        cwd=cwd,
    )
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Test cases:" in run.stdout, report
    return report


@pytest.mark.slow
@pytest.mark.timeout((FUZZ_SECONDS + PUT_SECONDS + STATEFUL_SECONDS) * 3 + 90)
def test_schemathesis_finds_no_failure_and_the_store_stays_readable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    with ApiServer(database_url) as api:
        _schemathesis(
            api.url,
            cwd=tmp_path,
            seconds=FUZZ_SECONDS,
            extra=[
                "--phases",
                "coverage,fuzzing",
                "--exclude-name",
                WORKLOAD_PUT,
                "--exclude-name",
                WORKLOAD_PATCH,
            ],
        )
        _schemathesis(
            api.url,
            cwd=tmp_path,
            seconds=PUT_SECONDS,
            extra=[
                "--phases",
                "coverage,fuzzing",
                "--include-name",
                WORKLOAD_PUT,
                "--include-name",
                WORKLOAD_PATCH,
                "--exclude-checks",
                "positive_data_acceptance",
            ],
        )
        # Sequences of calls along the document's links, which start with the PUT.
        _schemathesis(
            api.url,
            cwd=tmp_path,
            seconds=STATEFUL_SECONDS,
            extra=["--phases", "stateful", "--exclude-checks", "positive_data_acceptance"],
        )
        listed = httpx.get(
            f"{api.url}/v1/projects/acme/workloads",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert listed.status_code == 200

    async def stored_specs() -> list[WorkloadSpec]:
        async with open_store(database_url) as engine, session_factory(engine)() as s:
            rows = list(await s.scalars(select(Workload)))
        return [WorkloadSpec.model_validate(w.spec) for w in rows]

    assert all(isinstance(spec, WorkloadSpec) for spec in asyncio.run(stored_specs()))
