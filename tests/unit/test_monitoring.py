"""Monitoring's pure parts: the metrics file's text, status --json, diff's itemized lines."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from roles.features import status
from roles.features.snapshots import parse_itemized
from roles.local import metrics
from roles.local.ping import ping_url

T0 = 1_780_000_000.0


def run(host: str, ok: bool, code: int | None, **kw) -> metrics.RunMetrics:
    return metrics.RunMetrics(host=host, started=T0, seconds=12.5, ok=ok, exit_code=code, **kw)


def test_a_good_run_sets_every_metric():
    samples = metrics.merge_run({}, run("web1", True, 0, files=120, transferred=5000,
                                        received=700))
    assert samples == {
        "last_run_timestamp_seconds": T0, "last_success_timestamp_seconds": T0,
        "last_duration_seconds": 12.5, "last_exit_code": 0, "last_success": 1,
        "last_files": 120, "last_transferred_bytes": 5000, "last_received_bytes": 700,
    }


def test_a_failed_run_keeps_the_last_good_runs_numbers():
    good = metrics.merge_run({}, run("web1", True, 0, files=120, transferred=5000,
                                     received=700))
    later = metrics.RunMetrics("web1", T0 + 86400, 3.0, ok=False, exit_code=None)
    samples = metrics.merge_run(good, later)
    assert samples["last_success_timestamp_seconds"] == T0
    assert samples["last_run_timestamp_seconds"] == T0 + 86400
    assert samples["last_exit_code"] == -1 and samples["last_success"] == 0
    assert samples["last_files"] == 120


def test_render_and_parse_round_trip_with_odd_host_names():
    hosts = {'we"b\\1': metrics.merge_run({}, run('we"b\\1', False, 23)),
             "db1": metrics.merge_run({}, run("db1", True, 24, files=3))}
    text = metrics.render_metrics(hosts)
    assert metrics.parse_metrics(text) == hosts
    lines = text.splitlines()
    assert "# TYPE pullback_last_exit_code gauge" in lines
    assert 'pullback_last_exit_code{host="we\\"b\\\\1"} 23' in lines
    assert 'pullback_last_duration_seconds{host="db1"} 12.5' in lines
    # Every sample line is `name{labels} value`: what the textfile collector parses.
    for line in lines:
        assert line.startswith("# ") or line.count(" ") == 1


def test_update_keeps_other_hosts_and_drops_foreign_lines(tmp_path):
    path = tmp_path / "pullback.prom"
    metrics.update_metrics(path, [run("web1", True, 0, files=1), run("db1", True, 0)])
    path.write_text(path.read_text() + "some_other_metric 1\n")
    metrics.update_metrics(path, [run("db1", False, 12)])
    found = metrics.parse_metrics(path.read_text())
    assert found["web1"]["last_success"] == 1 and found["db1"]["last_success"] == 0
    assert found["db1"]["last_exit_code"] == 12
    assert "some_other_metric" not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(tmp_path)) == ["pullback.prom", "pullback.prom.lock"]


def test_update_into_a_missing_folder_raises(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        metrics.update_metrics(tmp_path / "nowhere" / "x.prom", [run("a", True, 0)])


@pytest.mark.parametrize(("base", "event", "url"), [
    ("https://hc.example/ping/abc", "start", "https://hc.example/ping/abc/start"),
    ("https://hc.example/ping/abc/", "success", "https://hc.example/ping/abc"),
    ("http://127.0.0.1:8000/x", "fail", "http://127.0.0.1:8000/x/fail"),
])
def test_ping_urls(base, event, url):
    assert ping_url(base, event) == url


# --- status --json ----------------------------------------------------------------------------

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_status_json_keys_are_stable():
    good = status.Run("2026-12-04T020000Z", NOW - timedelta(hours=10), True, 0, 42.0,
                      transferred=100, received=50)
    bad = status.Run("2026-12-04T110000Z", NOW - timedelta(hours=1), False, 23, 3.0,
                     error="some files could not be transferred")
    fresh = status.plan_status("web1", [good, bad], now=NOW, max_age=36, snapshots=3)
    never = status.plan_status("db1", [], now=NOW, max_age=36, snapshots=None)
    data = json.loads(json.dumps(status.status_json([fresh, never], NOW)))
    assert data["version"] == 1 and data["stale"] == ["db1"]
    assert data["generated"] == "2026-12-04T12:00:00+00:00"
    web1, db1 = data["hosts"]
    assert sorted(web1) == ["age_hours", "host", "last_run", "max_age_hours", "newest_good",
                            "problems", "snapshots", "stale", "state"]
    assert web1["state"] == "fresh" and web1["age_hours"] == 10.0 and web1["snapshots"] == 3
    assert web1["last_run"] == {"run": "2026-12-04T110000Z",
                                "started": "2026-12-04T11:00:00+00:00", "ok": False,
                                "exit_code": 23, "seconds": 3.0, "transferred_bytes": None,
                                "received_bytes": None,
                                "error": "some files could not be transferred"}
    assert web1["newest_good"]["run"] == "2026-12-04T020000Z"
    assert web1["newest_good"]["transferred_bytes"] == 100
    assert db1 == {"host": "db1", "state": "never", "stale": True, "max_age_hours": 36,
                   "age_hours": None, "snapshots": None, "last_run": None,
                   "newest_good": None, "problems": []}


# --- diff: rsync's itemized lines ---------------------------------------------------------------

ITEMIZED = """\
sending incremental file list
*deleting   gone.txt
*deleting   old-dir/
.d..t...... ./
>f+++++++++ added file
cd+++++++++ new-dir/
cL+++++++++ new-link -> target
hf+++++++++ new-dir/hard => added file
>f.st...... changed.txt
.f...p..... mode-only
.d...p..... dir-mode/
.d..t...... touched-dir/
>f..t.... old-rsync-changed

