"""schedule, status, keys and trust-host against a real lab host (issue 8).

One container for the module, hardened for real by ``setup_host`` in daemon mode, with
``backup.source: /etc/ssh`` so a run takes a second. The scheduled command lines are taken
from the files ``schedule`` writes (into a temporary root: this machine runs no systemd and
its /etc is left alone) and run by hand with the bare environment a scheduler gives.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core.spec import HostSpec
from roles.features import schedule as sched
from roles.inventory.schema import load
from roles.remote import session as connection
from roles.remote.hostkeys import HostKey, known_hosts_name
from tests.integration.conftest import PROGRAM, Lab, LabServer, invoke, lab_server

pytestmark = pytest.mark.integration

BARE_ENV = {"PATH": sched.PATH_ENV, "LANG": "C.UTF-8"}  # what cron / systemd start a job with

def summaries(host: HostSpec) -> list[dict]:
    logs = Path(host.destination + ".pullback") / "logs"
    return [json.loads(p.read_text()) for p in sorted(logs.glob("*.json"))]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """Set up with ``inventory.yaml``: the lab host, ``stale1`` and ``never1`` (TEST-NET,
    never contacted); every inventory's backups in ``work/backups``."""
    never = {"address": "192.0.2.1"}
    with lab_server(lab_env, tmp_path_factory, "schedule", name="inventory",
                    backups="backups", defaults={"backup": {"source": "/etc/ssh"}},
                    others={"stale1": never, "never1": never}) as server:
        yield server


def scheduled(work: Path, inventory: Path, host: HostSpec, kind: str) -> str:
    """Install ``kind`` into a temporary root; return the file it wrote."""
    root = work / f"root-{kind}"
    job = sched.build_job(inventory, [host.name], program=PROGRAM)
    facts = sched.gather(root=root, home=root / "root", tools={}, euid=0)
    plan = sched.plan_install(facts, job, kind=kind)
    sched.apply_schedule(plan)
    return plan.files[0].path.read_text()


def remote_sha256(remote: lab.LabHost, path: str) -> str:
    return lab.engine("exec", remote.name, "sha256sum", path).stdout.split()[0].decode()


# --- a scheduled command line, run by hand, backs up -------------------------------------------


