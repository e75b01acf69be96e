"""roles.core.retention: which snapshots survive, as tables of timestamps."""

from __future__ import annotations

import pytest

from roles.core.retention import Retention, plan_retention, snapshot_time


def name(text: str) -> str:
    """``2026-11-26 10:15`` -> ``2026-11-26T101500Z``."""
    day, clock = text.split()
    return f"{day}T{clock.replace(':', '')}00Z"


# Two runs a day for 10 days, 2026-11-01 (a Sunday) .. 2026-11-10.
TWICE_DAILY = [name(f"2026-11-{d:02d} {h}") for d in range(1, 11) for h in ("02:30", "14:30")]


@pytest.mark.parametrize(("names", "rule", "kept"), [
    # keep-last only: the newest N, as `snapshots: N` always did.
    (TWICE_DAILY, Retention(last=3),
     [name("2026-11-09 14:30"), name("2026-11-10 02:30"), name("2026-11-10 14:30")]),
    # daily: the newest of each of the 3 newest days (+ the newest overall, included).
    (TWICE_DAILY, Retention(last=1, daily=3),
     [name("2026-11-08 14:30"), name("2026-11-09 14:30"), name("2026-11-10 14:30")]),
    # weekly: ISO weeks. Nov 1 is a Sunday (week 44), Nov 2-8 week 45, Nov 9-10 week 46.
    (TWICE_DAILY, Retention(last=1, weekly=3),
     [name("2026-11-01 14:30"), name("2026-11-08 14:30"), name("2026-11-10 14:30")]),
    # The rules add up: last 2 + daily 2 + weekly 2 overlap on the newest ones.
    (TWICE_DAILY, Retention(last=2, daily=2, weekly=2),
     [name("2026-11-08 14:30"), name("2026-11-09 14:30"), name("2026-11-10 02:30"),
      name("2026-11-10 14:30")]),
    # Days without a snapshot are skipped, not counted: daily 3 reaches back past a gap.
    ([name("2026-10-01 02:30"), name("2026-10-05 02:30"), name("2026-10-06 02:30"),
      name("2026-10-06 12:00")], Retention(last=1, daily=3),
     [name("2026-10-01 02:30"), name("2026-10-05 02:30"), name("2026-10-06 12:00")]),
    # monthly across a year boundary: the newest of each month.
    ([name("2025-11-15 02:30"), name("2025-12-01 02:30"), name("2025-12-31 02:30"),
      name("2026-01-02 02:30"), name("2026-01-20 02:30")], Retention(last=1, monthly=2),
     [name("2025-12-31 02:30"), name("2026-01-20 02:30")]),
    # More buckets asked for than exist: everything stays.
    ([name("2026-01-01 00:00"), name("2026-02-01 00:00")], Retention(last=1, monthly=12),
     [name("2026-01-01 00:00"), name("2026-02-01 00:00")]),
    # A second run in the same second (-2) sorts after the first and is the day's newest.
    (["2026-03-03T010000Z", "2026-03-03T010000Z-2", "2026-03-04T010000Z"],
     Retention(last=1, daily=2), ["2026-03-03T010000Z-2", "2026-03-04T010000Z"]),
    # last=0 with a rule still keeps the newest (latest points at it).
    ([name("2026-01-01 00:00"), name("2026-01-01 12:00")], Retention(last=0, weekly=1),
     [name("2026-01-01 12:00")]),
    # No rule at all (mirror mode): nothing is pruned.
    ([name("2026-01-01 00:00"), name("2026-01-02 00:00")], Retention(last=0),
     [name("2026-01-01 00:00"), name("2026-01-02 00:00")]),
    # Not snapshots: neither kept nor deleted.
    (["latest", "tree", "2026-01-01T000000Z.partial", name("2026-01-01 00:00")],
     Retention(last=1), [name("2026-01-01 00:00")]),
])
def test_plan_retention(names, rule, kept):
    keep, delete = plan_retention(names, rule)
    assert keep == kept
    snapshots = [n for n in names if snapshot_time(n) is not None]
    assert sorted(keep + delete) == sorted(snapshots)
    assert not set(keep) & set(delete)


def test_input_order_does_not_matter():
    shuffled = TWICE_DAILY[7:] + TWICE_DAILY[:7]
    assert plan_retention(shuffled, Retention(last=2, daily=4)) == \
        plan_retention(TWICE_DAILY, Retention(last=2, daily=4))


@pytest.mark.parametrize("bad", ["2026-13-01T000000Z", "2026-01-01T000000", "latest", ""])
def test_snapshot_time_rejects_non_snapshot_names(bad):
    assert snapshot_time(bad) is None
