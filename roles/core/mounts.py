"""A server's (or this machine's) mount table, pure: ``/proc/self/mountinfo`` parsed, the
mount holding a path, and the mounts a ``-x`` pull of ``backup.source`` leaves out.

``rsync -x`` (``--one-file-system``) stays on the file system of each source it is given:
a directory on another file system is sent empty (its mount point only), so a separately
mounted ``/home``, ``/var`` or ``/boot`` is silently missing from the copy. ``skipped``
names those mounts; doctor warns about each, and ``backup.extra_sources`` pulls them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# File systems without files worth a backup: the kernel's views (proc, sysfs, cgroups...),
# device nodes (devtmpfs, devpts), automount triggers and read-only package images (snap's
# squashfs, reinstalled from their store). A tmpfs or ramfs may hold what a service wrote
# there, so those are reported unless an exclude leaves their place out (/run, /tmp, /dev).
PSEUDO_FSTYPES = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs",
    "debugfs", "tracefs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs",
    "binfmt_misc", "efivarfs", "nsfs", "rpc_pipefs", "selinuxfs", "squashfs",
    "fuse.gvfsd-fuse", "fuse.portal", "fuse.lxcfs",
})


@dataclass(frozen=True)
class Mount:
    point: str
    options: frozenset[str]  # the per-mount options (nosuid, nodev, ro...)
    fstype: str


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\040`` etc."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """``/proc/self/mountinfo``: ``ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] -
    FSTYPE SOURCE SUPER``; malformed lines are skipped. In file order (later mounts stack
    on earlier ones)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:] or len(fields) < 7:
            continue
        dash = fields.index("-", 6)
        if dash + 1 >= len(fields):
            continue
        mounts.append(Mount(unescape(fields[4]), frozenset(fields[5].split(",")),
                            fields[dash + 1]))
    return mounts


def _inside(path: str, point: str) -> bool:
    point = point.rstrip("/") or "/"
    return path == point or point == "/" or path.startswith(point + "/")


def mount_of(mounts: Iterable[Mount], path: str) -> Mount | None:
    """The mount holding ``path`` (resolved): the longest mount point above it, the last
    one listed when several are stacked on the same point."""
    best: Mount | None = None
    best_length = -1
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        if _inside(path, point) and len(point) >= best_length:
            best, best_length = mount, len(point)
    return best


def _ancestors(relative: str) -> list[str]:
    """``/a/b/c`` -> ``/a``, ``/a/b``, ``/a/b/c``."""
    parts = [p for p in relative.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def excluded(relative: str, patterns: Iterable[str]) -> bool:
    """Whether a pull leaves out the directory at ``relative`` (``/``-rooted, relative to
    the transfer root), by the ``--exclude`` patterns it sends (``pull_exclude``): an
    anchored pattern (``/run/*``) matches the path or a folder above it, and ``/X/*``
    also covers ``X`` itself (its contents are all that is on the mount); an unanchored
    one (``cache/``, ``*.img``) matches the tail of one of those paths, as rsync does."""
    chain = _ancestors(relative)
    for raw in patterns:
        pattern = raw.rstrip("/") or raw
        if pattern.startswith("/"):
            if pattern.endswith("/*") and relative.rstrip("/") == pattern[:-2]:
                return True
            if any(fnmatch.fnmatchcase(path, pattern) for path in chain):
                return True
        else:
            if any(fnmatch.fnmatchcase(path, "*/" + pattern) for path in chain):
                return True
    return False


def skipped(mounts: Sequence[Mount], source: str, pull_exclude: Iterable[str],
            extra_sources: Iterable[str] = (), not_directories: Iterable[str] = ()
            ) -> list[Mount]:
    """The mounts strictly below ``source`` that a ``-x`` pull leaves out: not a pseudo
    file system, not excluded, not an extra source's own mount point. Only the topmost of
    stacked mounts counts, and a mount on a file (a container's ``/etc/hosts``) is copied
    as a file, so ``not_directories`` (mount points the server found not to be folders)
    are left out. In mount-point order."""
    top = source.rstrip("/") or "/"
    extras = {e.rstrip("/") or "/" for e in extra_sources}
    patterns = list(pull_exclude)
    files = set(not_directories)
    last: dict[str, Mount] = {}
    for mount in mounts:
        last[mount.point.rstrip("/") or "/"] = mount
    out: list[Mount] = []
    for point, mount in sorted(last.items()):
        if point == top or not _inside(point, top) or point in files or point in extras:
            continue
        if mount.fstype in PSEUDO_FSTYPES:
            continue
        relative = point[len(top):] if top != "/" else point
        if excluded(relative, patterns):
            continue
        out.append(mount)
    return out
