"""Flags, help and refusals of the real command line (`invoke` and `pullback`, as
subprocesses): nothing here contacts a host (addresses are a closed loopback port)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import closed_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INVOKE = str(BIN / "invoke")
PULLBACK = str(BIN / "pullback")
TASKS = ["keygen", "setup-remote", "build-rsync", "capture-command", "backup", "restore",
         "restore-drill", "doctor", "verify", "schedule", "status", "trust-host"]
DRY_RUN = ["setup-remote", "build-rsync", "backup", "schedule"]


def run(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False, env=env, stdin=stdin)


def write_inventory(tmp_path: Path, **extra: str) -> Path:
    """Two hosts on a loopback port nothing listens on; ``extra``: per-host YAML lines."""
    port = closed_port()
    path = tmp_path / "inventory.yaml"
    hosts = "".join(f"  {name}:\n    address: 127.0.0.1\n    port: {port}\n"
                    + "".join(f"    {line}\n" for line in extra.get(name, "").splitlines())
                    for name in ("web1", "web2"))
    path.write_text(textwrap.dedent(f"""\
        defaults:
          admin_user: admin
          backup_key: {tmp_path}/key
          known_hosts: {tmp_path}/known_hosts
          backup: {{destination: '{tmp_path}/b/{{name}}', allow_destination: '{tmp_path}/b',
                   snapshots: 0}}
          rsync: {{allow_vulnerable: true, local_prefix: {tmp_path}/prefix}}
        hosts:
        """) + hosts)
    return path


# --- -n and -v, unknown flags -----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_short_flags_mean_the_same_in_every_task(task):
    """-h is help, -n is --dry-run where a task has one, nothing else is short."""
    shown = run(INVOKE, "--help", task)
    assert shown.returncode == 0, shown.stderr
    shorts = sorted({word for line in shown.stdout.splitlines()
                     for word in line.replace(",", " ").split()
                     if len(word) == 2 and word.startswith("-") and word[1].isalpha()})
    assert shorts == (["-n"] if task in DRY_RUN else [])
    if task in DRY_RUN:
        assert "-n, --dry-run" in shown.stdout


@pytest.mark.parametrize("program", [INVOKE, PULLBACK])
@pytest.mark.parametrize("args", [
    ["backup", "-v"], ["backup", "--verbose"], ["keygen", "-n"], ["status", "--bogus"],
    ["doctor", "--inventory"],  # a flag without its value
])
def test_an_unknown_flag_exits_2_with_one_line(tmp_path, program, args):
    result = run(program, *args, cwd=ROOT if program == INVOKE else tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_pullback_also_refuses_an_unknown_flag_before_the_task(tmp_path):
    result = run(PULLBACK, "--bogus", "backup", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "No idea what '--bogus' is!\n")


def test_dash_n_is_a_dry_run(tmp_path):
    """-n runs the same dry run as --dry-run: pullback-backup and invoke alike."""
    inventory = write_inventory(tmp_path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")],
                   check=True)
    short, long = (run(INVOKE, "schedule", flag, "--inventory", str(inventory), "--kind",
                       "cron") for flag in ("-n", "--dry-run"))
    assert short.returncode == 0, short.stderr
    assert "pullback-backup (would be created)" in short.stdout
    assert (short.stdout, short.stderr) == (long.stdout, long.stderr)
    help_text = run(str(BIN / "pullback-backup"), "--help").stdout
    assert "-n, --dry-run" in help_text


# --- restore ----------------------------------------------------------------------------------


def test_restore_help_says_one_host_and_several_are_refused(tmp_path):
    shown = run(INVOKE, "--help", "restore").stdout
    assert "repeat for several" not in shown and "exactly one" in shown
    inventory = write_inventory(tmp_path)
    result = run(INVOKE, "restore", "--inventory", str(inventory), "--host", "web1", "--host",
                 "web2", "--path", "/etc", "--to", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr == ("restore: name exactly one --host (a restore copies from one "
                             "host's backup)\n")


@pytest.mark.parametrize("to", ["/", "/etc", "/tmp", "/usr/local", "/var/log/.."])
def test_restore_onto_the_backup_hosts_own_system_is_refused(tmp_path, to):
    """Not an invitation to --force: the container TO would be made 0700."""
    inventory = write_inventory(tmp_path)
    before = os.stat(to).st_mode
    result = run(INVOKE, "restore", "--inventory", str(inventory), "--host", "web1",
                 "--path", "/etc", "--to", to)
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"restore: --to {to}: ") and "system folder" in line
    assert "--force" not in line and "chmod" not in line
    assert os.stat(to).st_mode == before


def test_restore_of_a_local_copy_does_not_ask_for_build_rsync(tmp_path):
    inventory = write_inventory(tmp_path)
    tree = tmp_path / "b" / "web1" / "tree" / "etc"
    tree.mkdir(parents=True)
    (tree / "hostname").write_text("web1\n")
    assert not (tmp_path / "prefix").exists()  # no pinned build: PATH's rsync copies
    result = run(INVOKE, "restore", "--inventory", str(inventory), "--host", "web1",
                 "--path", "/etc", "--to", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "build-rsync" not in result.stderr and "warning" not in result.stderr
    assert (tmp_path / "r" / "tree" / "hostname").read_text() == "web1\n"


# --- schedule without crontab -----------------------------------------------------------------


def test_schedule_dry_run_for_a_user_cron_works_without_crontab(tmp_path):
    inventory = write_inventory(tmp_path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")],
                   check=True)
    empty = tmp_path / "bin"  # a PATH without crontab: ssh-keygen only (it checks the key)
    empty.mkdir()
    (empty / "ssh-keygen").symlink_to(shutil.which("ssh-keygen"))
    env = {**os.environ, "PATH": str(empty)}
    args = ["schedule", "--inventory", str(inventory), "--user", "--kind", "cron"]
    dry = run(INVOKE, *args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "# crontab of this user (would be updated)" in dry.stdout
    assert "pullback-backup --inventory" in dry.stdout
    assert dry.stdout.splitlines()[-1] == ("note: a real run stops here: crontab not found: "
                                           "install cron (e.g. apt-get install cron), or use "
                                           "--kind systemd")
    real = run(INVOKE, *args, env=env)
    assert real.returncode == 1 and real.stderr.startswith("schedule: crontab not found")


# --- sudo_password without a terminal ---------------------------------------------------------


@pytest.mark.parametrize("task", ["setup-remote", "capture-command", "build-rsync", "doctor",
                                  "restore-drill"])
def test_sudo_password_without_a_terminal_is_refused_before_connecting(tmp_path, task):
    """It died with EOFError from getpass after the run had started."""
    inventory = write_inventory(tmp_path, web1="sudo_password: true\nforced_command: captured")
    extra = {"build-rsync": ["--remote-only"],
             "restore-drill": ["--host", "web1", "--to", str(tmp_path / "d")]}.get(task, [])
    result = run(INVOKE, task, "--inventory", str(inventory), *extra)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == (f"{task}: sudo_password: true for web1, and there is no terminal "
                             "to ask for it on: run it from a terminal, or allow NOPASSWD "
                             "sudo for the admin user\n")
    assert "EOFError" not in result.stderr


# --- pullback, from anywhere ------------------------------------------------------------------


def test_pullback_runs_the_same_tasks_from_any_folder(tmp_path):
    listed = run(PULLBACK, "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()
             if line.startswith("  ") and not line.startswith("    ")}
    assert set(TASKS) <= names
    shown = run(PULLBACK, "--help", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith("Usage: pullback ")
    task_help = run(PULLBACK, "--help", "backup", cwd=tmp_path)
    assert task_help.stdout.startswith("Usage: pullback [--core-opts] backup")
    # A task with a relative inventory, read from the current folder.
    write_inventory(tmp_path)
    status = run(PULLBACK, "status", "--inventory", "inventory.yaml", cwd=tmp_path)
    assert status.returncode == 1, status.stderr  # never backed up: stale
    assert [line.split()[0] for line in status.stdout.splitlines()[1:]] == ["web1", "web2"]
