"""`autoscaler run` loads a cloud's SDK only when that cloud is configured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SDKS = ("aioboto3", "botocore", "google.cloud.compute_v1")

_PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    from autoscaler import cli, service  # noqa: F401  (what `autoscaler run` imports)
    from autoscaler.config import parse_config
    from autoscaler.controller import build_registry
    from autoscaler.store.db import create_engine, session_factory
    from providers.base import SystemClock

    config = parse_config(json.loads(sys.argv[1]), source="test")
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp}/db.sqlite")
        sessions = session_factory(engine)
        build_registry(config, sessions=sessions, data_dir=Path(tmp), clock=SystemClock())
    print(json.dumps([name for name in SDKS if name in sys.modules]))
    """
)


def _sdks_loaded(config: dict[str, object]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"SDKS = {SDKS!r}\n{_PROBE}", json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_a_local_only_controller_loads_no_cloud_sdk() -> None:
    assert _sdks_loaded({}) == []


def test_configuring_aws_loads_its_sdk_and_only_its_sdk() -> None:
    assert _sdks_loaded(
        {
            "callback_url": "https://autoscaler.internal:8001",
            "providers": {"aws": {"regions": ["us-east-1"]}},
        }
    ) == [
        "aioboto3",
        "botocore",
    ]
