"""Operator features against real processes: pings to a loopback HTTP server, the metrics
file, status --json, snapshots, diff, prune under the lock, and backup.pre/post over the
admin connection, with a real lab host (daemon mode) and real rsync."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.core.retention import Retention, plan_retention
from roles.local import metrics
from roles.local.ping import send_ping
from tests.integration.conftest import (
    PROGRAM,
    Lab,
    LabServer,
    closed_port,
    held_lock,
    invoke,
    lab_server,
    sh,
)

pytestmark = pytest.mark.integration

DATA = "/srv/ops"
SEED = f"""
set -eu
rm -rf {DATA} && mkdir -p {DATA}/etc {DATA}/var
printf 'one\\n' > {DATA}/etc/one.conf
printf 'two\\n' > {DATA}/etc/two.conf
printf 'keep\\n' > {DATA}/var/keep
"""


# --- a loopback monitor: records every request ------------------------------------------------


class Monitor:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, str, str]] = []  # method, path, body
        monitor = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                monitor.requests.append(("POST", self.path, body))
                self.send_response(monitor.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ping/abc"

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


@contextlib.contextmanager
def monitor(status: int = 200) -> Iterator[Monitor]:
    m = Monitor(status)
    threading.Thread(target=m.server.serve_forever, daemon=True).start()
    try:
        yield m
    finally:
        m.server.shutdown()
        m.server.server_close()


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# --- pings, no host needed -------------------------------------------------------------------


def test_ping_posts_each_event_and_a_dead_monitor_is_one_line():
    with monitor() as m:
        assert send_ping(m.url, "start") is None
        assert send_ping(m.url, "success") is None
        assert send_ping(m.url, "fail", "web1: rsync exited 23") is None
        assert m.requests == [("POST", "/ping/abc/start", ""), ("POST", "/ping/abc", ""),
                              ("POST", "/ping/abc/fail", "web1: rsync exited 23")]
    with monitor(status=500) as m:
        assert send_ping(m.url, "start") == f"ping {m.url}/start answered HTTP 500"
    port = closed_port()
    refused = send_ping(f"http://127.0.0.1:{port}/x", "start")
    assert refused and refused.startswith(f"ping http://127.0.0.1:{port}/x/start failed: ")
    with silent_port() as port:
        started = time.monotonic()
        silent = send_ping(f"http://127.0.0.1:{port}/x", "success", timeout=1)
        assert time.monotonic() - started < 5
    assert silent and "timed out" in silent


def test_a_backup_that_cannot_start_pings_fail_with_the_reason(tmp_path):
    """No key: the pull never starts; the monitor hears start, then fail with why; the
    metrics file says exit -1, success 0."""
    prom = tmp_path / "node" / "pullback.prom"
    prom.parent.mkdir()
    with monitor() as m:
        path = tmp_path / "inventory.yaml"
        path.write_text(json.dumps({
            "defaults": {"admin_user": "admin", "backup_key": str(tmp_path / "no-key"),
                         "known_hosts": str(tmp_path / "known_hosts"),
                         "rsync": {"allow_vulnerable": True,
                                   "local_prefix": str(tmp_path / "none")},
                         "backup": {"destination": str(tmp_path / "b" / "{name}"),
                                    "allow_destination": str(tmp_path)},
                         "monitor": {"ping_url": m.url, "metrics_file": str(prom)}},
            "hosts": {"web1": {"address": "127.0.0.1", "port": closed_port()}}}))
        result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert m.paths() == ["/ping/abc/start", "/ping/abc/fail"]
    body = m.requests[1][2]
    assert body.startswith("web1: ") and "no-key" in body
    samples = metrics.parse_metrics(prom.read_text())["web1"]
    assert samples["last_success"] == 0 and samples["last_exit_code"] == -1
    assert "last_success_timestamp_seconds" not in samples  # never a good run


# --- a real host -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ready(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The module's host in daemon mode, seeded; each test's inventory keeps 3 snapshots."""
    with lab_server(lab_env, tmp_path_factory, "ops", seed=SEED, defaults={
        "backup": {"source": DATA, "snapshots": 3},
    }) as server:
        yield server


