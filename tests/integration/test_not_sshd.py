"""A port that is not sshd: backup, doctor and trust-host blame ssh, not rsync.

Two real loopback TCP servers stand where sshd should be: one accepts and says nothing
(ssh: "Connection timed out during banner exchange"), one closes every connection at once
("kex_exchange_identification: Connection closed by remote host"). The real ssh, rsync
and paramiko run against them through the real command line; no host is contacted.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NOT_THE_DAEMON = ("server greeting", "forced command", "daemon", "Traceback", "Errno", "rsyncd")


@contextlib.contextmanager
def port_that(behaviour: str) -> Iterator[int]:
    """A 127.0.0.1 port whose server ``silent``ly holds each connection, or ``close``s it
    at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)  # accept() wakes up to see ``done``: close() does not wake it
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if behaviour == "close":
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        server.close()
        for conn in held:
            conn.close()
        thread.join(5)


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    with port_that("silent") as silent, port_that("close") as closing:
        yield {"silent": silent, "closing": closing}


@pytest.fixture(scope="module")
def inventory(ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("not-sshd")
    key = work / "backup_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known_hosts = work / "known_hosts"
    known_hosts.write_text("")
    path = work / "inventory.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": {
            "admin_user": "admin", "backup_key": str(key), "known_hosts": str(known_hosts),
            "backup": {"destination": str(work / "b" / "{name}"),
                       "allow_destination": str(work / "b"), "snapshots": 0},
            "rsync": {"allow_vulnerable": True, "local_prefix": str(work / "local")},
        },
        "hosts": {name: {"address": "127.0.0.1", "port": port}
                  for name, port in ports.items()},
    }, sort_keys=False))
    return path


def pullback(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    result = subprocess.run([str(BIN / "pullback"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - t0


def failed_lines(text: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in text.splitlines() if ": failed: " in line
            or ": refused: " in line}


def test_backup_blames_ssh_and_names_the_next_command(inventory: Path, tmp_path: Path):
    result, _ = pullback("backup", "--inventory", str(inventory), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = failed_lines(result.stderr)
    assert set(lines) == {"silent", "closing"}, result.stderr
    assert lines["silent"].startswith("silent: failed: ssh failed (rsync exit ")
    assert "Connection timed out during banner exchange -- the port accepted the connection " \
           "but no SSH server answered on it" in lines["silent"]
    assert "kex_exchange_identification" in lines["closing"]
    assert "closed it before any SSH greeting" in lines["closing"]
    for name, line in lines.items():
        assert line.endswith(f"; next: pullback doctor --inventory {inventory} --host {name}")
        assert not any(word in line for word in NOT_THE_DAEMON), line
        assert "(log: " in line
    assert result.stderr.splitlines()[-1] == "backup: 2 of 2 hosts failed"
    # The table still says which; the host names appear once per place.
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {"silent": "failed", "closing": "failed"}


def test_doctor_stops_after_the_reach_check(inventory: Path, ports: dict[str, int],
                                            tmp_path: Path):
    result, _ = pullback("doctor", "--inventory", str(inventory), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    reports = result.stdout.split("\n\n")
    for name, meaning in (("silent", "no SSH server answered"),
                          ("closing", "closed it before any SSH greeting")):
        (report,) = [r for r in reports if r.startswith(f"{name} (")]
        assert f"error  reach          cannot reach sshd at 127.0.0.1:{ports[name]}" in report
        assert meaning in report
        assert "ok     test pull      skipped: no sshd answered (see reach)" in report
        assert "rsync exit" not in report and "Errno" not in report


def test_trust_host_says_it_in_one_line(inventory: Path, tmp_path: Path):
    result, _ = pullback("trust-host", "--inventory", str(inventory), "--host", "silent",
                         "--host", "closing", "--yes", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr  # one per host, and the summary
    found = failed_lines(result.stderr)
    assert "no SSH server answered" in found["silent"]
    assert "closed it before any SSH greeting" in found["closing"]
    for name, line in found.items():
        assert line.startswith(f"{name}: refused: ")
        assert line.endswith(f"; next: pullback doctor --inventory {inventory} --host {name}")
        assert "Traceback" not in line and "Errno" not in line
    assert lines[-1] == "trust-host: not trusted: silent, closing"
    assert (inventory.parent / "known_hosts").read_text() == ""


def test_ssh_itself_says_so_for_both_ports(ports: dict[str, int]):
    """The table's inputs are what this machine's ssh really prints."""
    from roles.core.ssh_failures import classify_ssh_failure

    kinds = {}
    for name, port in ports.items():
        result = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
             "-o", f"UserKnownHostsFile=/dev/null-{uuid.uuid4().hex}", "-p", str(port),
             "127.0.0.1", "true"], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 255, shlex.join(result.args)
        failure = classify_ssh_failure(result.stderr)
        kinds[name] = failure.kind if failure else result.stderr
    assert kinds == {"silent": "not-sshd", "closing": "closed"}


def test_pullback_runs_a_real_task_from_any_folder(lab_env, shared_host, tmp_path: Path):
    """``pullback doctor`` from a folder that holds no tasks.py, against a real lab host."""
    from roles.inventory.schema import load
    from roles.local import keys

    inventory = lab_env.inventory([shared_host])
    keys.ensure_backup_key(Path(load(inventory).hosts[shared_host.name].backup_key))
    assert not (tmp_path / "tasks.py").exists()
    result, _ = pullback("doctor", "--inventory", str(inventory), "--host", shared_host.name,
                         cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr  # a lab host not set up has findings
    report = result.stdout
    assert report.startswith(f"{shared_host.name} (127.0.0.1:{shared_host.port})")
    assert "  ok     host key" in report and " reach " not in report
    assert "Traceback" not in result.stderr