def test_the_systemd_exec_start_line_run_by_hand_backs_up(server):
    inventory, host = server.inventory, server.host
    unit = scheduled(server.work, inventory, host, "systemd")
    (exec_start,) = [line.removeprefix("ExecStart=") for line in unit.splitlines()
                     if line.startswith("ExecStart=")]
    assert "%%" not in exec_start and "$$" not in exec_start  # plain paths: sh words == argv
    argv = shlex.split(exec_start)
    assert argv == [PROGRAM, "--inventory", str(inventory), "--unit", "%i"]
    # The instance pullback-backup@HOST.service: systemd puts the host for %i.
    argv[-1] = host.name
    result = subprocess.run(argv, cwd="/", env=BARE_ENV, capture_output=True, text=True,
                            timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    dest = Path(host.destination)
    assert hashlib.sha256((dest / "tree" / "sshd_config").read_bytes()).hexdigest() == \
        remote_sha256(server.lab, "/etc/ssh/sshd_config")
    last = summaries(host)[-1]
    assert last["ok"] is True and last["exit_code"] == 0 and not last["dry_run"]


def test_the_cron_line_run_by_sh_backs_up(server):
    inventory, host, work = server.inventory, server.host, server.work
    before = len(summaries(host))
    entry = scheduled(work, inventory, host, "cron").splitlines()[-1]
    fields = entry.split(" ", 6)
    assert fields[2:6] == ["*", "*", "*", "root"]
    command = fields[6].replace("\\%", "%")  # what cron hands to sh
    result = subprocess.run(["/bin/sh", "-c", command], cwd="/", env={}, capture_output=True,
                            text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the summary table goes to /dev/null, errors to cron's mail
    runs = summaries(host)
    assert len(runs) == before + 1 and runs[-1]["ok"] is True


def test_schedule_cli_dry_run_and_bad_time(server):
    inventory, host = server.inventory, server.host
    result = invoke("schedule", "--inventory", str(inventory), "--host", host.name,
                    "--kind", "systemd", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "# /etc/systemd/system/pullback-backup@.service (" in result.stdout
    assert f"# /etc/systemd/system/pullback-backup@{host.name}.timer (" in result.stdout
    exec_line = shlex.join([PROGRAM, "--inventory", str(inventory)]) + " --unit %i"
    assert f"ExecStart={exec_line}\n" in result.stdout
    # The destinations' root (the lab's allow_destination, which holds work/backups).
    assert f" -{host.backup.allow_destination} " in result.stdout
    assert "systemd is not running: would write units; enable them with: systemctl " \
           "daemon-reload && systemctl enable --now " \
           f"pullback-backup@{host.name}.timer" in result.stdout
    assert not Path("/etc/systemd/system/pullback-backup@.service").exists()
    bad = invoke("schedule", "--inventory", str(inventory), "--at", "24:00")
    assert bad.returncode == 2
    assert bad.stderr == "schedule: --at must be HH:MM on a 24-hour clock (e.g. 02:30), got " \
                         "'24:00'\n"


# --- status -----------------------------------------------------------------------------------


def write_summary(dest: str, started: datetime, ok: bool = True) -> None:
    logs = Path(dest + ".pullback") / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = started.strftime("%Y-%m-%dT%H%M%SZ")
    (logs / f"{run}.json").write_text(json.dumps({
        "host": "stale1", "ok": ok, "exit_code": 0 if ok else 255, "seconds": 61.0,
        "stats": {"transferred_size": 5_000_000, "bytes_received": 2_000_000},
        "dry_run": False, "run": run, "started": started.isoformat(),
        "error": None if ok else "rsync exit 255"}))


def test_status_reports_fresh_and_stale_backups(server):
    inventory, host = server.inventory, server.host
    if not summaries(host):  # run alone: make the real run this test reports on
        assert invoke("backup", "--inventory", str(inventory), "--host", host.name) \
            .returncode == 0
    stale = load(inventory).hosts["stale1"]
    now = datetime.now(UTC)
    write_summary(stale.destination, now - timedelta(hours=40))
    write_summary(stale.destination, now - timedelta(hours=2), ok=False)

    result = invoke("status", "--inventory", str(inventory))
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows[host.name].endswith("fresh") and " ok " in rows[host.name]
    assert "failed (255)" in rows["stale1"] and "40h 00m ago" in rows["stale1"]
    assert rows["stale1"].endswith("STALE (> 36h)")
    assert rows["never1"].split()[1] == "never" and rows["never1"].endswith("STALE (never)")
    assert result.stderr.strip().endswith("no good backup within backup.max_age: stale1, never1")

    fresh = invoke("status", "--inventory", str(inventory), "--host", host.name)
    assert fresh.returncode == 0 and fresh.stdout.count("\n") == 2, fresh.stdout


# --- a world-readable key is refused -----------------------------------------------------------


def test_a_world_readable_key_is_refused(server):
    host, work = server.host, server.work
    key = work / "readable_key"
    key.write_bytes(Path(host.backup_key).read_bytes())
    key.with_suffix(".pub").write_bytes(Path(host.backup_pubkey).read_bytes())
    key.chmod(0o644)
    inventory = server.write("readable", backup_key=str(key))
    fix = f"fix with: chmod 600 {key}"
    for task in (["schedule", "--dry-run"], ["keygen"]):
        result = invoke(*task, "--inventory", str(inventory))
        assert result.returncode == 1 and fix in result.stderr, (task, result.stderr)
    before = len(summaries(host))
    result = invoke("backup", "--inventory", str(inventory), "--host", server.name)
    assert result.returncode == 1
    logs = summaries(host)[before:]
    # Refused before rsync starts (keys.check_private_key), or by ssh itself.
    assert fix in result.stderr or any(
        "UNPROTECTED PRIVATE KEY FILE" in Path(run["log_path"]).read_text() for run in logs)
    assert not any(run["ok"] for run in logs)


# --- an unknown host key is refused until trusted ----------------------------------------------


def test_an_unknown_host_key_is_refused_until_trusted(server):
    remote = server.lab
    inventory = server.write("trust")
    host = load(inventory).hosts[remote.name]
    known_hosts = Path(host.known_hosts)
    known_hosts.write_text("")
    with pytest.raises(connection.ConnectError, match="is not in .*refusing to connect"):
        connection.connect(host).close()

    asked = invoke("trust-host", "--inventory", str(inventory), "--host", host.name)
    assert asked.returncode == 1 and "no terminal to confirm on" in asked.stderr
    assert known_hosts.read_text() == ""

    key = HostKey(*remote.host_key.split())
    trusted = invoke("trust-host", "--inventory", str(inventory), "--host", host.name, "--yes")
    assert trusted.returncode == 0, trusted.stderr
    name = known_hosts_name("127.0.0.1", remote.port)
    assert f"{host.name}: added: {name} ssh-ed25519 {key.fingerprint}" in trusted.stdout
    assert known_hosts.read_text() == f"{name} ssh-ed25519 {key.blob}\n"
    conn = connection.connect(host)
    try:
        assert conn.run("true").ok
    finally:
        conn.close()
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known_hosts)],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0 and key.blob in found.stdout  # OpenSSH reads it too

    again = invoke("trust-host", "--inventory", str(inventory), "--host", host.name)
    assert again.returncode == 0 and f"{host.name}: already trusted" in again.stdout
    assert known_hosts.read_text() == f"{name} ssh-ed25519 {key.blob}\n"


def test_a_mismatching_pinned_key_makes_trust_host_refuse(server):
    remote, work = server.lab, server.work
    inventory = server.write("mismatch")
    host = load(inventory).hosts[remote.name]
    other = work / "not_the_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    pinned = f"{known_hosts_name('127.0.0.1', remote.port)} " + \
        " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n"
    Path(host.known_hosts).write_text(pinned)

    result = invoke("trust-host", "--inventory", str(inventory), "--host", host.name, "--yes")
    assert result.returncode == 1
    assert "HOST KEY MISMATCH" in result.stderr and "ssh-keygen -R" in result.stderr
    assert Path(host.known_hosts).read_text() == pinned  # never replaced
    with pytest.raises(connection.ConnectError, match="HOST KEY CHANGED"):
        connection.connect(host).close()
