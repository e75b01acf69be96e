"""setup-remote as an admin whose sudo REQUIRES a password (real sshd, real sudo, no mocks).

The lab's `operator` account (lab/Containerfile) logs in with the admin key; its sudo wants
the lab-only password below. The password is "typed" by replacing ``getpass.getpass``: that
is the person at the keyboard, every remote command is real.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from lab import hosts as lab
from roles.core.spec import HostSpec
from roles.core.sshd_output import parse_sshd_T
from roles.features import setup_remote as setup
from roles.inventory.schema import load
from roles.local import keys
from roles.remote.facts import (
    AUTHORIZED_KEYS,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    SSHD_CONFIG,
)
from roles.remote.session import Run, Session
from tests.integration.conftest import Lab, infra_host, invoke

pytestmark = pytest.mark.integration

# LAB-ONLY CREDENTIAL: set by lab/Containerfile for the throwaway lab containers.
PASSWORD = "pullback-lab-sudo"
WRONG = "not-the-sudo-password"
OPERATOR = "operator"
WANT = "forced-commands-only"
WATCHED = (SSHD_CONFIG, "/root/.ssh", AUTHORIZED_KEYS, RSYNCD_CONF, PULLBACK_DIR,
           PULLBACK_RSYNCD_CONF)


@dataclass
class Operator:
    lab: lab.LabHost
    inventory: Path
    host: HostSpec


def operator_target(lab_env: Lab, lab_host: lab.LabHost, sudo_password: bool) -> Operator:
    inventory = lab_env.inventory([lab_host], defaults={"admin_user": OPERATOR},
                                  per_host={lab_host.name: {"sudo_password": sudo_password}})
    host = load(inventory).hosts[lab_host.name]
    keys.ensure_backup_key(Path(host.backup_key))
    return Operator(lab_host, inventory, host)


def keyboard(monkeypatch: pytest.MonkeyPatch, typed: str | None) -> list[str]:
    """The person at the keyboard: answers each getpass prompt with ``typed``."""
    prompts: list[str] = []

    def answer(prompt: str = "Password: ", stream: Any = None) -> str:
        prompts.append(prompt)
        if typed is None:
            raise AssertionError(f"nobody should be asked for a password: {prompt!r}")
        return typed

    monkeypatch.setattr(getpass, "getpass", answer)
    return prompts


def sudo_commands(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Record the exit code of every root command (the real Session.run does the work)."""
    exits: list[int | None] = []
    real = Session.run

    def recording(self: Session, command: Any, *, sudo: bool = False, **kwargs: Any) -> Any:
        result = real(self, command, sudo=sudo, **kwargs)
        if sudo:
            exits.append(result.exited)
        return result

    monkeypatch.setattr(Session, "run", recording)  # the one way to run a command on a host
    return exits


def snapshot(lab_host: lab.LabHost) -> dict[str, str]:
    """sha256, mode and owner of each watched file, mode and owner of folders, or missing."""
    out = lab.engine("exec", lab_host.name, "sh", "-c", r"""
for f in "$@"; do
  if [ -d "$f" ]; then printf '%s dir %s\n' "$f" "$(stat -c '%a %u %g' "$f")"
  elif [ -e "$f" ]; then
    printf '%s %s %s\n' "$f" "$(sha256sum < "$f" | cut -d' ' -f1)" "$(stat -c '%a %u %g' "$f")"
  else printf '%s missing\n' "$f"; fi
done""", "sh", *WATCHED).stdout.decode()
    return dict(line.split(" ", 1) for line in out.splitlines())


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``, or fail the test if it has not returned after ``seconds`` (a hang)."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def assert_secret_absent(*texts: object) -> None:
    for text in texts:
        assert PASSWORD not in str(text) and WRONG not in str(text)


def assert_operator_needs_password(lab_host: lab.LabHost) -> None:
    """The lab really makes operator's sudo ask (so a pass is not NOPASSWD luck)."""
    result = lab.engine("exec", "-u", OPERATOR, lab_host.name, "sudo", "-n", "true",
                        check=False)
    assert result.returncode == 1 and b"a password is required" in result.stderr


# --- the tests -------------------------------------------------------------------------------


