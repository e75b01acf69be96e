"""What ``sshd -T`` prints, pure: the effective settings, one key and value per line."""

from __future__ import annotations

import re

_SSHD_T_KEY = re.compile(r"[a-z0-9]+")


def parse_sshd_T_multi(output: str) -> dict[str, list[str]]:
    """Every value of every key in `sshd -T` output, in order.

    Only lines whose key is lower-case alphanumeric count, so stderr noise mixed into the
    output (``/etc/ssh/sshd_config line 3: Deprecated option``) is skipped.
    """
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        parts = line.strip().split(None, 1)
        if not parts or not _SSHD_T_KEY.fullmatch(parts[0]):
            continue
        values.setdefault(parts[0], []).append(parts[1].strip() if len(parts) > 1 else "")
    return values


def parse_sshd_T(output: str) -> dict[str, str]:
    """`sshd -T` output as key -> first value."""
    return {key: values[0] for key, values in parse_sshd_T_multi(output).items()}
