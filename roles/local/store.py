"""The backups on this machine: each host's DEST (a 0700 container: the mirror in
``DEST/tree``, or timestamped snapshots) and its state folder ``DEST.pullback`` (lock,
logs, run summaries, capture record). Snapshot names, pruning and the old mirror layout's
move are planned in pure functions; the rest touches only these folders."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from roles.core.errors import PullbackError
from roles.core.retention import Retention, plan_retention
from roles.core.spec import HostSpec
from roles.local import folders
from roles.local.files import write_atomic

STATE_SUFFIX = ".pullback"
PARTIAL = ".partial"
LATEST = "latest"
TREE = "tree"
LAYOUT_MARK = "layout"
MIGRATION_RECORD = "migration.json"
STAGING = ".pullback-migrating"

_RUN_RE = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\dT\d{6}Z)(?:-(?P<seq>[1-9]\d*))?$")


class BackupError(PullbackError):
    """A backup could not start (lock held, no rsync, unusable destination)."""

def run_key(name: str) -> tuple[str, int] | None:
    """Sort key of a complete snapshot / run name, or None when ``name`` is not one."""
    match = _RUN_RE.match(name)
    if not match:
        return None
    return match["stamp"], int(match["seq"] or 1)


def new_run_id(now: datetime, taken: Iterable[str]) -> str:
    """``2026-11-26T101500Z``; ``-2``, ``-3``... when a run of that second already exists."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    used = {name.removesuffix(PARTIAL) for name in taken}
    name, seq = stamp, 1
    while name in used:
        seq += 1
        name = f"{stamp}-{seq}"
    return name


def complete_snapshots(names: Iterable[str]) -> list[str]:
    """Complete snapshot folders, oldest first (``.partial``, ``latest``, others ignored)."""
    found = [(key, name) for name in names if (key := run_key(name)) is not None]
    return [name for _, name in sorted(found)]


def partial_snapshots(names: Iterable[str]) -> list[str]:
    """``.partial`` folders of earlier runs, oldest first."""
    found = [(key, name) for name in names
             if name.endswith(PARTIAL) and (key := run_key(name.removesuffix(PARTIAL)))]
    return [name for _, name in sorted(found)]


def newest_snapshot(names: Iterable[str]) -> str | None:
    snapshots = complete_snapshots(names)
    return snapshots[-1] if snapshots else None


def plan_prune(names: Iterable[str], keep: int) -> list[str]:
    """Complete snapshots to delete so that the newest ``keep`` remain (never a partial)."""
    snapshots = complete_snapshots(names)
    return snapshots[:-keep] if keep > 0 else []


def plan_partials(names: Iterable[str], *, resume: bool) -> tuple[str | None, list[str]]:
    """``(resume_from, delete)`` for the stale ``.partial`` folders of killed runs.

    Called only while holding the lock, so no running job owns any of them.
    """
    partials = partial_snapshots(names)
    if resume and partials:
        return partials[-1], partials[:-1]
    return None, partials


def check_layout(dest: Path, names: list[str], snapshots: int) -> str | None:
    """Refuse a mirror pull into a folder of snapshots: ``--delete`` would erase them all."""
    if snapshots or LATEST not in names or not complete_snapshots(names):
        return None
    if not os.path.islink(dest / LATEST):
        return None
    return (f"{dest} holds snapshots (a `latest` link and timestamped folders) but "
            "backup.snapshots is 0: a mirror pull with --delete would erase them; set "
            "backup.snapshots again or choose another backup.destination")


@dataclass(frozen=True)
class MirrorLayout:
    """What a mirror-mode DEST holds and what to do before pulling into ``DEST/tree``.

    ``state``: ``new`` (DEST/tree or nothing), ``old`` (the tree's top level sits in DEST),
    ``migrating`` (a move into ``staging`` was interrupted). ``move``: DEST's entries that
    go into ``staging`` before ``staging`` becomes ``tree``. ``strays``: entries of a
    marked new-layout DEST besides ``tree``; never touched.
    """
    state: str
    staging: str | None = None
    move: tuple[str, ...] = ()
    strays: tuple[str, ...] = ()