def test_setup_remote_with_the_password_typed_once(lab_env: Lab, fresh_host: lab.LabHost,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    assert_operator_needs_password(fresh_host)
    target = operator_target(lab_env, fresh_host, sudo_password=True)
    prompts = keyboard(monkeypatch, PASSWORD)
    exits = sudo_commands(monkeypatch)

    outcome = within(60, lambda: setup.setup_host(target.host))

    assert outcome.error is None, outcome
    assert outcome.steps["sshd_config"] == "changed"
    assert outcome.actions == ("reloaded sshd",)
    # gather, apply and the new login's check: several root commands, one question.
    assert prompts == [f"[sudo] password for {OPERATOR}: "]
    assert len(exits) >= 3 and set(exits) == {0}, exits
    assert_secret_absent(outcome, caplog.text)

    as_admin = infra_host(lab_env, fresh_host, sudo=False)
    addr = as_admin.run('printf %s "$SSH_CONNECTION"').stdout.split()[0]
    as_root = infra_host(lab_env, fresh_host)
    effective = as_root.check_output(f"/usr/sbin/sshd -T -C user=root,host={addr},addr={addr}")
    assert parse_sshd_T(effective)["permitrootlogin"] == WANT
    root_ssh, keys_file = as_root.file("/root/.ssh"), as_root.file(AUTHORIZED_KEYS)
    assert root_ssh.is_directory and root_ssh.mode == 0o700 and root_ssh.user == "root"
    assert keys_file.mode == 0o600 and keys_file.user == "root"
    assert "pullback-backup" in keys_file.content_string


def test_wrong_password_fails_clearly_and_changes_nothing(lab_env: Lab, fresh_host: lab.LabHost,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    target = operator_target(lab_env, fresh_host, sudo_password=True)
    before = snapshot(fresh_host)
    assert before["/root/.ssh"] == "missing"
    prompts = keyboard(monkeypatch, WRONG)
    sessions = Run()

    outcome = within(60, lambda: setup.setup_host(target.host, sessions=sessions))

    assert outcome.failed and outcome.steps == {}
    error = outcome.error
    assert "\n" not in error and "sudo" in error and "rejected the password" in error, error
    assert error.startswith(f"{fresh_host.name}: sudo as {OPERATOR}")
    assert len(prompts) == 1
    assert not sessions.passwords.remembers(OPERATOR)  # forgotten: the next login asks again
    assert_secret_absent(outcome, caplog.text)
    assert snapshot(fresh_host) == before


def test_password_needed_but_not_enabled_fails_fast(lab_env: Lab, fresh_host: lab.LabHost,
                                                    monkeypatch: pytest.MonkeyPatch):
    target = operator_target(lab_env, fresh_host, sudo_password=False)
    before = snapshot(fresh_host)
    prompts = keyboard(monkeypatch, None)

    started = time.monotonic()
    outcome = within(30, lambda: setup.setup_host(target.host))
    assert time.monotonic() - started < 15
    assert prompts == []
    error = outcome.error
    assert outcome.failed and "\n" not in error, error
    assert "needs a password" in error and "`sudo_password: true`" in error, error

    # The command line: exit 1, one failed line with the same advice, no hang.
    result = invoke("setup-remote", "--inventory", str(target.inventory), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if "failed:" in line]
    assert len(failed) == 1 and "sudo_password: true" in failed[0], result.stdout
    assert snapshot(fresh_host) == before


def test_the_lab_password_is_for_sudo_only_not_ssh(lab_env: Lab, shared_host: lab.LabHost,
                                                   tmp_path: Path):
    """The lab-only credential cannot log in over SSH: operator uses the admin key."""
    known_hosts = tmp_path / "known_hosts"
    lab.write_known_hosts([shared_host], known_hosts)

    def client() -> paramiko.SSHClient:
        ssh = paramiko.SSHClient()
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        ssh.load_host_keys(str(known_hosts))
        return ssh

    ssh = client()
    try:
        with pytest.raises(paramiko.AuthenticationException):
            ssh.connect("127.0.0.1", port=shared_host.port, username=OPERATOR,
                        password=PASSWORD, look_for_keys=False, allow_agent=False, timeout=10)
    finally:
        ssh.close()
    ssh = client()
    try:
        ssh.connect("127.0.0.1", port=shared_host.port, username=OPERATOR,
                    key_filename=str(lab.admin_key()), look_for_keys=False, allow_agent=False,
                    timeout=10)
        _, stdout, _ = ssh.exec_command("id -un")
        assert stdout.read().decode().strip() == OPERATOR
    finally:
        ssh.close()