def test_a_good_backup_pings_success_and_writes_metrics(ready):
    prom = ready.work / "textfile" / "pullback.prom"
    prom.parent.mkdir()
    with monitor() as m:
        inventory, host = ready.spec("monitored", monitor={
            "ping_url": m.url, "metrics_file": str(prom)})
        before = time.time()
        result = invoke("backup", "--inventory", str(inventory))
        assert result.returncode == 0, result.stdout + result.stderr
        assert m.paths() == ["/ping/abc/start", "/ping/abc"]
    samples = metrics.parse_metrics(prom.read_text())[host.name]
    assert samples["last_success"] == 1 and samples["last_exit_code"] == 0
    assert samples["last_files"] == 6  # ., etc, var and three files
    assert before - 1 <= samples["last_success_timestamp_seconds"] <= time.time()

    # A monitor that is down never fails the backup: one warning line per ping.
    inventory, host = ready.spec("monitored", monitor={
        "ping_url": f"http://127.0.0.1:{closed_port()}/dead", "metrics_file": str(prom)})
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    warning = [line for line in result.stderr.splitlines() if "/dead" in line]
    assert len(warning) == 1 and "/dead/start failed" in warning[0] \
        and "/dead failed" in warning[0]

    status = invoke("status", "--inventory", str(inventory), "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    (entry,) = data["hosts"]
    assert entry["host"] == host.name and entry["state"] == "fresh"
    assert entry["snapshots"] == 2 and entry["last_run"]["ok"] is True
    assert entry["newest_good"]["exit_code"] == 0 and data["stale"] == []


def test_snapshots_list_diff_and_restore_by_listed_name(ready):
    inventory, host = ready.spec("seen")
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    sh(ready.lab, f"cd {DATA} && printf 'three\\n' > etc/three.conf && rm etc/two.conf "
                  "&& printf 'changed, longer\\n' > etc/one.conf")
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    listed = invoke("snapshots", "--inventory", str(inventory), "--host", host.name, "--json")
    assert listed.returncode == 0, listed.stderr
    snaps = json.loads(listed.stdout)["snapshots"]
    assert [s["state"] for s in snaps] == ["complete", "complete"]
    assert [s["latest"] for s in snaps] == [False, True]
    assert [s["files"] for s in snaps] == [6, 6]
    assert snaps[1]["size"] == len("changed, longer\n") + len("three\n") + len("keep\n")
    old, new = snaps[0]["name"], snaps[1]["name"]
    table = invoke("snapshots", "--inventory", str(inventory), "--host", host.name)
    assert table.stdout.splitlines()[0].split() == ["snapshot", "started", "(UTC)", "files",
                                                    "size", "state"]
    assert f"{new} " in table.stdout and "complete (latest)" in table.stdout

    between = invoke("diff", "--inventory", str(inventory), "--host", host.name,
                     "--old", old, "--new", new)
    assert between.returncode == 0, between.stderr
    assert between.stdout.splitlines() == [
        f"{old} -> {new}: 1 added, 1 removed, 1 changed",
        "+ etc/three.conf", "- etc/two.conf", "~ etc/one.conf"]

    sh(ready.lab, f"cd {DATA} && printf 'live\\n' > var/live && rm var/keep")
    live = invoke("diff", "--inventory", str(inventory), "--host", host.name)
    assert live.returncode == 0, live.stderr
    assert live.stdout.splitlines() == [f"{new} -> server: 1 added, 1 removed, 0 changed",
                                        "+ var/live", "- var/keep"]
    assert sorted(os.listdir(Path(host.destination))) == sorted([old, new, "latest"])

    bad = invoke("diff", "--inventory", str(inventory), "--host", host.name,
                 "--old", "nope", "--new", new)
    assert bad.returncode == 2 and "no complete snapshot 'nope'" in bad.stderr

    target = ready.work / "restored-old"
    restored = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                      "--path", f"{DATA}/etc/two.conf", "--to", str(target),
                      "--snapshot", old)
    assert restored.returncode == 0, restored.stderr
    assert (target / "tree" / "two.conf").read_text() == "two\n"
    sh(ready.lab, SEED)