def free_staging_name(names: Iterable[str]) -> str:
    """``.pullback-migrating``, or ``-2``, ``-3``... when the old tree holds that name."""
    taken = set(names)
    name, seq = STAGING, 1
    while name in taken:
        seq += 1
        name = f"{STAGING}-{seq}"
    return name


def plan_mirror_layout(names: Iterable[str], *, marked: bool,
                       staging: str | None) -> MirrorLayout:
    """Pure: read DEST's entry ``names``, the ``layout`` mark, the recorded staging name.

    Without the mark, DEST holding exactly ``tree`` is taken as the new layout: an old
    tree whose source held nothing but a folder named ``tree`` would be misread, and the
    next pull would copy that folder again (from the server) one level down.
    """
    names = sorted(names)
    if staging is not None:
        if staging not in names and names == [TREE]:
            return MirrorLayout("new")  # the last rename happened; only the record is left
        return MirrorLayout("migrating", staging,
                            tuple(n for n in names if n != staging))
    if marked or names in ([], [TREE]):
        return MirrorLayout("new", strays=tuple(n for n in names if n != TREE))
    return MirrorLayout("old", free_staging_name(names), tuple(names))


def read_mirror_layout(dest: Path, state: Path) -> MirrorLayout:
    """``plan_mirror_layout`` over DEST as it is on disk."""
    names = os.listdir(dest) if dest.is_dir() else []
    staging: str | None = None
    try:
        staging = json.loads((state / MIGRATION_RECORD).read_text())["staging"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{state / MIGRATION_RECORD} is unreadable ({exc}); it names the "
                          f"staging folder of an interrupted move into {dest / TREE}: "
                          "finish the move by hand, then remove it") from None
    if staging is not None and (not isinstance(staging, str) or "/" in staging
                                or staging in ("", ".", "..", TREE)):
        raise BackupError(f"{state / MIGRATION_RECORD} names no valid staging folder")
    marked = (state / LAYOUT_MARK).is_file()
    return plan_mirror_layout(names, marked=marked, staging=staging)


def migrate_mirror(dest: Path, state: Path, layout: MirrorLayout) -> int:
    """Move an old-layout mirror into ``DEST/tree``; return the number of entries moved.

    Call it with the lock held and DEST already 0700. Renames inside DEST only: one file
    system, each entry moved whole and at once. The staging folder is created before it is
    recorded, so a crash leaves either an unrecorded empty folder (moved along as part of
    the old tree by the next run, then removed by its ``--delete`` pull) or a record
    the next run resumes from.
    """
    assert layout.staging is not None
    staging = dest / layout.staging
    if not staging.is_dir():
        os.mkdir(staging, 0o700)
    write_atomic(state / MIGRATION_RECORD,
                 (json.dumps({"staging": layout.staging}) + "\n").encode(), 0o600)
    for name in layout.move:
        if os.path.lexists(staging / name):
            raise BackupError(f"both {dest / name} and {staging / name} exist: an earlier "
                              f"move into {dest / TREE} was disturbed; keep the right one, "
                              "remove the other, and run again")
        os.rename(dest / name, staging / name)
    os.rename(staging, dest / TREE)  # TREE was among the moved entries if the old tree had it
    mark_new_layout(state)
    (state / MIGRATION_RECORD).unlink(missing_ok=True)
    return len(layout.move)


def mark_new_layout(state: Path) -> None:
    if not (state / LAYOUT_MARK).is_file():
        write_atomic(state / LAYOUT_MARK, (TREE + "\n").encode(), 0o600)


def state_dir(host: HostSpec) -> Path:
    """``DEST.pullback``: the lock and the logs, beside (never inside) the backup."""
    return Path(host.destination.rstrip("/") + STATE_SUFFIX)


