"""Private local folders: where copies of a server's root files may safely live.

A backup (or a restore) holds the server's setuid-root binaries and device nodes with their
real modes and owners. Local users must never reach them, so every host's data sits inside
a container folder of mode 0700 owned by the running user, and the path to it must not be
changeable by anyone else: a folder on the way that another user can write (or owns)
lets that user swap what lies below it, e.g. for a link into their own folder, before or
between runs.

The rule (``check_chain``), for each existing component from ``/`` down:

- owned by root or by the running user, else refused (its owner can chmod it at will);
- not writable by group or others; the sticky bit (``/tmp``) is accepted only when the
  next component already exists (it is then checked in turn: another user cannot rename
  or delete it): under a sticky folder another user can create the missing name first;
- a symlink is judged by its owner only (its own mode means nothing); the resolved path
  is checked as well.

``gather_chain`` reads the facts (``lstat``), ``check_chain`` is pure, ``make_private``
creates what is missing with mode 0700 and checks again afterwards, so a folder another
user slipped in between the check and the ``mkdir`` is still refused.

Mounts: ``nosuid`` and ``nodev`` on the file system holding the backups make its setuid
bits and device nodes inert even for a process that gets in; ``parse_mountinfo`` and
``mount_of`` tell which mount holds a path and its options (doctor warns without them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from roles.core.mounts import Mount, mount_of, parse_mountinfo  # noqa: F401 - re-exported

PRIVATE_MODE = 0o700


class FolderError(Exception):
    """A local folder is unsafe to hold a backup; the message is one line with the fix."""


class PathFact(NamedTuple):
    path: str
    mode: int  # st_mode of lstat, type bits included
    uid: int


def components(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b", "/a/b/c"]`` (lexically; ``path`` is absolute)."""
    pure = PurePosixPath(os.path.normpath(path))
    if not pure.is_absolute():
        raise ValueError(f"not an absolute path: {path!r}")
    return [str(PurePosixPath(*pure.parts[:i])) for i in range(1, len(pure.parts) + 1)]


def _who(mode: int) -> str:
    writers = [name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
               if mode & bit]
    return " and ".join(writers)


def check_chain(target: str, facts: Sequence[PathFact], me: int) -> str | None:
    """Why the folder ``target`` cannot safely hold copies of root files, or None.

    ``facts``: the existing components of ``target`` from ``/`` down (as ``components``
    lists them), stopping at the first missing one; the last is ``target`` when it exists.
    ``me``: the running user's uid. Pure.
    """
    for index, fact in enumerate(facts):
        path, mode, uid = fact
        if uid not in (0, me):
            return (f"{path} belongs to uid {uid}, not to root or to you: that user could "
                    f"swap the backup's folders; fix: chown root {path}, or choose a "
                    "folder only root controls")
        if path == target:
            if stat.S_ISLNK(mode):
                return f"{path} is a symlink: give the real path of the folder instead"
            if not stat.S_ISDIR(mode):
                return f"{path} exists and is not a folder"
            continue  # its mode is ours to set (0700)
        if stat.S_ISLNK(mode):
            continue  # the resolved path is checked on its own
        if not stat.S_ISDIR(mode):
            return f"{path} is not a folder"
        if not mode & (stat.S_IWGRP | stat.S_IWOTH):
            continue
        sticky = bool(mode & stat.S_ISVTX)
        if sticky and index + 1 < len(facts):
            continue  # the next component exists and is checked in turn
        perms = stat.S_IMODE(mode)
        if sticky:
            below = components(target)[index + 1]
            return (f"{path} is writable by {_who(mode)} (mode {perms:04o}, sticky) and "
                    f"{below} does not exist yet: another user could create it first; "
                    f"fix: mkdir -m 700 {below} as root, or choose a folder only root "
                    "can write")
        return (f"{path} is writable by {_who(mode)} (mode {perms:04o}): another user "
                f"could replace what lies below it; fix: chmod go-w {path}, or choose a "
                "folder only root can write")
    return None


def gather_chain(target: str) -> list[PathFact]:
    """``lstat`` of each component of ``target`` from ``/`` down to the first missing one."""
    facts: list[PathFact] = []
    for path in components(target):
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            break
        facts.append(PathFact(path, info.st_mode, info.st_uid))
    return facts


def check_folder(target: Path | str) -> None:
    """Raise FolderError when ``target`` (missing or not) is unsafe for a backup's data.

    When a component is a symlink, the resolved path's components are checked too: the
    link's owner decides where it points, and the folders it points through decide who
    can swap what lies below.
    """
    target = os.path.normpath(os.path.abspath(target))
    me = os.geteuid()
    facts = gather_chain(target)
    problem = check_chain(target, facts, me)
    if problem is None and any(stat.S_ISLNK(f.mode) for f in facts if f.path != target):
        parent = os.path.realpath(os.path.dirname(target))
        real = os.path.join(parent, os.path.basename(target))
        problem = check_chain(real, gather_chain(real), me)
    if problem:
        raise FolderError(problem)


def make_private(target: Path | str) -> str | None:
    """Check ``target``, create what is missing with mode 0700, make ``target`` itself 0700.

    Returns a note when an existing ``target`` had another mode (``0755 -> 0700``). The
    check runs again after creating, so a component another user created in between is
    refused (and nothing is written into it).
    """
    target = os.path.normpath(os.path.abspath(target))
    check_folder(target)
    for path in components(target):
        try:
            os.mkdir(path, PRIVATE_MODE)
        except FileExistsError:
            continue
        except OSError as exc:
            raise FolderError(f"cannot create {path}: {exc.strerror}") from None
    check_folder(target)
    info = os.lstat(target)
    mode = stat.S_IMODE(info.st_mode)
    if mode != PRIVATE_MODE:
        os.chmod(target, PRIVATE_MODE)
        return f"{target}: mode {mode:04o} -> 0700"
    return None


# --- mounts (the parser is roles.core.mounts') -----------------------------------------


def missing_mount_options(mount: Mount) -> list[str]:
    return [option for option in ("nosuid", "nodev") if option not in mount.options]
