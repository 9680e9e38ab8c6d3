"""The SQLite state and its directory are owner-only: they hold token hashes and engine
keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from autoscaler.store.db import open_store, session_factory
from autoscaler.store.tokens import TokenKind, issue_token
from providers.base import utc


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_a_new_state_file_and_its_directory_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual default: files world-readable unless made otherwise
    try:
        data = tmp_path / "data"
        async with open_store(f"sqlite+aiosqlite:///{data / 'state.db'}") as engine:
            async with session_factory(engine)() as s, s.begin():
                await issue_token(s, kind=TokenKind.ADMIN, name="admin", now=utc(0))
            written = [p for p in data.iterdir() if p.name.startswith("state.db")]
            modes = {p.name: _mode(p) for p in written}
    finally:
        os.umask(old)
    assert _mode(data) == 0o700
    assert modes["state.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_an_older_world_readable_state_file_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    async with open_store(f"sqlite+aiosqlite:///{db}"):
        pass
    assert _mode(db) == 0o600


def test_launch_model_bundles_are_kept_in_an_owner_only_file(tmp_path: Path) -> None:
    from autoscaler import LaunchClient

    path = tmp_path / "config" / "launch-bundles.json"
    client = LaunchClient("ik_sdk_x", "http://127.0.0.1:9", project="acme", bundles_path=path)
    old = os.umask(0o022)
    try:
        client.create_model_bundle("chat", model="meta-llama/Llama-3.1-8B-Instruct")
    finally:
        os.umask(old)
    assert client.get_model_bundle("chat").model == "meta-llama/Llama-3.1-8B-Instruct"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
