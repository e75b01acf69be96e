"""setup-remote on a server whose sshd runs under systemd, as on most real servers: the
lab's systemd flavour has systemd as PID 1 and sshd as ``ssh.service``, so the reload is
``systemctl reload ssh`` (the unit's ExecReload: ``sshd -t``, then SIGHUP to its main pid)
and the rollback reloads through it too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.features import setup_remote as setup
from roles.hostfiles import transaction
from roles.remote.facts import SSHD_CONFIG, gather
from roles.remote.session import Session, connect
from tests.integration.conftest import Lab
from tests.integration.test_setup_remote import (
    FCO_LINE,
    WANT,
    Target,
    assert_admin_login_works,
    client_addr,
    effective,
    make_target,
    read,
    sh,
    snapshot,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")


@pytest.fixture
def sd_target(lab_env: Lab) -> Iterator[Target]:
    host = lab_env.start("systemd", image=lab_env.systemd_image())
    try:
        yield make_target(lab_env, host, defaults={"backup": {"source": "/etc/ssh"}})
    finally:
        lab_env.remove(host)


def ssh_unit(target: Target) -> tuple[str, str]:
    """(ActiveState, MainPID) of ssh.service."""
    out = sh(target.lab, "systemctl show -p ActiveState -p MainPID ssh.service")
    fields = dict(line.split("=", 1) for line in out.split())
    return fields["ActiveState"], fields["MainPID"]


def reloads(target: Target) -> int:
    """Reloads systemd ran for ssh.service (its journal), each a SIGHUP to sshd."""
    journal = sh(target.lab, "journalctl -u ssh.service -o cat --no-pager")
    assert journal.count("Received SIGHUP") == journal.count("Reloaded ssh.service")
    return journal.count("Reloaded ssh.service")


def test_the_lab_host_really_runs_sshd_under_systemd(sd_target: Target):
    assert sh(sd_target.lab, "cat /proc/1/comm").strip() == "systemd"
    assert sh(sd_target.lab, "systemctl is-active ssh.service").strip() == "active"
    conn = connect(sd_target.host)
    try:
        facts = gather(conn, [sd_target.host.rsync.remote_binary])
    finally:
        conn.close()
    assert facts.service == "ssh"


def test_setup_remote_reloads_with_systemctl_and_a_second_run_does_not(sd_target: Target):
    addr = client_addr(sd_target)
    state, pid = ssh_unit(sd_target)
    assert (state, reloads(sd_target)) == ("active", 0)
    plans: list[str] = []

    def check(session: Session, plan: transaction.SetupPlan) -> None:
        plans.append(transaction.reload_command(plan))
        transaction.check_new_login(session, plan)

    outcome = setup.setup_host(sd_target.host, check_login=check)
    assert outcome.error is None, outcome
    assert outcome.actions == ("reloaded sshd",) and plans == ["systemctl reload ssh"]
    assert ssh_unit(sd_target) == ("active", pid)  # reloaded in place, not restarted
    assert reloads(sd_target) == 1
    assert effective(sd_target.lab, addr) == WANT
    assert FCO_LINE in read(sd_target.lab, SSHD_CONFIG)
    assert_admin_login_works(sd_target)

    before = snapshot(sd_target.lab)
    again = setup.setup_host(sd_target.host)
    assert again.error is None and again.actions == ()
    assert set(again.steps.values()) == {"ok"}
    assert snapshot(sd_target.lab) == before and reloads(sd_target) == 1

    pull = subprocess.run([INVOKE, "backup", "--inventory", str(sd_target.inventory)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    copied = Path(sd_target.host.destination) / "tree" / "sshd_config"
    assert copied.read_bytes() == read(sd_target.lab, SSHD_CONFIG)


def test_a_failed_lockout_check_restores_and_reloads_through_systemctl(sd_target: Target):
    addr = client_addr(sd_target)
    original = effective(sd_target.lab, addr)
    before = snapshot(sd_target.lab)
    _, pid = ssh_unit(sd_target)
    seen: list[str] = []

    def login_fails(session: Session, plan: transaction.SetupPlan) -> None:
        seen.append(effective(sd_target.lab, addr))
        raise transaction.SetupError("simulated: a new admin login fails")

    outcome = setup.setup_host(sd_target.host, check_login=login_fails)
    assert seen == [WANT]
    assert outcome.error == "simulated: a new admin login fails; restored and reloaded"
    assert effective(sd_target.lab, addr) == original
    assert snapshot(sd_target.lab) == before
    assert ssh_unit(sd_target) == ("active", pid) and reloads(sd_target) == 2
    assert_admin_login_works(sd_target)
