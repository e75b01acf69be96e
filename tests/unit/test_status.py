"""roles.features.status: summaries in, table and staleness out; log pruning as a table of names."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from roles.core.spec import HostSpec
from roles.features import status as st
from roles.inventory.schema import validate_host
from roles.local import store

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def run(hours_ago: float, ok: bool = True, *, code: int | None = 0, dry_run: bool = False,
        seconds: float = 12.5) -> st.Run:
    started = NOW - timedelta(hours=hours_ago)
    return st.Run(run=started.strftime("%Y-%m-%dT%H%M%SZ"), started=started, ok=ok,
                  exit_code=code if ok else (code or 12), seconds=seconds,
                  transferred=2_500_000, received=1_200_000, dry_run=dry_run)


# --- plan_status (pure) -----------------------------------------------------------------------

CASES = {
    "fresh": ([run(30), run(2)], 36, False, 2.0, "fresh"),
    "stale": ([run(40)], 36, True, 40.0, "STALE (> 36h)"),
    "never ran": ([], 36, True, None, "STALE (never)"),
    "only failures": ([run(3, False), run(1, False)], 36, True, None, "STALE (never)"),
    "last run failed, an earlier one is still fresh": (
        [run(20), run(1, False)], 36, False, 20.0, "fresh"),
    "dry runs are not backups": ([run(50), run(1, dry_run=True)], 36, True, 50.0,
                                 "STALE (> 36h)"),
    "exit 24 is a good backup": ([run(5, code=24)], 36, False, 5.0, "fresh"),
    "a fractional max_age": ([run(2)], 1.5, True, 2.0, "STALE (> 1.5h)"),
    "a clock set back: age is zero, not negative": ([run(-3)], 36, False, 0.0, "fresh"),
}


@pytest.mark.parametrize("name", CASES)
def test_plan_status(name):
    runs, max_age, stale, age, state = CASES[name]
    status = st.plan_status("web1", runs, now=NOW, max_age=max_age)
    assert status.stale is stale
    assert status.age_hours == (None if age is None else pytest.approx(age))
    assert status.state == state


def test_the_last_run_is_the_newest_real_run_whatever_the_input_order():
    runs = [run(1, False), run(30), run(1.5, dry_run=True), run(10)]
    status = st.plan_status("web1", runs, now=NOW, max_age=36)
    assert status.last is runs[0] and status.newest_good is runs[3]


@pytest.mark.parametrize("hours, text", [
    (None, "never"), (0, "0m"), (0.5, "30m"), (1, "1h 00m"), (25.25, "25h 15m"),
    (47.99, "47h 59m"), (49, "2d 1h"), (24 * 10 + 3, "10d 3h"),
])
def test_format_age(hours, text):
    assert st.format_age(hours) == text


def test_format_table():
    statuses = [
        st.plan_status("web1", [run(2, code=24, seconds=3.25)], now=NOW, max_age=36,
                       snapshots=7),
        st.plan_status("db1", [run(60), run(1, False)], now=NOW, max_age=36),
        st.plan_status("new", [], now=NOW, max_age=36, snapshots=0),
    ]
    assert st.format_table(statuses).splitlines() == [
        "host  last run (UTC)    result       seconds  transferred  received  snapshots  "
        "newest good  state",
        "web1  2026-11-26 10:00  ok (24)      3.2      2.5 MB       1.2 MB    7          "
        "2h 00m ago   fresh",
        "db1   2026-11-26 11:00  failed (12)  12.5     2.5 MB       1.2 MB    mirror     "
        "2d 12h ago   STALE (> 36h)",
        "new   never             -            -        -            -         0          "
        "never        STALE (never)",
    ]


# --- summaries on disk ------------------------------------------------------------------------


def summary(run_id: str, started: datetime, **fields) -> dict:
    """What roles.features.backup.run_backup writes (the fields status reads, and a few more)."""
    data = {"host": "web1", "ok": True, "exit_code": 0, "seconds": 4.5,
            "stats": {"transferred_size": 1000, "bytes_received": 800, "files": 10},
            "log_path": "x", "summary_path": "y", "snapshot": None, "warning": None,
            "error": None, "dry_run": False, "run": run_id, "started": started.isoformat(),
            "mode": "mirror", "argv": ["rsync"], "destination": "/d", "pruned": []}
    return {**data, **fields}


def write_summary(logs: Path, started: datetime, **fields) -> str:
    run_id = started.strftime("%Y-%m-%dT%H%M%SZ")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{run_id}.json").write_text(json.dumps(summary(run_id, started, **fields)))
    (logs / f"{run_id}.log").write_text("# rsync ...\n")
    return run_id


def test_read_runs_parses_summaries_and_reports_unreadable_ones(tmp_path):
    logs = tmp_path / "logs"
    write_summary(logs, NOW - timedelta(hours=1))
    write_summary(logs, NOW - timedelta(hours=5), ok=False, exit_code=23, error="boom")
    (logs / "2026-11-20T000000Z.json").write_text("{not json")
    (logs / "2026-11-21T000000Z.json").write_text('["a list"]')
    (logs / ".2026-11-26T110000Z.json.tmp").write_text("{")  # a run being written
    (logs / "notes.json").write_text("{}")  # not a run file: ignored
    runs, problems = st.read_runs(logs)
    assert [(r.ok, r.exit_code, r.error) for r in runs] == [(False, 23, "boom"),
                                                            (True, 0, None)]
    assert runs[1].transferred == 1000 and runs[1].received == 800
    assert [p.split(":")[0] for p in problems] == [f"skipped {logs}/2026-11-20T000000Z.json",
                                                  f"skipped {logs}/2026-11-21T000000Z.json"]
    assert st.read_runs(tmp_path / "nothing") == ([], [])


def test_a_summary_without_started_uses_the_run_id():
    data = summary("2026-11-25T101500Z-2", NOW)
    del data["started"]
    assert st.parse_summary(data, "2026-11-25T101500Z-2").started == datetime(
        2026, 11, 25, 10, 15, tzinfo=UTC)


def host(tmp_path: Path, **backup) -> HostSpec:
    return validate_host({
        "name": "web1", "address": "192.0.2.10", "admin_user": "admin",
        "backup_key": "/keys/backup",
        "backup": {"destination": str(tmp_path / "{name}"), **backup}})


def test_gather_status_reads_state_dir_and_counts_complete_snapshots(tmp_path):
    h = host(tmp_path, snapshots=5, max_age=24)
    write_summary(tmp_path / "web1.pullback/logs", NOW - timedelta(hours=30))
    for name in ("2026-11-24T020000Z", "2026-11-25T020000Z", "2026-11-26T020000Z.partial",
                 "latest", "lost+found"):
        (tmp_path / "web1" / name).mkdir(parents=True)
    status = st.gather_status(h, now=NOW)
    assert status.snapshots == 2 and status.stale and status.age_hours == pytest.approx(30)


def test_gather_status_of_a_host_never_backed_up(tmp_path):
    status = st.gather_status(host(tmp_path, snapshots=3), now=NOW)
    assert status.snapshots == 0 and status.last is None and status.stale


# --- log pruning ------------------------------------------------------------------------------


def names(*runs: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"{r}{suffix}" for r in runs for suffix in (".log", ".json")] + list(extra)


PRUNE = {
    "fewer runs than keep": (names("2026-11-01T000000Z"), 3, []),
    "oldest runs go, both files": (
        names("2026-11-03T000000Z", "2026-11-01T000000Z", "2026-11-02T000000Z"), 2,
        ["2026-11-01T000000Z.json", "2026-11-01T000000Z.log"]),
    "same-second runs sort by sequence": (
        names("2026-11-01T000000Z-10", "2026-11-01T000000Z-2", "2026-11-01T000000Z"), 2,
        ["2026-11-01T000000Z.json", "2026-11-01T000000Z.log"]),
    "a log without its summary (a killed run) counts as a run": (
        ["2026-11-01T000000Z.log", *names("2026-11-02T000000Z")], 1,
        ["2026-11-01T000000Z.log"]),
    "strangers and temp files are never touched": (
        names("2026-11-01T000000Z", "2026-11-02T000000Z",
              extra=(".2026-11-01T000000Z.json.tmp", "README", "x.log", "lock")), 1,
        ["2026-11-01T000000Z.json", "2026-11-01T000000Z.log"]),
    "keep 0 keeps everything": (names("2026-11-01T000000Z", "2026-11-02T000000Z"), 0, []),
}


@pytest.mark.parametrize("name", PRUNE)
def test_plan_log_prune(name):
    given, keep, want = PRUNE[name]
    assert store.plan_log_prune(given, keep) == want


def test_prune_logs_keeps_the_newest_runs(tmp_path):
    logs = tmp_path / "logs"
    ids = [write_summary(logs, NOW - timedelta(hours=h)) for h in range(35)]
    (logs / "lock").write_text("")
    removed = store.prune_logs(logs)
    assert len(removed) == 10 and set(ids[30:]) == {n.rsplit(".", 1)[0] for n in removed}
    assert len(os.listdir(logs)) == 2 * store.DEFAULT_KEEP_LOGS + 1


def test_prune_logs_keeps_the_summaries_of_complete_snapshots(tmp_path):
    """The empty-source guard reads the newest snapshot's file count from its summary: a
    snapshot older than the newest 30 runs (failed and dry runs since) keeps it."""
    logs = tmp_path / "logs"
    ids = [write_summary(logs, NOW - timedelta(hours=h)) for h in range(35)]
    oldest, older = ids[34], ids[33]
    removed = store.prune_logs(logs, keep=5, protect=[oldest, "2020-01-01T000000Z"])
    assert {n.rsplit(".", 1)[0] for n in removed} == set(ids[5:34])
    assert (logs / f"{oldest}.json").exists() and not (logs / f"{older}.json").exists()


@pytest.mark.parametrize(("stats", "dry_run", "counted"), [
    ({"files": 10}, False, True),
    ({"files": 10, "dry_run": True}, False, False),  # rsync said (DRY RUN): no backup
    ({"files": 10, "batch_only": True}, False, False),  # (BATCH ONLY): nothing copied
    ({"files": 10, "dry_run": True}, True, False),  # a dry run asked for: ignored as ever
])
def test_a_run_whose_output_says_dry_run_is_never_a_good_backup(tmp_path, stats, dry_run,
                                                                 counted):
    logs = tmp_path / "logs"
    write_summary(logs, NOW - timedelta(hours=1), stats=stats, dry_run=dry_run)
    runs, _ = st.read_runs(logs)
    status = st.plan_status("web1", runs, now=NOW, max_age=36)
    assert (status.newest_good is not None) == counted
    assert status.stale == (not counted)
    if not counted and not dry_run:
        assert status.last is not None and status.last.result == "failed (0)"
        assert "(DRY RUN)" in status.last.error or "(BATCH ONLY)" in status.last.error
