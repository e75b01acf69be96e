"""status: what the last backups of each host did, from local files only.

Reads the run summaries ``DEST.pullback/logs/<run>.json`` that ``backup`` writes and lists
the complete snapshots in ``DEST``; no host is contacted. Dry runs are not backups and are
ignored. A host is STALE when its newest good backup (exit 0 or 24) started more than
``backup.max_age`` hours ago, or when it never had one: ``invoke status`` then exits 1, so
a monitor (cron mail, Nagios/Icinga ``check_by_ssh``, a systemd ``OnFailure=``) can alert.

Age is measured from the START of the run: the data is at least that old.

Log retention: ``plan_log_prune`` keeps the newest N runs' ``.log`` + ``.json`` pairs
(``DEFAULT_KEEP_LOGS``); ``prune_logs`` applies it and is meant to run at the end of each
backup, while the lock is held.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from roles.core.pull import not_a_backup
from roles.core.spec import HostSpec
from roles.core.table import format_rows
from roles.local.store import complete_snapshots, human_bytes, run_key, state_dir


@dataclass(frozen=True)
class Run:
    run: str
    started: datetime
    ok: bool
    exit_code: int | None
    seconds: float
    transferred: int | None = None  # rsync's "Total transferred file size"
    received: int | None = None  # bytes over the wire
    dry_run: bool = False
    error: str | None = None

    @property
    def result(self) -> str:
        if not self.ok:
            return "failed" if self.exit_code is None else f"failed ({self.exit_code})"
        return "ok (24)" if self.exit_code == 24 else "ok"


def _started(data: dict[str, Any], run: str) -> datetime:
    text = data.get("started")
    if isinstance(text, str):
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    # No "started" field: the run id is the UTC start time.
    key = run_key(run)
    if key is None:
        raise ValueError(f"no start time and {run!r} is not a run id")
    return datetime.strptime(key[0], "%Y-%m-%dT%H%M%SZ").replace(tzinfo=UTC)


def parse_summary(data: Any, run: str) -> Run:
    """A ``logs/<run>.json`` summary; ValueError when it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ValueError("not a backup summary (no boolean 'ok')")
    stats = data.get("stats") if isinstance(data.get("stats"), dict) else {}
    code = data.get("exit_code")
    seconds = data.get("seconds")

    def number(key: str) -> int | None:
        value = stats.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    dry_run = bool(data.get("dry_run"))
    ok, error = data["ok"], data.get("error")
    # rsync's output said (DRY RUN) (or BATCH ONLY) though the run was meant to be real
    # (a summary written before backup refused such runs): failed, never a good backup.
    nothing_copied = None if dry_run else not_a_backup(stats)
    if nothing_copied:
        ok, error = False, nothing_copied
    return Run(
        run=str(data.get("run") or run),
        started=_started(data, run),
        ok=ok,
        exit_code=code if isinstance(code, int) else None,
        seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
        transferred=number("transferred_size"),
        received=number("bytes_received"),
        dry_run=dry_run,
        error=error if isinstance(error, str) else None,
    )


def read_runs(logs: Path) -> tuple[list[Run], list[str]]:
    """Every readable summary in ``logs`` (oldest first) and one line per unreadable one."""
    runs: list[Run] = []
    problems: list[str] = []
    try:
        names = os.listdir(logs)
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"cannot read {logs}: {exc.strerror}"]
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if not dot or ext != "json" or run_key(stem) is None:
            continue  # temp files (.RUN.json.tmp), the .log files, strangers
        try:
            runs.append(parse_summary(json.loads((logs / name).read_text()), stem))
        except (OSError, ValueError) as exc:
            problems.append(f"skipped {logs / name}: {exc}")
    runs.sort(key=lambda r: (r.started, run_key(r.run) or (r.run, 0)))
    return runs, problems


@dataclass(frozen=True)
class HostStatus:
    host: str
    max_age: float  # hours
    last: Run | None
    newest_good: Run | None
    age_hours: float | None  # of the newest good backup
    snapshots: int | None  # complete snapshots; None in mirror mode
    stale: bool
    problems: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        if self.newest_good is None:
            return "STALE (never)"
        return f"STALE (> {self.max_age:g}h)" if self.stale else "fresh"


