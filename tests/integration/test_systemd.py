"""setup-remote on a server whose sshd runs under systemd, as on most real servers: the
lab's systemd flavour has systemd as PID 1 and sshd as ``ssh.service``, so the reload is
``systemctl reload ssh`` (the unit's ExecReload: ``sshd -t``, then SIGHUP to its main pid)
and the rollback reloads through it too."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core import sandbox
from roles.features import schedule as sched
from roles.features import setup_remote as setup
from roles.hostfiles import transaction
from roles.remote.facts import SSHD_CONFIG, gather
from roles.remote.session import Session, connect
from tests.integration.conftest import Lab, invoke
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

    pull = invoke("backup", "--inventory", str(sd_target.inventory), timeout=120)
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


# --- the scheduled units under a real systemd -------------------------------------------

# Stands in for pullback-backup (the lab's servers have no pullback): records what it was
# given and what the unit's sandbox lets it do, and fails for the instances named in
# /var/backups/pullback/fail.
STAND_IN = r"""#!/bin/sh
out=/var/backups/pullback/ran-$4
{
  echo "argv: $*"
  grep -E '^(CapBnd|NoNewPrivs):' /proc/self/status
  if touch /etc/escaped 2>/dev/null; then echo "etc: writable"; else echo "etc: read-only"; fi
  if touch /var/backups/pullback/written 2>/dev/null; then echo "dest: writable"; fi
  if touch "$XDG_CACHE_HOME/pullback/compiled" 2>/dev/null; then
    echo "cache: $XDG_CACHE_HOME/pullback writable"; fi
  # The rsync sandbox (bubblewrap) inside the unit's: what a real run does.
  echo "bwrap: $(@BWRAP@ 2>&1) exit $?"
} > "$out"
grep -qx "$4" /var/backups/pullback/fail 2>/dev/null && exit 1
exit 0
"""


def test_the_template_units_run_under_systemd_and_failures_are_recorded(lab_env: Lab,
                                                                        tmp_path: Path):
    """The units `schedule` writes, installed in a container whose PID 1 is systemd: each
    timer is enabled, each instance runs its shard or host inside the unit's sandbox, a
    failed instance starts pullback-failure@ (an err line in the journal, a mark in
    /var/lib/pullback/failed) and a good run removes the mark.

    The container gets CAP_SYS_ADMIN, as systemd on a real machine has: without it systemd
    cannot build a unit's mount namespace and quietly runs it without ProtectSystem=."""
    name = f"pullback-test-{os.getpid()}-units"  # the lab's label: removed with the others
    lab.engine("run", "-d", "--name", name, "--hostname", name, "--systemd=always",
               "--label", f"{lab.LABEL}=1", "--cap-add", "SYS_ADMIN",
               "-e", "PULLBACK_ADMIN_PUBKEY=none", lab_env.systemd_image(), "/sbin/init")
    box = lab.LabHost(name=name, port=0, host_key="")  # sh() needs only its name
    try:
        sh(box, "for i in $(seq 100); do systemctl is-system-running -q && break; "
                "[ \"$(systemctl is-system-running)\" = degraded ] && break; sleep 0.2; done")
        # This machine's bwrap (same Debian release as the lab image) runs the sandbox a
        # backup builds around a stand-in rsync that writes its DEST and reads its caps.
        lab.engine("cp", shutil.which("bwrap"), f"{name}:/opt/bwrap")
        inner = sandbox.build_sandbox(
            ["/bin/sh", "-c", "touch /var/backups/pullback/web1/pulled && "
                              "grep CapEff /proc/self/status"],
            bwrap="/opt/bwrap", writable=["/var/backups/pullback/web1"])
        sh(box, "mkdir -p /opt/pullback /var/backups/pullback/web1 && cat > "
                "/opt/pullback/backup && chmod 755 /opt/pullback/backup",
           input=STAND_IN.replace("@BWRAP@", shlex.join(inner)).encode())
        job = sched.build_job("/etc/pullback/inventory.yaml", [], shard="1/2",
                              own_units=["db1"], program="/opt/pullback/backup",
                              write_paths=["/var/backups/pullback"])
        facts = sched.gather(root=tmp_path, home=tmp_path / "root", tools={}, euid=0)
        sched.apply_schedule(sched.plan_install(facts, job, kind="systemd"))
        units = tmp_path / "etc/systemd/system"
        for unit in sorted(os.listdir(units)):
            lab.engine("cp", str(units / unit), f"{box.name}:/etc/systemd/system/{unit}")
        sh(box, "systemctl daemon-reload && systemctl enable --now "
                "pullback-backup@1-2.timer pullback-backup@db1.timer")
        timers = sh(box, "systemctl list-timers --all --no-legend 'pullback-backup@*'")
        assert "pullback-backup@1-2.timer" in timers and "pullback-backup@db1.timer" in timers

        sh(box, "echo db1 > /var/backups/pullback/fail")
        sh(box, "systemctl start pullback-backup@1-2.service; "
                "systemctl start pullback-backup@db1.service || true")
        ran = sh(box, "cat /var/backups/pullback/ran-1-2")
        assert "argv: --inventory /etc/pullback/inventory.yaml --unit 1-2" in ran
        assert "etc: read-only" in ran and "dest: writable" in ran
        assert "cache: /var/cache/pullback writable" in ran
        assert "NoNewPrivs:\t1" in ran
        assert "bwrap: CapEff:\t000000008800001b exit 0" in ran, ran  # the six, no more
        assert sh(box, "ls /var/backups/pullback/web1").split() == ["pulled"]
        bounding = int(ran.split("CapBnd:")[1].split()[0], 16)
        assert bounding == sum(1 << n for n in (0, 1, 3, 4, 21, 27, 31))  # the six + SYS_ADMIN
        assert "ProtectSystem=strict" in (units / sched.TEMPLATE).read_text()
        assert sh(box, "test -e /etc/escaped && echo yes || echo no").strip() == "no"

        failed = "pullback-backup@db1.service"
        sh(box, "for i in $(seq 50); do systemctl is-active -q pullback-failure@"
                f"{failed}.service || break; sleep 0.2; done")
        marks = sh(box, "ls /var/lib/pullback/failed").split()
        assert marks == [failed]
        journal = sh(box, "journalctl -p err -o cat --no-pager")
        assert f"pullback: {failed} failed; see journalctl -u {failed}" in journal
        assert sh(box, f"systemctl is-failed {failed} || true").strip() == "failed"

        sh(box, "rm /var/backups/pullback/fail && systemctl start pullback-backup@db1.service")
        assert sh(box, "ls /var/lib/pullback/failed").split() == []
    finally:
        lab.remove(name)
