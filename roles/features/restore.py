"""restore: copy a path out of a local backup (the mirror or a snapshot) with its metadata,
into a new 0700 folder of this machine."""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from roles.core.destinations import system_problem
from roles.core.errors import EXIT_BAD_INPUT, PullbackError
from roles.core.pull import OutputScanner, build_restore_argv, describe_failure
from roles.core.spec import HostSpec
from roles.local import folders
from roles.local.runner import find_bwrap, find_local_rsync, rsync_env, sandboxed
from roles.local.store import (
    LATEST,
    TREE,
    BackupError,
    Lock,
    complete_snapshots,
    prepare_state,
    read_mirror_layout,
    state_dir,
)


class RestoreError(PullbackError):
    """Bad restore input (path, target, snapshot); the task exits 2."""

    exit_code = EXIT_BAD_INPUT


def backup_root(host: HostSpec, snapshot: str | None) -> Path:
    """The folder holding the copy of ``backup.source``: the mirror or a snapshot.

    The mirror is ``DEST/tree``; a DEST still in the old layout (no backup has run since
    the upgrade) is read where it is: reading moves nothing.
    """
    dest = Path(host.destination.rstrip("/"))
    if not host.backup.snapshots:
        if snapshot and snapshot != TREE:  # `invoke snapshots` lists the mirror as tree
            raise RestoreError(f"{host.name} keeps one mirror (backup.snapshots: 0); "
                               f"--snapshot does not apply (or is {TREE})")
        try:
            layout = read_mirror_layout(dest, state_dir(host))
        except BackupError as exc:
            raise RestoreError(str(exc)) from None
        if layout.state == "migrating":
            raise RestoreError(f"the move of {dest} into {dest / TREE} was interrupted; "
                               f"run `invoke backup --host {host.name}` to finish it")
        root = dest if layout.state == "old" else dest / TREE
        if not root.is_dir():
            raise RestoreError(f"no backup of {host.name} at {root}")
        return root
    names = os.listdir(dest) if dest.is_dir() else []
    available = complete_snapshots(names)
    if not snapshot or snapshot == LATEST:
        if not available:
            raise RestoreError(f"no complete snapshot of {host.name} in {dest}")
        return dest / available[-1]
    if snapshot not in available:
        shown = ", ".join(available[-5:]) or "none"
        raise RestoreError(f"no snapshot {snapshot!r} of {host.name} (newest: {shown})")
    return dest / snapshot


def restore_relpath(host: HostSpec, path: str) -> PurePosixPath:
    """Server path ``path`` relative to ``backup.source``; refuse ``..`` and outside paths."""
    wanted = PurePosixPath(path)
    if not wanted.is_absolute():
        raise RestoreError(f"--path must be the absolute path on the server, got {path!r}")
    if ".." in wanted.parts:
        raise RestoreError(f"--path must not contain '..' (it would leave the backup): {path!r}")
    source = PurePosixPath(host.backup.source)
    try:
        return wanted.relative_to(source)
    except ValueError:
        raise RestoreError(f"{path} is not inside backup.source {source}") from None