Number of files: 9
"""


def test_parse_itemized_sorts_lines():
    diff = parse_itemized(ITEMIZED, "A", "B")
    assert diff.added == ["added file", "new-dir/", "new-link", "new-dir/hard"]
    assert diff.removed == ["gone.txt", "old-dir/"]
    assert diff.changed == ["changed.txt", "mode-only", "dir-mode/", "old-rsync-changed"]


# --- the inventory's new fields -----------------------------------------------------------------

BASE = """\
defaults:
  admin_user: admin
  backup_key: /root/.ssh/backup
  backup: {destination: "/var/backups/pullback/{name}"}
hosts:
  web1:
    address: 10.0.0.1
"""


def load_with(extra: str):
    from roles.inventory.schema import load_text

    return load_text(BASE + extra, "inv.yaml").hosts["web1"]


def test_new_fields_load_with_their_defaults():
    host = load_with("")
    assert host.monitor.ping_url is None and host.monitor.metrics_file is None
    assert host.backup.pre == () and host.backup.post == ()
    assert (host.backup.retain.daily, host.backup.retain.weekly,
            host.backup.retain.monthly) == (0, 0, 0)
    host = load_with("    monitor: {ping_url: 'https://hc.example/p/1/', "
                     "metrics_file: /var/lib/node/pullback.prom}\n"
                     "    backup: {retain: {daily: 7, monthly: 12}, pre: [pg_dumpall, -f, "
                     "/var/backups/all.sql]}\n")
    assert host.monitor.ping_url == "https://hc.example/p/1"
    assert host.backup.pre == ("pg_dumpall", "-f", "/var/backups/all.sql")
    assert host.backup.retain.daily == 7


@pytest.mark.parametrize(("extra", "problem"), [
    ("    monitor: {ping_url: 'file:///etc/passwd'}\n",
     "inv.yaml:8: hosts.web1.monitor.ping_url: 'file:///etc/passwd' must be an http:// or "
     "https:// URL"),
    ("    monitor: {metrics_file: /var/lib/node/pullback.txt}\n",
     "inv.yaml:8: hosts.web1.monitor.metrics_file: '/var/lib/node/pullback.txt' must end in "
     ".prom (the textfile collector reads only those)"),
    ("    backup: {snapshots: 0, retain: {daily: 3}}\n",
     "inv.yaml:6: hosts.web1: backup.retain: needs snapshots (backup.snapshots is 0: one "
     "mirror, nothing to retain)"),
    ("    backup: {retain: {daily: -1}}\n",
     "inv.yaml:8: hosts.web1.backup.retain.daily: Input should be greater than or equal to 0 "
     "(got -1)"),
    ("    backup: {pre: 'pg_dumpall -f x'}\n",
     "inv.yaml:8: hosts.web1.backup.pre: Input should be a valid tuple (got str "
     "'pg_dumpall -f x')"),
    ("    backup: {post: [\"rm\\nx\"]}\n",
     "inv.yaml:8: hosts.web1.backup.post: must not contain control characters or newlines"),
])
def test_bad_values_are_one_line(extra, problem):
    from roles.inventory.selection import InventoryError

    with pytest.raises(InventoryError) as caught:
        load_with(extra)
    assert caught.value.problems == [problem]


def test_the_lean_path_loads_neither_urllib_request_nor_the_hooks():
    """Pings and hooks cost only the runs that use them (bench/bench_imports.py)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, roles.cli.unattended; print(sorted(m for m in sys.modules if m in "
             "('urllib.request', 'roles.remote.hooks', 'http.client')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "[]"
