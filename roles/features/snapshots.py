"""snapshots, diff and prune: what a host's backups on this machine hold, how two of them
(or the newest and the live server) differ, and removing the ones retention drops.

``snapshots`` reads only local files: the snapshot folders in DEST and the run summaries
in ``DEST.pullback/logs`` (files and sizes come from the run that made each snapshot; a
snapshot whose summary is gone shows ``-``). ``diff A B`` runs the local rsync as a dry
run from snapshot A to snapshot B (``-n -i``: nothing is written) and sorts its itemized
lines into added, removed and changed; ``diff`` with one name or none compares that
snapshot (default: the newest) with the live server through a dry-run pull over the
backup key: the same server command as ``backup --dry-run`` (``-i`` is never sent to the
server), so captured mode's gate accepts it. ``prune`` applies ``backup.snapshots`` and
``backup.retain`` (roles.core.retention) now, as every backup does after its run.

Every one of them that reads snapshot folders holds the host's lock (``diff``, ``prune``):
a backup never prunes a snapshot that a diff reads, and a prune never races a backup.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roles.core.errors import EXIT_BAD_INPUT, PullbackError
from roles.core.pull import build_argv, describe_failure, parse_stats, source_specs
from roles.core.retention import plan_retention, snapshot_time
from roles.core.spec import HostSpec
from roles.local.runner import find_local_rsync, rsync_env, stream
from roles.local.store import (
    LATEST,
    PARTIAL,
    TREE,
    BackupError,
    Lock,
    complete_snapshots,
    human_bytes,
    partial_snapshots,
    prepare_state,
    prune_snapshots,
    retention_of,
    state_dir,
)


class SnapshotError(PullbackError):
    """A snapshot name that does not exist, or a mode without snapshots; exit 2."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Snapshot:
    name: str
    state: str  # complete | partial | mirror
    started: str | None  # ISO UTC
    files: int | None
    size: int | None  # rsync's "Total file size": the copy's size, links counted once each
    latest: bool = False


