"""`invoke backup` over two lab hosts (and one that is down): on a terminal (a real
pseudo-terminal, python's pty) a live line per host drawn in place; without one, a start and
an end line per host and no escape code at all. Both end with the same summary and failure
lines, and both back up for real."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from roles.inventory.schema import load
from tests.integration.conftest import INVOKE, ROOT, Lab, closed_port, invoke, set_up, sh

pytestmark = pytest.mark.integration

DATA = "/srv/data"
# --bwlimit: the 12 MB file takes about 3 s (rsync prints progress about once a second), so
# the view is drawn while the pulls run.
OPTIONS = ["-avzHx", "--numeric-ids", "--delete", "--progress", "--bwlimit=4000"]
SIZE = 12_000_000
SEED = f"""
set -eu
mkdir -p {DATA}/sub
head -c {SIZE} /dev/urandom > {DATA}/big.bin
printf 'small\\n' > {DATA}/small
printf 'deeper\\n' > {DATA}/sub/file
"""


@pytest.fixture(scope="module")
def fleet(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory):
    """Two hardened lab hosts with data, and an inventory that also names a host whose
    port refuses connections."""
    work = tmp_path_factory.mktemp("progress")
    hosts = [lab_env.start("progress"), lab_env.start("progress")]
    try:
        path = lab_env.inventory(hosts, path=work / "fleet.yaml", defaults={
            "backup": {"destination": str(work / "backups" / "{name}"), "source": DATA,
                       "allow_inexact": True, "options": OPTIONS},
        }, others={"gone": {"address": "127.0.0.1", "port": closed_port()}})
        inventory = load(path)
        for h in hosts:
            set_up(inventory.hosts[h.name])
            sh(h, SEED)
        yield path, [h.name for h in hosts], work / "backups"
    finally:
        for h in hosts:
            lab_env.remove(h)


def run_on_a_terminal(argv: list[str], timeout: float = 240) -> tuple[int, str]:
    """``argv`` with stdout and stderr on a pseudo-terminal (120 x 40); all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env={**env, "TERM": "xterm-256color"},
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: the last writer closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            proc.kill()
            pytest.fail(f"{argv} still ran after {timeout} s")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_live_line_per_host(fleet):
    path, names, backups = fleet
    code, screen = run_on_a_terminal([INVOKE, "backup", "--inventory", str(path)])
    assert code == 1, screen  # "gone" failed, the two others are backed up
    # Drawn in place: the cursor goes up and lines are erased between drawings.
    assert screen.count("\x1b[1A\x1b[2K") >= 4, screen
    lines = [line.strip() for line in
             re.split(r"\r|\n|\x1b\[\d*[AK]", re.sub(r"\x1b\[[\d;]*m", "", screen))]
    for name in names:
        # While it ran: its line with bytes and a rate read from rsync's progress output.
        assert any(re.fullmatch(rf"{name}\s+running\s+\d+\s+[\d.]+ [KM]B\s+[\d.]+ [KM]B/s"
                                rf"\s+[\d.]+ s", line) for line in lines), screen
        # At the end: done, every file and byte of the pull.
        assert any(re.fullmatch(rf"{name}\s+done\s+3\s+12.0 MB\s+[\d.]+ [KM]B/s\s+[\d.]+ s",
                                line) for line in lines), screen
        assert (backups / name / "tree" / "big.bin").stat().st_size == SIZE
    assert any(re.match(r"gone\s+failed\s", line) for line in lines), screen
    # The summary table and the failure line with the next command follow, as without a view.
    after = screen[screen.rindex("\x1b[?25h"):]  # rich shows the cursor again when it stops
    assert re.search(r"^host\s+result\s+seconds", after, re.MULTILINE), after
    assert re.search(rf"^{names[0]}\s+ok\s", after, re.MULTILINE), after
    assert re.search(r"^gone: failed: ssh failed .* next: invoke doctor --inventory \S+ "
                     r"--host gone\r?$", after, re.MULTILINE), after
    assert "backup: 1 of 3 hosts failed" in after


def test_without_a_terminal_plain_lines_and_no_escape_codes(fleet):
    path, names, backups = fleet
    result = invoke("backup", "--inventory", str(path), timeout=240)
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split()[:2] == ["host", "result"]  # only the table
    lines = result.stderr.splitlines()
    for name in [*names, "gone"]:
        assert lines.count(f"{name}: started") == 1, lines
    for name in names:  # the whole tree, or nothing when the first test's copy is there
        assert sum(re.fullmatch(rf"{name}: done in [\d.]+ s, (3 files, 12.0 MB|0 files, 0 B)",
                                line) is not None for line in lines) == 1, lines
        assert (backups / name / "tree" / "big.bin").stat().st_size == SIZE
    assert sum(re.fullmatch(r"gone: failed after [\d.]+ s", line) is not None
               for line in lines) == 1, lines
    assert re.search(r"^host\s+result\s+seconds", result.stdout, re.MULTILINE)
    assert re.search(r"^gone: failed: ssh failed .* next: invoke doctor", result.stderr,
                     re.MULTILINE), result.stderr
