"""Where the service keeps its files: one data dir, shared with the catalog's snapshot.

Light on purpose: the CLI imports it at start-up.
"""

from __future__ import annotations

from catalog.snapshot import default_data_dir

__all__ = ["default_data_dir"]
