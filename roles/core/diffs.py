"""Unified diffs of planned file changes, as `--dry-run` prints them."""

from __future__ import annotations

import difflib


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their endings; only ``\\n`` ends a line (as for sshd and rsyncd).

    ``b"".join(split_lines(data)) == data`` always holds.
    """
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _lines(data: bytes) -> list[str]:
    # Split on "\n" only (a lone "\r" is not a line break for sshd or rsyncd) and keep
    # undecodable bytes visible instead of failing.
    parts = data.decode("utf-8", "backslashreplace").split("\n")
    out = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1] + "\n\\ No newline at end of file\n")
    return out


def unified(path: str, old: bytes | None, new: bytes | None) -> str:
    """Diff of ``path`` from ``old`` (None: the file is new) to ``new``; "" if equal.

    Names are ``a/etc/...`` and ``b/etc/...``: what ``patch -p1 -d /`` expects.
    """
    if old == new:
        return ""
    name = path.lstrip("/")
    before = "/dev/null" if old is None else f"a/{name}"
    after = "/dev/null" if new is None else f"b/{name}"
    return "".join(difflib.unified_diff(_lines(old or b""), _lines(new or b""), before, after))
