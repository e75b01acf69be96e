"""The restore drill's reads: a tree's manifest on a server (admin login + sudo) or here.

Both sides are read by the same code, ``roles.local.manifest``: here it is imported, on a
server its source is sent as ``sudo python3 -c SOURCE ROOT`` (one round trip; the server
needs python3). The comparison itself is pure (``roles.core.drill``); the drill's steps
(back up, restore, read both sides, compare) are put together in ``roles.cli.drill``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from roles.core import drill as comparison
from roles.core.errors import PullbackError
from roles.core.rsync import version_key
from roles.core.spec import HostSpec
from roles.local import manifest
from roles.remote.session import Session


class DrillError(PullbackError):
    """A drill step that could not run (not a difference: those are the report)."""


def manifest_source() -> str:
    return inspect.getsource(manifest)


def gather_remote_manifest(s: Session, root: str) -> list[dict]:
    """The manifest of ``root`` on the server, read as root."""
    host_name = s.name
    result = s.run(["python3", "-c", manifest_source(), root], sudo=True)
    if result.exited != 0:
        tail = (result.stderr or "").strip().splitlines()[-1:] or [f"exit {result.exited}"]
        raise DrillError(f"{host_name}: reading {root} failed: {tail[0]} (the drill needs "
                         "python3 on the server)")
    return manifest.read(result.stdout)


def extra_roots(host: HostSpec, path: str) -> list[tuple[str, str]]:
    """The ``backup.extra_sources`` strictly below the drilled ``path``, each with its place
    relative to ``path``: the server's manifest stays on one file system (as ``-x``), so
    each is read on its own and merged (``merge_manifests``)."""
    top = path.rstrip("/")
    return [(extra, extra[len(top):].strip("/"))
            for extra in getattr(host.backup, "extra_sources", ())
            if extra.startswith(top + "/")]


def merge_manifests(main: list[dict], parts: list[tuple[str, list[dict]]]) -> list[dict]:
    """``main`` with each ``(relative place, manifest)`` of ``parts`` put at its place; an
    entry read in both (the mount point: its mounted root's attributes either way) is the
    part's."""
    merged = {item["p"]: item for item in main}
    for place, items in parts:
        for item in items:
            name = f"{place}/{item['p']}" if item["p"] else place
            merged[name] = {**item, "p": name}
    return list(merged.values())


def gather_local_manifest(root: Path) -> list[dict]:
    return list(manifest.scan(str(root)))


def mtime_resolution_ns(host: HostSpec) -> int:
    """Nanoseconds travel from protocol 31 (rsync 3.1.0) on; before, whole seconds."""
    return 1 if version_key(host.rsync.version) >= (3, 1, 0) else 10**9


def compare_trees(host: HostSpec, server: list[dict], copy: list[dict],
                  path: str) -> comparison.Comparison:
    """``server`` (the tree at ``path`` on the host) against ``copy`` (its restore); the
    backup's excludes (``system_exclude`` and ``exclude``, as the pull passes them) are
    applied to the server side, relative to ``backup.source``: the drill compares what is
    backed up."""
    source = host.backup.source.rstrip("/") or "/"
    prefix = path[len(source):] if path.startswith(source) else ""
    exclude = comparison.build_exclude(host.backup.pull_exclude, prefix=prefix)
    return comparison.compare(server, copy, mtime_resolution_ns=mtime_resolution_ns(host),
                              exclude=exclude)
