"""rsync itself, pure: release numbers and what ``rsync --version`` prints."""

from __future__ import annotations

import re

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(pre\d+)?$")
_VERSION_LINE_RE = re.compile(
    r"rsync\s+version\s+v?(?P<version>\S+)\s+protocol\s+version\s+(?P<protocol>\d+)"
)


def validate_version(version: str) -> str:
    """Return ``version`` if it looks like ``3.2.7`` or ``3.4.0pre1``, else raise."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"invalid rsync version {version!r}: expected e.g. 3.2.7 or 3.4.0pre1")
    return version


def version_key(version: str) -> tuple[int, int, int]:
    m = _VERSION_RE.match(validate_version(version))
    assert m is not None
    return int(m[1]), int(m[2]), int(m[3])


def parse_version_output(text: str) -> tuple[str, int]:
    """``(version, protocol)`` from ``rsync --version`` output (2.6.9 through 3.5.x).

    ``rsync  version 3.2.7  protocol version 31``; pre-releases print a ``.PRn``
    sub-protocol after the number, git builds a ``v`` before the version.
    """
    for line in text.splitlines():
        m = _VERSION_LINE_RE.search(line)
        if m:
            return m["version"], int(m["protocol"])
    first = text.strip().splitlines()[0] if text.strip() else "<empty>"
    raise ValueError(f"not an rsync --version output: {first!r}")
