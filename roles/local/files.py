"""Writing the backup host's own files: whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` through a temp file in the same folder, fsync, and a rename: a reader
    sees the old file or the new one, never half of one.

    The temp name starts with a dot: cron ignores such files in ``/etc/cron.d`` and systemd
    ignores names without a unit suffix, so a half-written file is never picked up. The
    temp file is created 0600 and given ``mode`` before any byte is written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.pullback-tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
