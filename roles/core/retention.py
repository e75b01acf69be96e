"""Which snapshots survive a prune: the newest N, plus daily/weekly/monthly keeps.

Pure. rsnapshot's ``retain`` in spirit, borg prune's rules in detail: ``daily: 7`` keeps
the NEWEST snapshot of each of the 7 most recent UTC days that have one (days without a
snapshot are skipped, not counted), ``weekly`` the same per ISO week (Monday to Sunday),
``monthly`` per calendar month. The rules add up: a snapshot kept by any rule stays. The
newest snapshot always stays (``latest`` points at it). Snapshot names are their UTC start
times (``2026-11-26T101500Z``, ``-2`` for a second run in the same second), so the
buckets come from the names alone; nothing is read from disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

_NAME = re.compile(r"^(\d{4}-\d\d-\d\dT\d{6}Z)(?:-([1-9]\d*))?$")


@dataclass(frozen=True)
class Retention:
    """``last``: the newest N (``backup.snapshots``); the others: ``backup.retain``."""
    last: int
    daily: int = 0
    weekly: int = 0
    monthly: int = 0


def snapshot_time(name: str) -> datetime | None:
    """The UTC start time in a snapshot's name, or None when it is not a snapshot name."""
    match = _NAME.match(name)
    if not match:
        return None
    try:
        return datetime.strptime(match[1], "%Y-%m-%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _order(name: str) -> tuple[datetime, int]:
    match = _NAME.match(name)
    assert match is not None
    return snapshot_time(name) or datetime.min.replace(tzinfo=UTC), int(match[2] or 1)


_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
}


def plan_retention(names: Iterable[str], rule: Retention) -> tuple[list[str], list[str]]:
    """``(keep, delete)``, each oldest first, over the complete snapshots in ``names``
    (other names are neither kept nor deleted: they are not snapshots)."""
    snapshots = sorted((n for n in names if snapshot_time(n) is not None), key=_order)
    if rule.last <= 0 and not (rule.daily or rule.weekly or rule.monthly):
        return snapshots, []  # mirror mode or no rule: nothing is pruned
    newest_first = list(reversed(snapshots))
    kept: set[str] = set(newest_first[:max(rule.last, 1)])
    for kind, count in (("daily", rule.daily), ("weekly", rule.weekly),
                        ("monthly", rule.monthly)):
        seen: set[tuple[int, ...]] = set()
        for name in newest_first:
            if len(seen) >= count:
                break
            bucket = _BUCKETS[kind](snapshot_time(name))  # type: ignore[arg-type]
            if bucket not in seen:
                seen.add(bucket)
                kept.add(name)
    return ([n for n in snapshots if n in kept], [n for n in snapshots if n not in kept])
