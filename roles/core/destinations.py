"""Where a backup may live on the backup host, pure: an allow-list of roots, and the folders
no destination may ever be, hold or lie in.

A backup's DEST is made 0700 and owned by the running user (``roles.local.folders``), and
the pull into it deletes (``--delete``): a DEST that is a system folder, a home folder or
the folder of the toolkit or its keys would lose its mode or its contents. A deny-list of
such folders only grows; so a DEST must lie strictly BELOW one of a few roots meant for
data (``ALLOWED_ROOTS``, ``ALLOWED_TOP_PREFIXES``) or below the inventory's explicit
``backup.allow_destination``, and even then never in or at a system folder
(``SYSTEM_TREES``, ``NEVER_EXACTLY``, a home folder itself), never holding the toolkit, its
keys or its known_hosts. The state folder ``DEST.pullback`` sits beside DEST and follows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import PurePosixPath

# DEST must be strictly below one of these (the root itself is never a DEST)...
ALLOWED_ROOTS = ("/var/backups", "/srv", "/mnt", "/media")
# ...or below a top-level folder whose name starts so: /backup, /backups, /backup2, /data...
ALLOWED_TOP_PREFIXES = ("backup", "data")
# Never a DEST, nor anything inside them (the system, its state and logs).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/run", "/sbin", "/sys", "/usr", "/snap", "/var/cache", "/var/lib",
                "/var/lock", "/var/log", "/var/mail", "/var/run", "/var/spool")
# Never a DEST themselves (below them is a matter of the allow-list).
NEVER_EXACTLY = ("/", "/home", "/root", "/tmp", "/var", "/var/tmp", "/opt", "/lost+found",
                 *ALLOWED_ROOTS)
HOMES = "/home"

# Test seam: roots the test suite adds (pytest's temporary folder). Only Python code can set
# it; nothing in an inventory reaches it.
EXTRA_ROOTS: list[str] = []


def _norm(path: str) -> PurePosixPath:
    return PurePosixPath(os.path.normpath(path))


def _within(path: PurePosixPath, root: PurePosixPath) -> bool:
    """``path`` is ``root`` or below it."""
    return path == root or root in path.parents


def system_problem(path: str) -> str | None:
    """Why ``path`` is a system or home folder no backup may be (or be in), or None."""
    where = _norm(path)
    for tree in SYSTEM_TREES:
        if where == PurePosixPath(tree):
            return f"{path} is a system folder"
        if _within(where, PurePosixPath(tree)):
            return f"{path} is inside the system folder {tree}"
    if where.parent == PurePosixPath(HOMES) or where == PurePosixPath("/root"):
        return f"{path} is a home folder"
    if str(where) in NEVER_EXACTLY:
        return f"{path} is a system folder"
    return None


def allowed_roots(allow: str | None = None) -> list[str]:
    """The roots a DEST may lie below, for the messages."""
    return [*ALLOWED_ROOTS, *(f"/{p}*" for p in ALLOWED_TOP_PREFIXES),
            *([allow] if allow else [])]


def _below_a_root(where: PurePosixPath, allow: str | None) -> bool:
    roots = [*ALLOWED_ROOTS, *EXTRA_ROOTS, *([allow] if allow else [])]
    if any(where != _norm(root) and _within(where, _norm(root)) for root in roots):
        return True
    parts = where.parts
    return len(parts) >= 3 and parts[1].startswith(ALLOWED_TOP_PREFIXES)


def allow_problem(allow: str) -> str | None:
    """Why ``backup.allow_destination`` cannot be a root for destinations, or None."""
    if _norm(allow) == PurePosixPath("/"):
        return "/ cannot be allowed: name the folder that holds the backups"
    where = _norm(allow)
    if any(_within(where, PurePosixPath(tree)) for tree in SYSTEM_TREES):
        return system_problem(allow)
    return None


def destination_problem(dest: str, *, allow: str | None = None,
                        keep_out: Iterable[tuple[str, str]] = ()) -> str | None:
    """Why ``dest`` (a DEST after ``{name}``) may not hold a backup, or None. Pure.

    ``allow``: ``backup.allow_destination``, one more root. ``keep_out``: ``(what, path)``
    of files DEST must neither be the folder of nor hold (the keys, known_hosts, the
    toolkit's own folder).
    """
    where = _norm(dest)
    state = PurePosixPath(str(where) + ".pullback")
    problem = system_problem(dest)
    if problem:
        return f"{problem}; a backup there would change it (mode 0700, --delete)"
    for what, path in keep_out:
        other = _norm(path)
        for mine in (where, state):
            if _within(other, mine):
                return (f"{dest} holds {what} {path}: a backup there would change it "
                        "(mode 0700, --delete); choose a folder of its own")
    if not _below_a_root(where, allow):
        return (f"{dest} is not below a folder meant for backups ("
                f"{', '.join(allowed_roots(allow))}); choose one, or name its root in "
                "backup.allow_destination")
    return None


def dests_meet(dest: str, other_dest: str) -> bool:
    """Whether two hosts' DESTs (or their ``.pullback`` state folders) meet: the same
    folder, or one inside the other."""
    mine = (_norm(dest), _norm(dest.rstrip("/") + ".pullback"))
    theirs = (_norm(other_dest), _norm(other_dest.rstrip("/") + ".pullback"))
    return any(_within(a, b) or _within(b, a) for a in mine for b in theirs)
