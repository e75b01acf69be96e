"""The facts ``roles.core.root_trust`` judges: ``lstat`` of the paths a root job runs from.

``chain`` is a path and every folder above it (lexically and, when a link is on the way,
the resolved path's too); ``tree`` is every entry below a folder (links not followed).
``root_job_problem`` puts them together for ``pullback-backup``: the inventory, the
interpreter, the virtualenv (``sys.prefix``) and the project's own package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from roles.core.root_trust import Entry, check_entries
from roles.local.folders import components


def _entry(path: str) -> Entry | None:
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Entry(path, info.st_mode, info.st_uid)


def chain(path: str | Path) -> Iterator[Entry]:
    """``path`` and the folders above it, from ``/`` down; then the same for the resolved
    path when it differs (a link's target and the folders to it decide as well)."""
    lexical = os.path.normpath(os.path.abspath(path))
    real = os.path.realpath(lexical)
    for top in dict.fromkeys([lexical, real]):
        for component in components(top):
            entry = _entry(component)
            if entry is not None:
                yield entry


def tree(top: str | Path) -> Iterator[Entry]:
    """Every folder and file below ``top`` (``top`` itself excluded), links not followed."""
    for folder, dirs, files in os.walk(top, followlinks=False):
        for name in [*dirs, *files]:
            entry = _entry(os.path.join(folder, name))
            if entry is not None:
                yield entry


def root_job_problem(inventory: str | Path, *, prefix: str | None = None,
                     package: str | Path | None = None,
                     executable: str | None = None) -> str | None:
    """Why ``pullback-backup`` must not run as root with these files, or None.

    Defaults: this process's virtualenv (``sys.prefix``), the ``roles`` package it imports
    (an editable install's source checkout) and ``sys.executable``.
    """
    prefix = prefix or sys.prefix
    package = package or Path(__file__).resolve().parents[1]  # the ``roles`` package
    executable = executable or sys.executable
    checks = (
        (f"the inventory {inventory}", lambda: chain(inventory)),
        (f"the Python interpreter {executable}", lambda: chain(executable)),
        (f"the virtualenv {prefix}", lambda: (*chain(prefix), *tree(prefix))),
        (f"pullback's own code {package}", lambda: (*chain(package), *tree(package))),
    )
    for what, entries in checks:
        problem = check_entries(what, entries())
        if problem is not None:
            return problem
    return None
