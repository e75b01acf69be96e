"""Where pullback keeps its own working files on the backup host (downloads, the lab)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PULLBACK_STATE", ROOT / ".state"))
DOWNLOADS = STATE / "downloads"  # verified rsync source tarballs, fetched once
