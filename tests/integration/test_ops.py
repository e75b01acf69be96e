"""Operator features against real processes: pings to a loopback HTTP server, the metrics
file, status --json, snapshots, diff, prune under the lock, and backup.pre/post over the
admin connection, with a real lab host (daemon mode) and real rsync."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core.retention import Retention, plan_retention
from roles.core.spec import HostSpec
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import keys, metrics
from roles.local.ping import send_ping
from tests.integration.conftest import Lab, closed_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
DATA = "/srv/ops"
SEED = f"""
set -eu
rm -rf {DATA} && mkdir -p {DATA}/etc {DATA}/var
printf 'one\\n' > {DATA}/etc/one.conf
printf 'two\\n' > {DATA}/etc/two.conf
printf 'keep\\n' > {DATA}/var/keep
"""


def invoke(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, timeout=timeout,
                          text=True, encoding="utf-8", errors="replace", check=False)


def sh(host: lab.LabHost, script: str) -> str:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=60).stdout.decode()


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


@contextlib.contextmanager
def held_lock(host: HostSpec, text: str = "4711\n") -> Iterator[None]:
    lock = Path(host.destination + ".pullback") / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write(text)
        held.flush()
        yield


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
def remote(lab_env: Lab) -> Iterator[lab.LabHost]:
    host = lab_env.start("ops")
    try:
        yield host
    finally:
        lab_env.remove(host)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ops")


def write_inventory(lab_env: Lab, remote: lab.LabHost, work: Path, name: str,
                    monitor: dict | None = None, **backup) -> tuple[Path, HostSpec]:
    path = lab_env.inventory([remote], path=work / f"{name}.yaml", defaults={
        "rsync": {"local_prefix": str(work / "no-local-build")},
        "backup": {"destination": str(work / name / "{name}"), "source": DATA,
                   "snapshots": 3, **backup},
        **({"monitor": monitor} if monitor else {}),
    })
    return path, load(path).hosts[remote.name]


@pytest.fixture(scope="module")
def ready(lab_env: Lab, remote: lab.LabHost, work: Path) -> lab.LabHost:
    _, host = write_inventory(lab_env, remote, work, "setup")
    keys.ensure_backup_key(Path(host.backup_key))
    outcome = setup_host(host)
    assert outcome.error is None, outcome
    sh(remote, SEED)
    return remote


def test_a_good_backup_pings_success_and_writes_metrics(lab_env, ready, work):
    prom = work / "textfile" / "pullback.prom"
    prom.parent.mkdir()
    with monitor() as m:
        inventory, host = write_inventory(lab_env, ready, work, "monitored", monitor={
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
    inventory, host = write_inventory(lab_env, ready, work, "monitored", monitor={
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


def test_snapshots_list_diff_and_restore_by_listed_name(lab_env, ready, work):
    inventory, host = write_inventory(lab_env, ready, work, "seen")
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    sh(ready, f"cd {DATA} && printf 'three\\n' > etc/three.conf && rm etc/two.conf "
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

    sh(ready, f"cd {DATA} && printf 'live\\n' > var/live && rm var/keep")
    live = invoke("diff", "--inventory", str(inventory), "--host", host.name)
    assert live.returncode == 0, live.stderr
    assert live.stdout.splitlines() == [f"{new} -> server: 1 added, 1 removed, 0 changed",
                                        "+ var/live", "- var/keep"]
    assert sorted(os.listdir(Path(host.destination))) == sorted([old, new, "latest"])

    bad = invoke("diff", "--inventory", str(inventory), "--host", host.name,
                 "--old", "nope", "--new", new)
    assert bad.returncode == 2 and "no complete snapshot 'nope'" in bad.stderr

    target = work / "restored-old"
    restored = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                      "--path", f"{DATA}/etc/two.conf", "--to", str(target),
                      "--snapshot", old)
    assert restored.returncode == 0, restored.stderr
    assert (target / "tree" / "two.conf").read_text() == "two\n"
    sh(ready, SEED)


def test_retention_prunes_under_the_lock(lab_env, ready, work):
    inventory, host = write_inventory(lab_env, ready, work, "retained", snapshots=1,
                                      retain={"daily": 2, "monthly": 2})
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


def test_pre_command_output_is_in_the_backup_and_post_runs_after(lab_env, ready, work):
    pre = ["sh", "-c", f"date +%s > {DATA}/var/dump.sql && printf 'pre ran\\n' >> "
                       f"/tmp/hooks.log"]
    post = ["sh", "-c", f"rm {DATA}/var/dump.sql && printf 'post ran\\n' >> /tmp/hooks.log"]
    inventory, host = write_inventory(lab_env, ready, work, "hooked", pre=pre, post=post)
    sh(ready, "rm -f /tmp/hooks.log")

    dry = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "not in a dry run" in dry.stderr
    assert sh(ready, "cat /tmp/hooks.log 2>/dev/null || true") == ""

    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    dump = Path(host.destination) / "latest" / "var" / "dump.sql"
    assert dump.read_text().strip().isdigit()  # written by pre, before the pull
    assert sh(ready, "cat /tmp/hooks.log") == "pre ran\npost ran\n"
    assert sh(ready, f"ls {DATA}/var") == "keep\n"  # post removed it after the pull


def test_a_failing_pre_command_stops_the_pull(lab_env, ready, work):
    post = ["sh", "-c", "printf 'post ran\\n' >> /tmp/hooks-failed.log"]
    sh(ready, "rm -f /tmp/hooks-failed.log")
    with monitor() as m:
        inventory, host = write_inventory(lab_env, ready, work, "prefail", monitor={
            "ping_url": m.url}, pre=["sh", "-c", "echo 'dump: disk full' >&2; exit 3"],
            post=post)
        result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 1
    assert (f"{host.name}: failed: backup.pre `sh -c 'echo '\"'\"'dump: disk full'\"'\"' >&2; "
            "exit 3'` exited 3: dump: disk full; the pull did not run") in result.stderr
    dest = Path(host.destination)
    assert not dest.exists() or os.listdir(dest) == []  # no snapshot, no partial
    assert sh(ready, "cat /tmp/hooks-failed.log 2>/dev/null || true") == ""  # no pull: no post
    assert m.paths() == ["/ping/abc/start", "/ping/abc/fail"]
    assert "exited 3: dump: disk full" in m.requests[1][2]


def test_hooks_run_under_the_lock_so_a_second_run_runs_none(lab_env, ready, work):
    """A run that finds the host's lock held (another backup pulling) must not run its pre
    command: that would rewrite the dump the running backup is copying."""
    pre = ["sh", "-c", "printf 'pre ran\\n' >> /tmp/hooks-locked.log"]
    post = ["sh", "-c", "printf 'post ran\\n' >> /tmp/hooks-locked.log"]
    inventory, host = write_inventory(lab_env, ready, work, "locked", pre=pre, post=post)
    sh(ready, "rm -f /tmp/hooks-locked.log")
    with held_lock(host):
        result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 1
    assert f"another backup of {host.name} is running (pid 4711)" in result.stderr
    assert sh(ready, "cat /tmp/hooks-locked.log 2>/dev/null || true") == ""
    # Control: with the lock free, both run.
    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sh(ready, "cat /tmp/hooks-locked.log") == "pre ran\npost ran\n"


PROGRAM = str(Path(sys.executable).parent / "pullback-backup")


def unattended(inventory: Path) -> subprocess.CompletedProcess:
    """pullback-backup as a timer starts it: no terminal, a bare environment."""
    return subprocess.run([PROGRAM, "--inventory", str(inventory)], cwd="/",
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                          capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL)


def test_pullback_backup_runs_hooks_and_refuses_a_sudo_password_host(lab_env, ready, work):
    pre = ["sh", "-c", "printf 'pre ran\\n' >> /tmp/hooks-timer.log"]
    inventory, host = write_inventory(lab_env, ready, work, "timer", pre=pre)
    sh(ready, "rm -f /tmp/hooks-timer.log")
    result = unattended(inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sh(ready, "cat /tmp/hooks-timer.log") == "pre ran\n"

    path = lab_env.inventory([ready], path=work / "timer-sudo.yaml", defaults={
        "rsync": {"local_prefix": str(work / "no-local-build")}, "sudo_password": True,
        "backup": {"destination": str(work / "timer" / "{name}"), "source": DATA,
                   "snapshots": 3, "pre": pre}})
    refused = unattended(path)
    assert refused.returncode == 1
    assert ("did not run: sudo_password is true and there is no terminal to ask on; allow "
            "NOPASSWD sudo for the admin user to run hooks unattended; the pull did not run"
            in refused.stderr)
    assert sh(ready, "cat /tmp/hooks-timer.log") == "pre ran\n"
