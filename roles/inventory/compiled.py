"""The compiled inventory: a validated inventory kept as JSON, so unattended backups skip
the validator's start-up.

Validating ``inventory.yaml`` needs PyYAML and pydantic, whose imports and model set-up
cost about 60 ms per process: more than everything else a no-change backup adds to rsync.
``load`` validates once through ``roles.inventory.schema`` and saves the result (each host's
``roles.core.spec.HostSpec``, field by field) to
``~/.cache/pullback/inventory-<hash of the path>.json`` (``$XDG_CACHE_HOME`` is honoured).
The next ``load`` of the same file uses it only when all of these still hold, else it
validates again:

- the key matches: a SHA-256 over the inventory's bytes, ``$HOME`` (``~`` expands
  against it), the Python version and the source of the modules that define the result
  (``roles/inventory/schema.py``, ``selection.py``, this file, the rules in
  ``roles/core/destinations.py`` and ``rsync.py``, and the spec, ``roles/core/spec.py``),
  so editing any one invalidates it;
- the cache file and folder belong to this user, the folder's parent to this user or root,
  none is a symlink and nobody else can write them (the entry becomes the argv of a root
  backup, so it is trusted no more than the inventory; under ``sudo`` with the caller's
  HOME there is no cache at all).

Writing is atomic (temporary file, rename) and best effort: a read-only home only costs
the speed-up. Nothing here imports PyYAML or pydantic but a cache miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from roles.core.spec import HostSpec
from roles.inventory.selection import Inventory, read_inventory

FORMAT = 2  # 2: HostSpec.to_dict (the computed values are no longer stored)
CACHE_MAX_AGE = 30 * 24 * 3600  # entries of inventories not loaded for 30 days are removed
# The rules the validation applies live in roles.core too: the destination rules and the
# option checks; editing them invalidates the cache as well.
_SOURCES = (Path(__file__).with_name("schema.py"), Path(__file__).with_name("selection.py"),
            Path(__file__), Path(__file__).parents[1] / "core" / "destinations.py",
            Path(__file__).parents[1] / "core" / "rsync.py",
            Path(__file__).parents[1] / "core" / "spec.py")


# --- the cache ------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pullback"


def cache_file(inventory: Path) -> Path:
    where = os.path.realpath(inventory)
    return cache_dir() / f"inventory-{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"


def cache_key(data: bytes) -> str:
    digest = hashlib.sha256()
    for part in (str(FORMAT).encode(), data, os.environ.get("HOME", "").encode(),
                 sys.version.encode(), *(p.read_bytes() for p in _SOURCES)):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _private(info: os.stat_result, owners: tuple[int, ...] | None = None) -> bool:
    return (info.st_uid in (owners or (os.geteuid(),))
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _safe_folder(folder: Path) -> bool:
    """The cache folder and its parent are real folders (no symlinks) that nobody else can
    write: the folder is ours, its parent ours or root's. Under ``sudo`` with the caller's
    HOME this is false, and root neither trusts nor writes a cache in someone else's home."""
    try:
        mine, parent = os.lstat(folder), os.lstat(folder.parent)
    except OSError:
        return False
    return (stat.S_ISDIR(mine.st_mode) and stat.S_ISDIR(parent.st_mode) and _private(mine)
            and _private(parent, (os.geteuid(), 0)))


def read_cache(inventory: Path, key: str) -> dict[str, HostSpec] | None:
    """The cached hosts of ``inventory`` for ``key``, or None (missing, stale, unsafe)."""
    path = cache_file(inventory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not (_private(os.fstat(fd)) and _safe_folder(path.parent)):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            entry = json.loads(handle.read())
        if entry.get("key") != key:
            return None
        return {name: HostSpec.from_dict(data) for name, data in entry["hosts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        os.close(fd)


def write_cache(inventory: Path, key: str, hosts: dict[str, dict[str, Any]]) -> bool:
    """Save the validated hosts (atomically, mode 0600); prune entries unused for 30
    days. False when the cache folder cannot be written or is not private."""
    path = cache_file(inventory)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if not os.path.lexists(path.parent):
            path.parent.mkdir(parents=True, mode=0o700)
        if not _safe_folder(path.parent):
            return False
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"key": key, "inventory": os.path.realpath(inventory), "hosts": hosts},
                      handle)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    cutoff = time.time() - CACHE_MAX_AGE
    for old in path.parent.glob("inventory-*.json"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            continue
    return True


def load(path: str | Path) -> Inventory:
    """The inventory at ``path``, its hosts ``HostSpec``s: from the cache when it is
    current, else validated by ``roles.inventory.schema`` (InventoryError on a problem) and
    cached. A cache hit refreshes the entry's age."""
    path = Path(path)
    data = read_inventory(path)
    try:
        key: str | None = cache_key(data)
    except OSError:  # an install without the modules' sources: no way to tell a stale entry
        key = None
    hosts = read_cache(path, key) if key else None
    if hosts is not None:
        with contextlib.suppress(OSError):
            os.utime(cache_file(path))
        return Inventory(path=path, hosts=hosts)
    from roles.inventory import schema as validator  # PyYAML + pydantic: only on a miss

    validated = validator.load_text(data.decode("utf-8"), str(path))
    if key:
        write_cache(path, key, {name: host.to_dict() for name, host in validated.hosts.items()})
    return Inventory(path=path, hosts=validated.hosts)
