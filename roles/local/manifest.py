"""A tree's metadata, as a restore drill compares it: one JSON line per entry.

Run here (``scan``) and, unchanged, on a server or a restore target as root
(``python3 -c SOURCE ROOT``: ``roles.features.drill`` sends this file's text), so both
sides are read by the same code. Standard library only, for that reason.

Per entry: relative path, type, permission bits (setuid/setgid/sticky included), numeric
owner and group, mtime in nanoseconds, size, allocated bytes (``st_blocks * 512``: holes),
device numbers, symlink target, a hard-link key (device and inode, for entries with more
than one link), every xattr (raw values, hex), the POSIX ACLs (the kernel's
``system.posix_acl_access``/``_default`` values, raw) and, for regular files, a SHA-256.
Like ``rsync -x`` it stays on the root's file system: a mount point is listed (as the
mounted root's attributes, which is what rsync copies), its contents are not. Other
``system.*`` attributes are left out: rsync never copies them (``-A`` carries the ACLs).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterator

ACL_NAMES = {"system.posix_acl_access": "access", "system.posix_acl_default": "default"}
_KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
          stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def _name(raw: bytes) -> str:
    # JSON carries str: undecodable bytes travel as surrogates (os.fsdecode's way) and
    # come back unchanged on the other side.
    return raw.decode("utf-8", "surrogateescape")


def _attributes(path: bytes) -> tuple[dict[str, str], dict[str, str]]:
    xattrs: dict[str, str] = {}
    acls: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a file system without xattrs: none to compare
        return xattrs, acls
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
        if name in ACL_NAMES:
            acls[ACL_NAMES[name]] = value.hex()
        elif not name.startswith("system."):
            xattrs[name] = value.hex()
    return xattrs, acls


def _digest(path: bytes) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs the owner or root
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry(path: bytes, rel: bytes, info: os.stat_result, *, content: bool) -> dict:
    kind = _KINDS.get(stat.S_IFMT(info.st_mode), "?")
    out: dict = {"p": _name(rel), "t": kind, "m": stat.S_IMODE(info.st_mode),
                 "u": info.st_uid, "g": info.st_gid, "mt": info.st_mtime_ns}
    if kind == "f":
        out["sz"] = info.st_size
        out["al"] = info.st_blocks * 512
        if content:
            out["h"] = _digest(path)
    if kind != "d" and info.st_nlink > 1:
        out["ln"] = f"{info.st_dev}:{info.st_ino}"
    if kind in ("c", "b"):
        out["rdev"] = [os.major(info.st_rdev), os.minor(info.st_rdev)]
    if kind == "l":
        out["l"] = _name(os.readlink(path))
    xattrs, acls = _attributes(path)
    if xattrs:
        out["x"] = xattrs
    if acls:
        out["acl"] = acls
    return out


def scan(root: str | bytes, *, content: bool = True) -> Iterator[dict]:
    """Every entry under ``root`` (``root`` itself as ``""``), on ``root``'s file system."""
    top = os.fsencode(root)
    info = os.lstat(top)
    device = info.st_dev
    yield entry(top, b"", info, content=content)
    if not stat.S_ISDIR(info.st_mode):
        return
    stack = [(top, b"")]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as entries:
            children = sorted(entries, key=lambda e: e.name)
        for child in children:
            child_rel = rel + b"/" + child.name if rel else child.name
            info = child.stat(follow_symlinks=False)
            yield entry(child.path, child_rel, info, content=content)
            if stat.S_ISDIR(info.st_mode) and info.st_dev == device:
                stack.append((child.path, child_rel))


def write(root: str | bytes, out, *, content: bool = True) -> int:
    count = 0
    for item in scan(root, content=content):
        out.write(json.dumps(item, sort_keys=True) + "\n")
        count += 1
    return count


def read(text: str) -> list[dict]:
    """The entries of ``write``'s output."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--no-content"):
        print("usage: manifest ROOT [--no-content]", file=sys.stderr)
        return 2
    write(argv[1], sys.stdout, content=len(argv) == 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
