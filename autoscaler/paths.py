"""Where the service keeps its files. Light on purpose: the CLI imports it at start-up."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """``$AUTOSCALER_DATA_DIR``, else ``~/.local/share/autoscaler``."""
    env = os.environ.get("AUTOSCALER_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "autoscaler"