def _summary(logs: Path, run: str) -> dict[str, Any]:
    try:
        data = json.loads((logs / f"{run}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(stats: Any, key: str) -> int | None:
    value = stats.get(key) if isinstance(stats, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def list_snapshots(host: HostSpec) -> list[Snapshot]:
    """The host's snapshots, oldest first (mirror mode: the one tree); partials last."""
    dest = Path(host.destination.rstrip("/"))
    logs = state_dir(host) / "logs"
    names = os.listdir(dest) if dest.is_dir() else []
    if not host.backup.snapshots:
        if TREE not in names:
            return []
        runs = sorted((p.stem for p in logs.glob("*.json")), key=lambda n: (
            snapshot_time(n) is not None, n)) if logs.is_dir() else []
        for run in reversed(runs):
            data = _summary(logs, run)
            if data.get("mode") == "mirror" and data.get("ok") and not data.get("dry_run"):
                stats = data.get("stats")
                return [Snapshot(TREE, "mirror", data.get("started"), _number(stats, "files"),
                                 _number(stats, "total_size"), True)]
        return [Snapshot(TREE, "mirror", None, None, None, True)]
    latest = os.readlink(dest / LATEST) if os.path.islink(dest / LATEST) else None
    found: list[Snapshot] = []
    for name in complete_snapshots(names):
        data = _summary(logs, name)
        stats = data.get("stats") if data.get("ok") and not data.get("dry_run") else {}
        when = snapshot_time(name)
        found.append(Snapshot(name, "complete", when.isoformat() if when else None,
                              _number(stats, "files"), _number(stats, "total_size"),
                              name == latest))
    for name in partial_snapshots(names):
        when = snapshot_time(name.removesuffix(PARTIAL))
        found.append(Snapshot(name, "partial", when.isoformat() if when else None, None, None))
    return found


def snapshot_rows(snapshots: list[Snapshot]) -> list[tuple[str, ...]]:
    rows = [("snapshot", "started (UTC)", "files", "size", "state")]
    for s in snapshots:
        state = s.state + (" (latest)" if s.latest and s.state == "complete" else "")
        if s.state == "partial":
            state += " (running, or interrupted: the next run resumes it)"
        rows.append((s.name, s.started[:19].replace("T", " ") if s.started else "-",
                     "-" if s.files is None else str(s.files), human_bytes(s.size), state))
    return rows


# --- diff ---------------------------------------------------------------------------------


@dataclass
class Diff:
    old: str
    new: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


_ITEM = re.compile(r"^([<>ch.])([fdLDS])([^ ]{7,9}) (.+)$")  # 2.6.9: 7 attributes, 3.x: 9


def parse_itemized(text: str, old: str, new: str) -> Diff:
    """Pure: rsync ``-i`` lines (going from ``old`` to ``new``) sorted into a Diff.

    ``*deleting`` is removed; all ``+`` attributes is added; any other change is changed,
    except a folder whose only change is its time (its contents changed: they are listed).
    Other lines (stats, warnings) are ignored.
    """
    diff = Diff(old, new)
    for line in text.splitlines():
        if line.startswith("*deleting "):
            diff.removed.append(line[len("*deleting "):].strip())
            continue
        match = _ITEM.match(line)
        if not match:
            continue
        kind, attrs, name = match[2], match[3], match[4]
        if kind == "L" and " -> " in name:
            name = name.rsplit(" -> ", 1)[0]  # %L: the link's target
        elif match[1] == "h" and " => " in name:
            name = name.rsplit(" => ", 1)[0]  # %L: the file it is a hard link of
        if set(attrs) == {"+"}:
            diff.added.append(name)
        elif kind == "d" and set(attrs.replace("t", ".")) <= {"."}:
            continue  # a folder's mtime: what changed inside it is listed on its own
        elif match[1] in "<>ch" or set(attrs) - {"."}:
            diff.changed.append(name)
    return diff


def _root(host: HostSpec, name: str) -> Path:
    dest = Path(host.destination.rstrip("/"))
    names = os.listdir(dest) if dest.is_dir() else []
    if not host.backup.snapshots:
        if name != TREE:
            raise SnapshotError(f"{host.name} keeps one mirror (backup.snapshots: 0): "
                                f"the only name is {TREE}")
        if TREE not in names:
            raise SnapshotError(f"no backup of {host.name} in {dest}")
        return dest / TREE
    available = complete_snapshots(names)
    if name == LATEST and available:
        return dest / available[-1]
    if name not in available:
        shown = ", ".join(available[-5:]) or "none"
        raise SnapshotError(f"no complete snapshot {name!r} of {host.name} (newest: {shown}; "
                            f"`invoke snapshots --host {host.name}` lists them)")
    return dest / name


def _newest(host: HostSpec) -> str:
    if not host.backup.snapshots:
        return TREE
    dest = Path(host.destination.rstrip("/"))
    available = complete_snapshots(os.listdir(dest)) if dest.is_dir() else []
    if not available:
        raise SnapshotError(f"no complete snapshot of {host.name} in {dest}")
    return available[-1]


def diff_snapshots(host: HostSpec, old: str, new: str) -> Diff:
    """What changed from snapshot ``old`` to snapshot ``new`` (a local dry run)."""
    rsync, _ = find_local_rsync(host)
    state = prepare_state(host)
    with Lock(state / "lock", host.name, "diff"):
        a, b = _root(host, old), _root(host, new)
        argv = [rsync, "-n", "-a", "-i", "-H", "--delete", "--numeric-ids",
                f"{b}/", f"{a}/"]
        proc = subprocess.run(argv, capture_output=True, env=rsync_env(), check=False)
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        errors = proc.stderr.decode(errors="replace").splitlines()
        raise BackupError(f"comparing {old} with {new} failed: "
                          + describe_failure(proc.returncode, errors))
    return parse_itemized(text, old, new)


def diff_live(host: HostSpec, old: str | None) -> Diff:
    """What a backup now would change in snapshot ``old`` (default: the newest): a dry-run
    pull into it with ``-i``, over the backup key."""
    rsync, _ = find_local_rsync(host)
    state = prepare_state(host)
    name = old or _newest(host)
    with Lock(state / "lock", host.name, "diff") as lock:
        target = _root(host, name)
        argv = build_argv(host, dry_run=True, tty=False, local_rsync=rsync, dest=str(target))
        at = len(argv) - 1 - len(source_specs(host))  # before the sources and DEST
        if "--delete" not in argv and not any(a.startswith("--delete-") for a in argv):
            argv.insert(at, "--delete")  # a receiver-side option: what the server lost too
        argv.insert(at, "--itemize-changes")
        output = io.BytesIO()
        code, scanner = stream(argv, output, None, lock)
    if code not in (0, 24):
        raise BackupError("the dry-run pull failed: " + describe_failure(code, scanner.errors))
    stats = parse_stats(scanner.tail)
    if not stats.get("dry_run"):
        raise BackupError("rsync's output does not end with (DRY RUN): not comparing")
    # rsync goes from the server (new) to the snapshot (old): added = on the server only.
    return parse_itemized(output.getvalue().decode(errors="replace"), name, "server")


def format_diff(diff: Diff) -> str:
    lines = [f"{diff.old} -> {diff.new}: {len(diff.added)} added, {len(diff.removed)} "
             f"removed, {len(diff.changed)} changed"]
    lines += [f"+ {n}" for n in diff.added]
    lines += [f"- {n}" for n in diff.removed]
    lines += [f"~ {n}" for n in diff.changed]
    return "\n".join(lines) + "\n"


# --- prune ----------------------------------------------------------------------------------


def prune(host: HostSpec, *, dry_run: bool) -> tuple[list[str], list[str], list[str]]:
    """``(kept, removed, warnings)``: apply the host's retention now, under its lock."""
    if not host.backup.snapshots:
        raise SnapshotError(f"{host.name} keeps one mirror (backup.snapshots: 0): nothing "
                            "to prune")
    dest = Path(host.destination.rstrip("/"))
    state = prepare_state(host)
    warnings: list[str] = []
    with Lock(state / "lock", host.name, "prune"):
        names = os.listdir(dest) if dest.is_dir() else []
        removed = prune_snapshots(dest, retention_of(host), warnings, dry_run=dry_run) \
            if dest.is_dir() else []
        kept, _ = plan_retention(complete_snapshots(names), retention_of(host))
    return kept, removed, warnings
