"""Schemathesis over the management API's own OpenAPI document, with every check.

Conformance included: every status code, header and body the server answers must be in
the document, schema-valid requests must be accepted and invalid ones refused, a method
a path lacks must answer 405 with the right ``Allow``; the stateful phase follows the
document's links (create a workload, then read, key and delete it). Bounded by a count of
test cases per operation, not by time, with a fixed seed: every run tries the same cases
however loaded the machine is (a time bound tried a third as many on a busy one).
Afterwards the store must still hold only specs the service can read.

The workload spec's rules are in its published schema as far as JSON Schema can
express them (``autoscaler.api.spec_schema``), so ``positive_data_acceptance`` runs on
the workload ``PUT`` too: a schema-valid spec must be accepted. The few rules JSON
Schema cannot express (the grammar of cron, window and engine command; comparisons
between two fields; CUDA pins a GPU of the pool runs; a registered worker) are covered
for positive cases by ``tests/api/schemathesis_hooks.py``, and only those. The workload
``PATCH`` is held to every check but that one, in its own run and in the stateful phase
that reaches it: a merge patch's shape is published, but whether the spec it makes is
valid depends on the stored spec.
"""

from __future__ import annotations

import asyncio
import os
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

# Test cases per operation in each run's fuzzing (or stateful) phase; the coverage phase
# adds its own fixed set. About 45 s in all on a quiet two-core machine.
FUZZ_EXAMPLES = 10
PUT_EXAMPLES = 200
PATCH_EXAMPLES = 100
STATEFUL_EXAMPLES = 30
RUN_TIMEOUT_SEC = 240
WORKLOAD_PUT = "PUT /v1/projects/{project}/workloads/{slug}"
WORKLOAD_PATCH = "PATCH /v1/projects/{project}/workloads/{slug}"


REPO = Path(__file__).resolve().parents[2]
HOOKS = "tests.api.schemathesis_hooks"


def _schemathesis(url: str, *, cwd: Path, examples: int, extra: list[str]) -> str:
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
            "--max-examples",
            str(examples),
            "--workers",
            "1",
            "--seed",
            "17",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SEC,
        cwd=cwd,
        env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(REPO)},
    )
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Test cases:" in run.stdout, report
    return report


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_SEC * 4 + 60)
def test_schemathesis_finds_no_failure_and_the_store_stays_readable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    with ApiServer(database_url) as api:
        _schemathesis(
            api.url,
            cwd=tmp_path,
            examples=FUZZ_EXAMPLES,
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
            examples=PUT_EXAMPLES,
            extra=["--phases", "coverage,fuzzing", "--include-name", WORKLOAD_PUT],
        )
        # A merge patch's own shape is published (WorkloadPatch) and held to every other
        # check; whether the spec it makes is valid depends on the stored spec, which no
        # schema of the patch can say, so a schema-valid patch may rightly get a 422.
        _schemathesis(
            api.url,
            cwd=tmp_path,
            examples=PATCH_EXAMPLES,
            extra=[
                "--phases",
                "coverage,fuzzing",
                "--include-name",
                WORKLOAD_PATCH,
                "--exclude-checks",
                "positive_data_acceptance",
            ],
        )
        # Sequences of calls along the document's links, which start with the PUT. They
        # reach the PATCH, whose schema-valid patches can make an invalid spec from the
        # stored one (a scheduled workload patched to no config): acceptance is left out
        # here as for the PATCH above; the PUT is held to it in its own run.
        _schemathesis(
            api.url,
            cwd=tmp_path,
            examples=STATEFUL_EXAMPLES,
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