class Lock:
    """A non-blocking ``fcntl.flock`` on ``DEST.pullback/lock``; the file holds the pid.

    Every run that reads or writes DEST takes it: a backup, a capture, a restore
    (``action``, recorded after the pid so the refusal says what holds the lock). rsync
    inherits the locked descriptor (``pass_fds``), so when this process is killed and rsync
    lives on, the lock stays held until rsync exits too: no new run touches the
    ``.partial`` folder an orphaned rsync still writes into (or reads from).
    """

    def __init__(self, path: Path, host: str, action: str = "backup") -> None:
        self.path, self.host, self.action = path, host, action
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def __enter__(self) -> Lock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace")
            os.close(fd)
            raise BackupError(f"{describe_holder(self.host, holder)}; lock {self.path}") from None
        self._fd = fd
        self.record()
        return self

    def record(self, rsync_pid: int | None = None) -> None:
        """``PID``, ``PID rsync RPID``; other actions than backup add theirs: ``PID restore``."""
        text = (f"{os.getpid()}" + (f" rsync {rsync_pid}" if rsync_pid else "")
                + ("" if self.action == "backup" else f" {self.action}") + "\n")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def describe_holder(host: str, text: str) -> str:
    """Pure: who holds ``host``'s lock, from the lock file's ``text`` (Lock.record)."""
    words = text.split()
    pid = words[0] if words else "unknown"
    rest = words[1:]
    rsync = ""
    if len(rest) >= 2 and rest[0] == "rsync":
        rsync, rest = f", rsync pid {rest[1]}", rest[2:]
    what = rest[0] if rest and re.fullmatch(r"[a-z-]{1,20}", rest[0]) else "backup"
    if what == "backup":
        return f"another backup of {host} is running (pid {pid}{rsync})"
    return f"a {what} of {host} is running (pid {pid}{rsync})"


def mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)


def prepare_state(host: HostSpec) -> Path:
    """``DEST.pullback`` and its ``logs``, 0700, after checking that DEST and the state
    folder sit where nobody else can swap them; BackupError (one line, the fix) if not."""
    state = state_dir(host)
    try:
        folders.check_folder(host.destination.rstrip("/"))
        folders.make_private(state)
        mkdir_private(state / "logs")
    except folders.FolderError as exc:
        raise BackupError(f"refused: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot create {state}: {exc.strerror}") from None
    return state


def rmtree(path: Path) -> None:
    def retry(func: Any, failed: str, _exc: Any) -> None:
        # A read-only folder copied from the server (0555) blocks unlinking inside it.
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        func(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def count_entries(root: Path) -> int:
    """What rsync's ``Number of files`` counts for a copy of ``root``: every entry (files,
    folders, links, devices...), ``root`` itself included; links are not followed.

    A walk in Python, per file: only the fallback for a snapshot whose summary is gone
    (removed by hand: log pruning keeps the summaries of complete snapshots)."""
    total = 1
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                total += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return total


def snapshot_file_count(dest: Path, logs: Path, snapshot: str) -> tuple[int, str]:
    """``(count, where)``: ``Number of files`` of the run that made ``snapshot`` (its summary
    in ``logs``), else counted on disk (a summary pruned away or written before the count
    was recorded)."""
    try:
        data = json.loads((logs / f"{snapshot}.json").read_text())
        files = data["stats"]["files"]
        if (isinstance(files, int) and not isinstance(files, bool) and data.get("ok")
                and not data["stats"].get("dry_run") and not data["stats"].get("batch_only")):
            return files, f"{logs / snapshot}.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return count_entries(dest / snapshot), f"counted in {dest / snapshot}"


def check_shrink(files: int | None, previous: int, snapshot: str, where: str,
                 max_delete: int) -> str | None:
    """Why a snapshot run must not be promoted (its source shrank too much), or None."""
    if files is None:
        return (f"rsync printed no 'Number of files', so the empty-source guard "
                f"(backup.max_delete {max_delete}) cannot compare the run with snapshot "
                f"{snapshot}")
    dropped = previous - files
    if dropped <= max_delete:
        return None
    return (f"the source has {files} files, the newest snapshot {snapshot} has {previous} "
            f"({where}): {dropped} fewer, more than backup.max_delete {max_delete}; the "
            "source may have come back empty or nearly empty (a missing mount, a failed "
            "disk)")


def point_latest(dest: Path, run: str) -> None:
    """``DEST/latest -> run``, replaced atomically."""
    tmp = dest / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run, tmp)
    os.replace(tmp, dest / LATEST)