def plan_status(host: str, runs: Iterable[Run], *, now: datetime, max_age: float,
                snapshots: int | None = None, problems: Iterable[str] = ()) -> HostStatus:
    """Pure: the newest real run, the newest good one, its age, and whether it is stale."""
    real = sorted((r for r in runs if not r.dry_run), key=lambda r: r.started)
    good = [r for r in real if r.ok]
    newest_good = good[-1] if good else None
    age = None
    if newest_good is not None:
        # A clock set back must not make a backup look fresher than "just now".
        age = max(0.0, (now - newest_good.started).total_seconds() / 3600)
    return HostStatus(
        host=host, max_age=max_age, last=real[-1] if real else None, newest_good=newest_good,
        age_hours=age, snapshots=snapshots, stale=age is None or age > max_age,
        problems=tuple(problems),
    )


def gather_status(host: HostSpec, now: datetime | None = None) -> HostStatus:
    """Read ``host``'s summaries and snapshots on this machine; contact nothing."""
    now = now or datetime.now(UTC)
    runs, problems = read_runs(state_dir(host) / "logs")
    snapshots = None
    if host.backup.snapshots:
        dest = Path(host.destination.rstrip("/"))
        try:
            snapshots = len(complete_snapshots(os.listdir(dest)))
        except FileNotFoundError:
            snapshots = 0
        except OSError as exc:
            problems.append(f"cannot list {dest}: {exc.strerror}")
    return plan_status(host.name, runs, now=now, max_age=host.backup.max_age,
                       snapshots=snapshots, problems=problems)


def format_age(hours: float | None) -> str:
    if hours is None:
        return "never"
    minutes = round(hours * 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 48 * 60:
        return f"{minutes // 60}h {minutes % 60:02d}m"
    return f"{minutes // 1440}d {minutes % 1440 // 60}h"


def format_table(statuses: Iterable[HostStatus]) -> str:
    rows = [("host", "last run (UTC)", "result", "seconds", "transferred", "received",
             "snapshots", "newest good", "state")]
    for s in statuses:
        last = s.last
        rows.append((
            s.host,
            last.started.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if last else "never",
            last.result if last else "-",
            f"{last.seconds:.1f}" if last else "-",
            human_bytes(last.transferred) if last else "-",
            human_bytes(last.received) if last else "-",
            "mirror" if s.snapshots is None else str(s.snapshots),
            format_age(s.age_hours) + (" ago" if s.age_hours is not None else ""),
            s.state,
        ))
    return format_rows(rows)


# --- status --json ---------------------------------------------------------------------------

JSON_VERSION = 1  # raised only when a key changes meaning or goes away (docs/tasks.md)


def run_json(run: Run | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run": run.run, "started": run.started.astimezone(UTC).isoformat(),
            "ok": run.ok, "exit_code": run.exit_code, "seconds": run.seconds,
            "transferred_bytes": run.transferred, "received_bytes": run.received,
            "error": run.error}


def status_json(statuses: Iterable[HostStatus], now: datetime) -> dict[str, Any]:
    """Pure: what ``status --json`` prints; the keys are documented and stable."""
    hosts = [{
        "host": s.host,
        "state": "never" if s.newest_good is None else ("stale" if s.stale else "fresh"),
        "stale": s.stale,
        "max_age_hours": s.max_age,
        "age_hours": None if s.age_hours is None else round(s.age_hours, 4),
        "snapshots": s.snapshots,
        "last_run": run_json(s.last),
        "newest_good": run_json(s.newest_good),
        "problems": list(s.problems),
    } for s in statuses]
    return {"version": JSON_VERSION, "generated": now.astimezone(UTC).isoformat(),
            "hosts": hosts, "stale": [h["host"] for h in hosts if h["stale"]]}


# --- log retention ------------------------------------------------------------------------


def moved_note(name: str, copy: str, shard: tuple[int, int], owner: int) -> str:
    """What status says of a host this backup host still holds a copy of, but whose shard
    is another one now (the fleet grew or shrank)."""
    k, n = shard
    return (f"{name}: warning: not in shard {k}/{n}: shard {owner}/{n} backs it up now, and "
            f"the copy here ({copy}) is no longer updated; move it to that backup host "
            f"before its first pull there (`rsync -aH --numeric-ids {copy}/ "
            f"BACKUP-HOST:{copy}/`, as root, for snapshots and the .pullback logs alike), "
            "or remove it")

