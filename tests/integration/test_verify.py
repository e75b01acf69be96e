"""`invoke verify` (tests/infra run by roles.features.verify) against real lab hosts: a provisioned
host passes every check; changes made by hand fail exactly the check that covers them; a
host never set up fails per check next to a good one; an unknown host key is one error;
captured mode checks the gate instead of the rsyncd module.

As in test_doctor.py the inventory pins what the lab image really has (rsync 3.2.7 at
/usr/bin/rsync, ``rsync.prefix: /usr``), so "the installed rsync version" is checked for
real without building rsync here.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.config import rsyncd
from roles.core import hardened
from roles.features import capture
from roles.inventory.schema import load
from roles.remote.facts import PULLBACK_RSYNCD_CONF, RSYNCD_CONF
from tests.integration.conftest import Lab, invoke, lab_server

pytestmark = pytest.mark.integration

PINNED = {"prefix": "/usr", "version": "3.2.7"}
DROP_IN = "/etc/ssh/sshd_config.d/00-verify-test.conf"

ROOT_SSH = "/root/.ssh is a 0700 root:root folder"
PERMIT = "sshd -T: PermitRootLogin forced-commands-only for the backup host"
MODULE = "rsyncd.conf module: path /, uid 0, gid 0, read only, list false (daemon mode)"
PRIVATE = ("/etc/pullback/rsyncd.conf is a 0600 root:root file in a root folder no one else "
           "can write")
SHARED = "/etc/rsyncd.conf holds no pullback module (any rsync daemon would serve it)"
GATE = "captured mode: the gate is 0700 root:root and rendered from the local capture record"
CHECKS = [
    PERMIT,
    "sshd -T: PubkeyAuthentication yes",
    ROOT_SSH,
    "/root/.ssh/authorized_keys is a 0600 root:root file",
    "the backup key's line forces the command of the inventory's mode",
    "the backup key's line has restrict or every no-* option, and the inventory's from=",
    MODULE,
    PRIVATE,
    SHARED,
    GATE,
    "the forced command runs the pinned rsync (rsync.prefix/bin/rsync)",
    "rsync.prefix/bin/rsync reports the inventory's rsync.version",
]


def sh(host: lab.LabHost, script: str) -> None:
    lab.engine("exec", host.name, "sh", "-c", script, timeout=60)


def run_verify(inventory: Path) -> tuple[subprocess.CompletedProcess, dict[tuple[str, str], str]]:
    result = invoke("verify", "--inventory", str(inventory))
    rows: dict[tuple[str, str], str] = {}
    for line in result.stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[1] in ("PASS", "FAIL", "SKIP", "ERROR"):
            name, status, rest = fields
            check = next((c for c in (*CHECKS, "admin login") if rest.startswith(c)), rest)
            rows[(name, check)] = status + rest[len(check):]
    return result, rows


@pytest.fixture(scope="module")
def provisioned(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[lab.LabHost, Path]]:
    with lab_server(lab_env, tmp_path_factory, "verify", name="inventory", backups="backups",
                    defaults={"rsync": PINNED}) as server:
        yield server.lab, server.inventory


def test_provisioned_host_passes_every_check(provisioned):
    host, inventory = provisioned
    result, rows = run_verify(inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {(host.name, c): "PASS" for c in CHECKS}
    expected[(host.name, GATE)] = "SKIP: daemon mode uses no gate"
    assert rows == expected
    assert result.stdout.splitlines()[-1] == "11 pass, 1 skip"


@pytest.mark.parametrize(("change", "undo", "check", "message"), [
    ("chmod 644 /root/.ssh", "chmod 700 /root/.ssh", ROOT_SSH,
     "/root/.ssh is a folder with mode 0644, owner 0:0"),
    (f"printf 'PermitRootLogin yes\\n' > {DROP_IN}", f"rm -f {DROP_IN}", PERMIT,
     "permitrootlogin yes"),
    (f"cp -p {PULLBACK_RSYNCD_CONF} /root/rsyncd.saved && sed -i "
     f"'s/read only = yes/read only = no/' {PULLBACK_RSYNCD_CONF}",
     f"mv /root/rsyncd.saved {PULLBACK_RSYNCD_CONF}", MODULE, "read only is 'no', should be yes"),
    (f"chmod 0640 {PULLBACK_RSYNCD_CONF}", f"chmod 0600 {PULLBACK_RSYNCD_CONF}", PRIVATE,
     "mode 0640"),
    # An old pullback's module, as it wrote it, in the shared file.
    (f"printf '%s' {shlex.quote(rsyncd.render_legacy_module('system').decode())} "
     f"> {RSYNCD_CONF}", f"rm -f {RSYNCD_CONF}", SHARED, "still holds pullback's [system]"),
])
def test_a_change_by_hand_fails_the_check_that_covers_it(provisioned, change, undo, check,
                                                         message):
    host, inventory = provisioned
    sh(host, change)
    try:
        result, rows = run_verify(inventory)
    finally:
        sh(host, undo)
    assert result.returncode == 1
    assert "verify: failed: " + host.name in result.stderr
    failed = {k: v for k, v in rows.items() if not v.startswith(("PASS", "SKIP"))}
    assert list(failed) == [(host.name, check)], result.stdout
    assert failed[(host.name, check)].startswith("FAIL: ") and message in failed[(host.name, check)]


def test_a_host_never_set_up_fails_beside_a_good_one(lab_env: Lab, provisioned):
    good, inventory = provisioned
    bare = lab_env.start("verify-bare")
    try:
        both = lab_env.inventory([good, bare], path=inventory.with_name("both.yaml"),
                                 defaults={"rsync": PINNED})
        result, rows = run_verify(both)
    finally:
        lab_env.remove(bare)
    assert result.returncode == 1
    assert f"verify: failed: {bare.name}" in result.stderr
    assert all(rows[(good.name, c)].startswith(("PASS", "SKIP")) for c in CHECKS)
    assert rows[(bare.name, PERMIT)].startswith("FAIL: ")
    assert rows[(bare.name, ROOT_SSH)] == "FAIL: /root/.ssh does not exist"
    # the hosts come out in inventory order
    names = [line.split()[0] for line in result.stdout.splitlines()[:-1]]
    assert names == [good.name] * len(CHECKS) + [bare.name] * len(CHECKS)


def test_unknown_host_key_is_one_error(lab_env: Lab, provisioned):
    host, inventory = provisioned
    other = lab_env.inventory([host], path=inventory.with_name("unknown.yaml"),
                              defaults={"rsync": PINNED})
    other.with_suffix(".known_hosts").write_text("")
    result, rows = run_verify(other)
    assert result.returncode == 1
    (status,) = rows.values()
    assert list(rows) == [(host.name, "admin login")]
    assert status.startswith("ERROR: cannot log in as the admin") and \
        "Host key verification failed" in status


def test_captured_mode_checks_the_gate(lab_env: Lab, provisioned):
    host, inventory = provisioned
    work = inventory.parent / "captured"
    captured = lab_env.inventory([host], path=inventory.with_name("captured.yaml"), defaults={
        "rsync": PINNED, "forced_command": "captured",
        "backup": {"destination": str(work / "{name}")}})
    keys_before = (f"cp /root/.ssh/authorized_keys /root/keys.saved && "
                   f"cp -p {PULLBACK_RSYNCD_CONF} /root/rsyncd.saved")
    sh(host, keys_before)
    try:
        outcome = capture.capture_host(load(captured).hosts[host.name])
        assert outcome.error is None, outcome
        result, rows = run_verify(captured)
        assert result.returncode == 0, result.stdout + result.stderr
        assert rows[(host.name, GATE)] == "PASS"
        assert rows[(host.name, MODULE)] == "SKIP: captured mode uses no rsyncd module"
        assert rows[(host.name, SHARED)] == "PASS"
        sh(host, f"test ! -e {PULLBACK_RSYNCD_CONF}")  # daemon mode's file went
        sh(host, f"chmod 0755 {hardened.GATE}")
        result, rows = run_verify(captured)
        assert result.returncode == 1
        assert rows[(host.name, GATE)].startswith("FAIL: ") and "0755" in rows[(host.name, GATE)]
    finally:
        sh(host, "mv /root/keys.saved /root/.ssh/authorized_keys && "
                 f"mv /root/rsyncd.saved {PULLBACK_RSYNCD_CONF}")