def last_mirror_run(logs: Path) -> str | None:
    """The newest successful real mirror run in ``logs`` (its summary), or None."""
    runs = sorted((key, path.stem) for path in logs.glob("*.json")
                  if (key := run_key(path.stem)) is not None)
    for _, run in reversed(runs):
        try:
            data = json.loads((logs / f"{run}.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("mode") == "mirror" and data.get("ok") \
                and not data.get("dry_run"):
            return run
    return None


def plan_tree_snapshot(names: Iterable[str], *, tree_is_dir: bool, last_mirror: str | None,
                       fallback: str) -> str | None:
    """Snapshot mode over a mirror's DEST (``tree`` and no snapshot yet: the default
    became ``snapshots: 7``): the name the mirror takes as the first snapshot, so the new
    run hard-links its unchanged files instead of copying them all again. The last good
    mirror run's name (its summary then holds the file count the empty-source guard
    compares with), else ``fallback`` (a name just before this run). None: nothing to do."""
    names = list(names)
    if TREE not in names or not tree_is_dir or complete_snapshots(names):
        return None
    if last_mirror is not None and last_mirror not in names:
        return last_mirror
    return fallback


def retention_of(host: HostSpec) -> Retention:
    """``backup.snapshots`` and ``backup.retain`` as one rule (roles.core.retention)."""
    retain = getattr(host.backup, "retain", None)
    return Retention(last=host.backup.snapshots,
                     daily=getattr(retain, "daily", 0), weekly=getattr(retain, "weekly", 0),
                     monthly=getattr(retain, "monthly", 0))


def finish_snapshot(dest: Path, partial: Path, run: str, keep: int | Retention,
                    warnings: list[str]) -> tuple[str, list[str]]:
    """Rename the partial into place, point ``latest`` at it (atomically), prune."""
    final = dest / run
    os.rename(partial, final)
    point_latest(dest, run)
    return str(final), prune_snapshots(dest, keep, warnings)


def prune_snapshots(dest: Path, keep: int | Retention, warnings: list[str],
                    dry_run: bool = False) -> list[str]:
    """Remove the complete snapshots the rule does not keep; return their names. Call it
    with the host's lock held: no backup is then linking against (or renaming) any of
    them. Never touches ``latest``'s target: the rule always keeps the newest."""
    rule = keep if isinstance(keep, Retention) else Retention(last=keep)
    _, delete = plan_retention(complete_snapshots(os.listdir(dest)), rule)
    if dry_run:
        return delete
    pruned: list[str] = []
    for name in delete:
        try:
            rmtree(dest / name)
            pruned.append(name)
        except OSError as exc:  # the new snapshot is complete; pruning is retried next run
            warnings.append(f"could not remove old snapshot {name}: {exc}")
    return pruned


def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{value} B"  # pragma: no cover

DEFAULT_KEEP_LOGS = 30


def plan_log_prune(names: Iterable[str], keep: int, protect: Iterable[str] = ()) -> list[str]:
    """Files in ``logs/`` to delete so that only the newest ``keep`` runs remain.

    A run is ``<run>.log`` and ``<run>.json`` together; both go or both stay. Runs named in
    ``protect`` (the complete snapshots: their summaries hold the file counts the
    empty-source guard compares with) always stay. Names that are not run files (temp
    files, a user's notes) are never touched. ``keep <= 0`` keeps everything.
    """
    if keep <= 0:
        return []
    kept = set(protect)
    by_run: dict[str, list[str]] = {}
    for name in names:
        for suffix in LOG_SUFFIXES:
            if name.endswith(suffix) and run_key(name[:-len(suffix)]) is not None:
                by_run.setdefault(name[:-len(suffix)], []).append(name)
    ordered = sorted(by_run, key=lambda run: run_key(run) or (run, 0))
    return sorted(name for run in ordered[:-keep] if run not in kept for name in by_run[run])


def prune_logs(logs: Path, keep: int = DEFAULT_KEEP_LOGS, protect: Iterable[str] = ()) -> list[str]:
    """Delete the run files ``plan_log_prune`` names; return them. Call it with the lock held."""
    removed: list[str] = []
    for name in plan_log_prune(os.listdir(logs), keep, protect):
        try:
            (logs / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            continue
    return removed

LOG_SUFFIXES = (".log", ".json")
