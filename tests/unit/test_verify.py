"""roles.features.verify, pure parts, and the guard that keeps tests/infra out of the normal run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from roles.core.spec import HostSpec
from roles.features import verify
from roles.inventory.schema import validate_host

ROOT = Path(__file__).resolve().parents[2]


def make_host(name: str = "web1", **fields) -> HostSpec:
    data = {"name": name, "address": "192.0.2.10", "port": 2222, "admin_user": "admin",
            "backup_key": "/keys/backup", "known_hosts": "/keys/known_hosts", **fields}
    return validate_host(data)


def test_ssh_config_is_strict_and_uses_the_inventory():
    text = verify.render_ssh_config([make_host(admin_key="/keys/admin key"),
                                     make_host("db", port=22)], Path("/tmp/cm"))
    first, second = text.split("\n\n")
    assert first.splitlines() == [
        "Host web1", "  HostName 192.0.2.10", "  Port 2222", "  User admin",
        "  UserKnownHostsFile /keys/known_hosts", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes", "  BatchMode yes", "  ConnectTimeout 10",
        '  IdentityFile "/keys/admin key"', "  IdentitiesOnly yes", "  ControlPath /tmp/cm/%C",
    ]
    assert "IdentityFile" not in second and "Port 22\n" in second


def test_ssh_config_refuses_a_quote():
    with pytest.raises(verify.VerifyError):
        verify.render_ssh_config([make_host(known_hosts='/keys/a"b')])


def test_pytest_argv():
    argv = verify.pytest_argv(Path("/inv.yaml"), [make_host(), make_host("db")],
                              Path("/t/ssh_config"), Path("/t/r.jsonl"))
    assert argv[:4] == [sys.executable, "-m", "pytest", str(verify.INFRA)]
    assert "-p" in argv and "no:cacheprovider" in argv
    assert "--hosts=ssh://web1,ssh://db" in argv
    assert "--ssh-config=/t/ssh_config" in argv and "--sudo" not in argv
    assert "--pullback-inventory=/inv.yaml" in argv and "--pullback-results=/t/r.jsonl" in argv


def test_parse_and_format_results():
    lines = [
        {"host": "web1", "check": "/root/.ssh is a 0700 root:root folder", "status": "PASS",
         "message": ""},
        {"host": "web1", "check": "rsyncd.conf module", "status": "SKIP",
         "message": "captured mode uses no rsyncd module"},
        {"host": "db", "check": "/root/.ssh is a 0700 root:root folder", "status": "FAIL",
         "message": "/root/.ssh is a folder with mode 0644, owner 0:0"},
    ]
    results = verify.parse_results("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert [r.failed for r in results] == [False, False, True]
    text = verify.format_results(results)
    assert text.splitlines() == [
        "web1  PASS  /root/.ssh is a 0700 root:root folder",
        "web1  SKIP  rsyncd.conf module: captured mode uses no rsyncd module",
        "db    FAIL  /root/.ssh is a 0700 root:root folder: /root/.ssh is a folder with mode "
        "0644, owner 0:0",
        "1 pass, 1 fail, 1 skip",
    ]


def test_hosts_that_cannot_be_checked_fail_without_running_pytest(tmp_path):
    results = verify.run_checks(tmp_path / "inv.yaml", [
        make_host(sudo_password=True),
        make_host("db", known_hosts=str(tmp_path / "missing")),
    ])
    assert [(r.host, r.status) for r in results] == [("web1", "FAIL"), ("db", "FAIL")]
    assert "passwordless sudo" in results[0].check
    assert "does not exist" in results[1].message


def test_normal_test_run_does_not_collect_tests_infra():
    # pytest_ignore_collect in tests/infra/conftest.py, not a skip marker: nothing collected.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(verify.INFRA)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 5, result.stdout + result.stderr  # "no tests collected"
    assert "test_remote_state" not in result.stdout