def resolve_restore_path(host: HostSpec, root: Path, path: str) -> Path:
    """The backup's copy of server path ``path``; refuse ``..``, symlinked folders, others."""
    relative = restore_relpath(host, path)
    source = PurePosixPath(host.backup.source)
    current = root
    for index, part in enumerate(relative.parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise RestoreError(f"{path} is not in the backup ({current} is missing)") from None
        if stat.S_ISLNK(info.st_mode) and index < len(relative.parts) - 1:
            # Following it would read the backup host's own files (an absolute link) or
            # another part of the backup: name the real path instead.
            target = os.readlink(current)
            raise RestoreError(f"{source / PurePosixPath(*relative.parts[:index + 1])} is a "
                               f"symlink to {target} in the backup; give the path it points to")
    return current


@dataclass
class RestoreResult:
    ok: bool
    exit_code: int
    argv: list[str]
    source: str
    output: str
    error: str | None = None
    warning: str | None = None
    target: str = ""  # TO/tree: where the copy landed


def check_restore_container(to: Path, names: list[str], mode: int | None, *,
                            force: bool) -> str | None:
    """Pure: why ``to`` cannot take a restore into ``to/tree``, or None.

    ``to`` is the 0700 container: a missing or empty folder becomes one. A non-empty
    folder that others can enter is refused rather than closed behind their back (its
    other contents may be meant for them); a non-empty ``tree`` needs ``--force``.
    """
    if mode is None:
        return None
    if not stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return f"{to} exists and is not a folder"
    if names and stat.S_IMODE(mode) & 0o077:
        return (f"{to} has mode {stat.S_IMODE(mode):04o} and is not empty: the restored "
                "files (setuid ones included) would be within other users' reach; "
                f"chmod 700 {to}, or give a new folder")
    if TREE in names and not force:
        return (f"{to / TREE} exists; use --force to copy over it (files there that are not "
                "in the backup are kept)")
    return None


def run_restore(host: HostSpec, *, path: str, to: str, snapshot: str | None = None,
                force: bool = False) -> RestoreResult:
    """Copy ``path`` (a server path) out of the local backup into ``to``.

    Under the host's backup lock (``DEST.pullback/lock``, as ``restore``): a backup
    renames, promotes and prunes the very folders a restore reads, so a restore while a
    backup of the host runs fails at once (BackupError, exit 1), and so does a backup or a
    capture while a restore runs. rsync inherits the lock: a killed restore's rsync
    still holds it.
    """
    system = system_problem(os.path.normpath(Path(to).absolute()))
    if system:  # TO is made 0700 and receives TO/tree: never chmod a system folder
        raise RestoreError(
            f"--to {to}: {system} of this backup host; a restore never goes onto the "
            "backup host's own system. Give a new folder of its own (e.g. "
            "/root/restore): the copy lands in it under tree/, made 0700")
    restore_relpath(host, path)
    backup_root(host, snapshot)  # no backup at all: say so before any folder is made
    try:
        state = prepare_state(host)
    except BackupError as exc:
        raise RestoreError(str(exc)) from None
    with Lock(state / "lock", host.name, "restore") as lock:
        return _restore_locked(host, path=path, to=to, snapshot=snapshot, force=force,
                               lock=lock)


def _restore_locked(host: HostSpec, *, path: str, to: str, snapshot: str | None, force: bool,
                    lock: Lock) -> RestoreResult:
    root = backup_root(host, snapshot)
    source = resolve_restore_path(host, root, path)
    target = Path(os.path.normpath(Path(to).absolute()))
    dest = Path(host.destination.rstrip("/")).resolve()
    if target.resolve() == dest or target.resolve().is_relative_to(dest):
        raise RestoreError(f"{to} is inside the backup {dest}; restore somewhere else")
    try:
        folders.check_folder(target)
    except folders.FolderError as exc:
        raise RestoreError(f"refused: {exc}") from None
    try:
        info = os.lstat(target)
        names = os.listdir(target) if stat.S_ISDIR(info.st_mode) else []
        mode: int | None = info.st_mode
    except FileNotFoundError:
        names, mode = [], None
    problem = check_restore_container(target, names, mode, force=force)
    if problem:
        raise RestoreError(problem)
    if (target / TREE).is_symlink() or ((target / TREE).exists()
                                        and not (target / TREE).is_dir()):
        raise RestoreError(f"{target / TREE} exists and is not a folder")
    # Both ends of a restore are this machine: any local rsync will do (no warning to
    # build the pinned one, which matters only when it talks to a server's).
    rsync, _ = find_local_rsync(host)
    warning: str | None = None
    try:
        bwrap = find_bwrap(host)
    except BackupError as exc:
        raise RestoreError(str(exc)) from None
    is_dir = stat.S_ISDIR(os.lstat(source).st_mode)
    try:
        note = folders.make_private(target)  # rsync creates the last level, TO/tree
    except folders.FolderError as exc:
        raise RestoreError(f"refused: {exc}") from None
    if note:
        warning = "; ".join(filter(None, [warning, note]))
    argv = build_restore_argv(rsync, host.backup.options, source, is_dir=is_dir,
                              to=str(target / TREE))
    # The copy (the backup's data, a server's files) may change nothing but TO.
    run_argv = sandboxed(host, argv, bwrap, writable=[target], readable=[source])
    result = subprocess.run(run_argv, capture_output=True, env=rsync_env(), check=False,
                            stdin=subprocess.DEVNULL, pass_fds=(lock.fd,))
    output = (result.stdout + result.stderr).decode(errors="replace")
    error = None
    if result.returncode != 0:
        scanner = OutputScanner()
        scanner.feed(result.stdout + result.stderr + b"\n")
        scanner.close()
        error = describe_failure(result.returncode, scanner.errors)
    return RestoreResult(ok=result.returncode == 0, exit_code=result.returncode, argv=argv,
                         source=str(source), output=output, error=error, warning=warning,
                         target=str(target / TREE))
