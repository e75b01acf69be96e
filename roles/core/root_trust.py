"""What a job running as root may trust: files and folders only root can change.

A scheduled backup runs as root, reads the inventory (which names the local rsync, the
key, the destination and rsync's options) and runs the project's Python from its
virtualenv. Whoever can change either one gets root at the next run: a local user who
owns the inventory, or can write a module the job imports, or a folder on the way to them
(and so swap it). So, before anything else, ``pullback-backup`` run as root checks that

- every folder from ``/`` down to the inventory, the interpreter, the virtualenv and the
  project's own package, and each of them, belongs to root;
- none of them is writable by group or others, except a folder with the sticky bit on the
  way (``/tmp``: others cannot rename or delete root's entries in it);
- inside the virtualenv and the package, every file and folder belongs to root and is not
  writable by group or others (symlinks: their owner only; their mode means nothing).

``check_entries`` is the pure rule; ``roles.local.trust_paths`` reads the facts (``lstat``).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from typing import NamedTuple


class Entry(NamedTuple):
    path: str
    mode: int  # st_mode of lstat, type bits included
    uid: int


def problem_of(entry: Entry) -> str | None:
    """Why a job running as root must not trust ``entry``, or None."""
    path, mode, uid = entry
    if uid != 0:
        return (f"{path} belongs to uid {uid}, not root: that user could change what root "
                f"runs; fix: chown root {path}")
    if stat.S_ISLNK(mode):
        return None
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable or (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        return None
    who = " and ".join(name for bit, name in ((stat.S_IWGRP, "its group"),
                                               (stat.S_IWOTH, "others")) if mode & bit)
    return (f"{path} is writable by {who} (mode {stat.S_IMODE(mode):04o}): they could change "
            f"what root runs; fix: chmod go-w {path}")


def check_entries(what: str, entries: Iterable[Entry]) -> str | None:
    """The first problem among ``entries`` (``what`` names them: "the inventory"), as one
    line saying that the root job refuses to run, or None when root may trust them all."""
    for entry in entries:
        problem = problem_of(entry)
        if problem is not None:
            return (f"refused to run as root: {what} is not under root's sole control: "
                    f"{problem}")
    return None