def test_retention_prunes_under_the_lock(ready):
    inventory, host = ready.spec("retained", backup={
        "snapshots": 1, "retain": {"daily": 2, "monthly": 2}})
    dest = Path(host.destination)
    dest.mkdir(parents=True, mode=0o700)
    made = ["2026-09-30T023000Z", "2026-10-30T023000Z", "2026-10-31T023000Z",
            "2026-11-01T023000Z", "2026-11-01T143000Z"]
    for name in made:
        (dest / name).mkdir()
    # monthly 2: 10-31 (October's newest) and 11-01 14:30; daily 2: 11-01 14:30, 10-31.
    wanted = ["2026-10-31T023000Z", "2026-11-01T143000Z"]

    dry = invoke("prune", "--inventory", str(inventory), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == (f"{host.name}: kept 2, would remove 3: 2026-09-30T023000Z, "
                                  "2026-10-30T023000Z, 2026-11-01T023000Z")
    assert sorted(os.listdir(dest)) == made

    with held_lock(host):
        started = time.monotonic()
        refused = invoke("prune", "--inventory", str(inventory))
        assert time.monotonic() - started < 10
    assert refused.returncode == 1
    assert f"another backup of {host.name} is running (pid 4711)" in refused.stderr
    assert sorted(os.listdir(dest)) == made  # nothing removed while the lock was held

    pruned = invoke("prune", "--inventory", str(inventory))
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(os.listdir(dest)) == wanted

    # A backup applies the same rule after its run (today's snapshot is the newest).
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    names = sorted(n for n in os.listdir(dest) if n != "latest")
    new = os.readlink(dest / "latest")
    assert new not in wanted
    assert names == plan_retention([*wanted, new], Retention(1, daily=2, monthly=2))[0]
    assert new in names and "2026-11-01T143000Z" in names


def test_pre_command_output_is_in_the_backup_and_post_runs_after(ready):
    pre = ["sh", "-c", f"date +%s > {DATA}/var/dump.sql && printf 'pre ran\\n' >> "
                       f"/tmp/hooks.log"]
    post = ["sh", "-c", f"rm {DATA}/var/dump.sql && printf 'post ran\\n' >> /tmp/hooks.log"]
    inventory, host = ready.spec("hooked", backup={"pre": pre, "post": post})
    sh(ready.lab, "rm -f /tmp/hooks.log")

    dry = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "not in a dry run" in dry.stderr
    assert sh(ready.lab, "cat /tmp/hooks.log 2>/dev/null || true") == ""

    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    dump = Path(host.destination) / "latest" / "var" / "dump.sql"
    assert dump.read_text().strip().isdigit()  # written by pre, before the pull
    assert sh(ready.lab, "cat /tmp/hooks.log") == "pre ran\npost ran\n"
    assert sh(ready.lab, f"ls {DATA}/var") == "keep\n"  # post removed it after the pull


def test_a_failing_pre_command_stops_the_pull(ready):
    post = ["sh", "-c", "printf 'post ran\\n' >> /tmp/hooks-failed.log"]
    sh(ready.lab, "rm -f /tmp/hooks-failed.log")
    with monitor() as m:
        inventory, host = ready.spec("prefail", monitor={"ping_url": m.url}, backup={
            "pre": ["sh", "-c", "echo 'dump: disk full' >&2; exit 3"], "post": post})
        result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 1
    assert (f"{host.name}: failed: backup.pre `sh -c 'echo '\"'\"'dump: disk full'\"'\"' >&2; "
            "exit 3'` exited 3: dump: disk full; the pull did not run") in result.stderr
    dest = Path(host.destination)
    assert not dest.exists() or os.listdir(dest) == []  # no snapshot, no partial
    assert sh(ready.lab, "cat /tmp/hooks-failed.log 2>/dev/null || true") == ""  # no pull: no post
    assert m.paths() == ["/ping/abc/start", "/ping/abc/fail"]
    assert "exited 3: dump: disk full" in m.requests[1][2]


def test_hooks_run_under_the_lock_so_a_second_run_runs_none(ready):
    """A run that finds the host's lock held (another backup pulling) must not run its pre
    command: that would rewrite the dump the running backup is copying."""
    pre = ["sh", "-c", "printf 'pre ran\\n' >> /tmp/hooks-locked.log"]
    post = ["sh", "-c", "printf 'post ran\\n' >> /tmp/hooks-locked.log"]
    inventory, host = ready.spec("locked", backup={"pre": pre, "post": post})
    sh(ready.lab, "rm -f /tmp/hooks-locked.log")
    with held_lock(host):
        result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 1
    assert f"another backup of {host.name} is running (pid 4711)" in result.stderr
    assert sh(ready.lab, "cat /tmp/hooks-locked.log 2>/dev/null || true") == ""
    # Control: with the lock free, both run.
    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sh(ready.lab, "cat /tmp/hooks-locked.log") == "pre ran\npost ran\n"



def unattended(inventory: Path) -> subprocess.CompletedProcess:
    """pullback-backup as a timer starts it: no terminal, a bare environment."""
    return subprocess.run([PROGRAM, "--inventory", str(inventory)], cwd="/",
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                          capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL)


def test_pullback_backup_runs_hooks_and_refuses_a_sudo_password_host(ready):
    pre = ["sh", "-c", "printf 'pre ran\\n' >> /tmp/hooks-timer.log"]
    inventory, host = ready.spec("timer", backup={"pre": pre})
    sh(ready.lab, "rm -f /tmp/hooks-timer.log")
    result = unattended(inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sh(ready.lab, "cat /tmp/hooks-timer.log") == "pre ran\n"

    path = ready.write("timer", file="timer-sudo", sudo_password=True, backup={"pre": pre})
    refused = unattended(path)
    assert refused.returncode == 1
    assert ("did not run: sudo_password is true and there is no terminal to ask on; allow "
            "NOPASSWD sudo for the admin user to run hooks unattended; the pull did not run"
            in refused.stderr)
    assert sh(ready.lab, "cat /tmp/hooks-timer.log") == "pre ran\n"
