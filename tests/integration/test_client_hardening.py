"""The backup host against the servers it pulls from, on a real lab host in daemon mode.

- A local rsync older than 3.4.1 (CVE-2024-12084..12088) is refused before anything runs
  unless the inventory sets ``rsync.allow_vulnerable``; with the switch the same pull runs.
  The old client is PATH's ``rsync`` behind a wrapper that answers ``--version`` as 3.2.7
  and runs this machine's rsync otherwise: the refusal must come from the real
  ``--version`` call of the PATH fallback, whatever this machine's own rsync is.
- The backup's ssh reads no ssh_config. OpenSSH finds ``~/.ssh/config`` through the passwd
  entry, not ``$HOME``, so a temporary HOME would prove nothing: the hostile
  ``~/.ssh/config`` and ``/etc/ssh/ssh_config`` are bind-mounted in a private mount
  namespace (``unshare --mount``) around one pullback-backup run; the machine's own files
  never change. They hold a ProxyCommand and a LocalCommand that would leave marks, a
  RemoteForward that would fail the connection (ExitOnForwardFailure) and ForwardAgent.
  A control run of plain ``ssh -G`` in the same namespace shows they are in effect.
- With an ssh-agent in SSH_AUTH_SOCK, the pull's ssh (run with ``-v``) asks for no agent
  forwarding; the control, plain ssh under the same hostile config, does.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.core import pull
from roles.local import store
from tests.integration.conftest import PROGRAM, Lab, LabServer, lab_server

pytestmark = pytest.mark.integration

DATA = "/srv/probe"
REAL_RSYNC = shutil.which("rsync")
AGENT_FORWARDING = "Requesting authentication agent forwarding"

OLD_RSYNC = f"""#!/bin/sh
# An rsync that says it is 3.2.7 (the answer backup's PATH fallback asks for).
if [ "$1" = --version ]; then
    echo 'rsync  version 3.2.7  protocol version 31'
    exit 0
fi
exec {REAL_RSYNC} "$@"
"""


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The module's host in daemon mode with one file; rsync.allow_vulnerable is the lab's
    (true) unless a test's inventory says otherwise."""
    with lab_server(lab_env, tmp_path_factory, "client", defaults={"backup": {"source": DATA}},
                    seed=f"mkdir -p {DATA} && echo probe > {DATA}/file") as server:
        yield server


def env(work: Path, **more: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return {**base, "XDG_CACHE_HOME": str(work / "cache"), **more}


def backup(inventory: Path, environ: dict[str, str], wrap: list[str] | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([*(wrap or []), PROGRAM, "--inventory", str(inventory)],
                          capture_output=True, text=True, timeout=180, env=environ,
                          check=False, stdin=subprocess.DEVNULL)


# --- the client's version ---------------------------------------------------------------------


@pytest.fixture
def old_path(tmp_path: Path) -> str:
    folder = tmp_path / "old-bin"
    folder.mkdir()
    (folder / "rsync").write_text(OLD_RSYNC)
    (folder / "rsync").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_an_old_client_is_refused_before_anything_runs(server, old_path):
    lab_host, work = server.lab, server.work
    inventory, host = server.spec("refused", rsync={"allow_vulnerable": False})
    result = backup(inventory, env(work, PATH=old_path))
    assert result.returncode == 1, result
    assert result.stdout.split() == ["host", "result", "seconds", "files", "transferred",
                                     "received", "snapshot", lab_host.name, "failed", "0.0",
                                     "-", "-", "-", "-"]
    refused = [line for line in result.stderr.splitlines() if ": failed: refused:" in line]
    assert refused == [
        f"{lab_host.name}: failed: refused: the local rsync {old_path.split(':')[0]}/rsync is "
        "rsync 3.2.7, older than 3.4.1: it lacks the fixes for CVE-2024-12084..12088 (and the "
        "later fixes up to 3.4.x), so any server it pulls from could attack this backup host; "
        "fix: build 3.4.1 or newer (rsync.version, default 3.5.1, then `invoke build-rsync "
        "--local-only`), or set rsync.allow_vulnerable: true knowingly; next: pullback doctor "
        f"--inventory {inventory} --host {lab_host.name}"], result.stderr
    # Nothing ran: no destination, no state folder (lock, logs).
    assert not Path(host.destination).exists()
    assert not store.state_dir(host).exists()


def test_the_switch_lets_the_old_client_pull(server, old_path):
    inventory, host = server.spec("allowed")
    result = backup(inventory, env(server.work, PATH=old_path))
    assert result.returncode == 0, result
    assert "refused" not in result.stderr
    assert (Path(host.destination) / "tree" / "file").read_text() == "probe\n"


# --- the backup's ssh against a hostile ssh_config ----------------------------------------------


HOSTILE_USER = """\
Host *
  ProxyCommand sh -c 'touch {marks}/proxy-command; exec nc %h %p'
  ForwardAgent yes
  ExitOnForwardFailure yes
  RemoteForward 127.0.0.1:0 127.0.0.1:22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  ControlMaster auto
  ControlPath {marks}/mux-%C
"""
HOSTILE_SYSTEM = """\
Host *
  PermitLocalCommand yes
  LocalCommand touch {marks}/local-command
  ForwardX11 yes
"""


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """``(marks, wrap)``: ``wrap`` runs a command in a private mount namespace where this
    user's home holds a hostile ``.ssh/config`` and ``/etc/ssh/ssh_config`` is hostile."""
    # The lab needs root anyway; a missing tool fails here, loudly, never skips.
    assert os.geteuid() == 0, "needs root for a private mount namespace"
    assert shutil.which("unshare") is not None, "unshare(1) (util-linux) is missing"
    marks = tmp_path / "marks"
    marks.mkdir()
    home = Path(tempfile.mkdtemp(prefix="pullback-hostile-home-", dir=tmp_path))
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "config").write_text(HOSTILE_USER.format(marks=marks))
    (home / ".ssh" / "config").chmod(0o600)
    system = tmp_path / "ssh_config"
    system.write_text(HOSTILE_SYSTEM.format(marks=marks))
    # Over the passwd home's .ssh only: the home may hold this very Python (pyenv).
    user_ssh = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".ssh"
    assert Path("/etc/ssh/ssh_config").is_file(), "openssh-client's /etc/ssh/ssh_config is missing"
    made = not user_ssh.exists()
    if made:  # a fresh machine: an empty ~/.ssh to mount over, removed afterwards
        user_ssh.mkdir(mode=0o700)
    script = (f"mount --make-rprivate / && mount --bind {shlex.quote(str(home / '.ssh'))} "
              f"{shlex.quote(str(user_ssh))} && mount --bind {shlex.quote(str(system))} "
              '/etc/ssh/ssh_config && exec "$@"')
    try:
        yield marks, ["unshare", "--mount", "sh", "-c", script, "hostile"]
    finally:
        if made:
            user_ssh.rmdir()


def test_the_hostile_config_is_in_effect_for_plain_ssh(hostile):
    """The control: without pullback's options, ssh takes every hostile directive."""
    marks, wrap = hostile
    shown = subprocess.run([*wrap, "ssh", "-G", "127.0.0.1"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.splitlines()
    assert f"proxycommand sh -c 'touch {marks}/proxy-command; exec nc %h %p'" in shown
    assert "forwardagent yes" in shown and "permitlocalcommand yes" in shown
    assert f"localcommand touch {marks}/local-command" in shown
    assert any(line.startswith("remoteforward ") for line in shown)


def test_a_hostile_ssh_config_does_not_reach_the_backup(server, hostile):
    marks, wrap = hostile
    inventory, host = server.spec("hostile")
    # What ssh makes of the backup's own -e words in that namespace.
    words = shlex.split(pull.ssh_command(host))
    shown = subprocess.run([*wrap, *words, "-G", "127.0.0.1"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.splitlines()
    for wanted in ("forwardagent no", "forwardx11 no", "permitlocalcommand no",
                   "clearallforwardings yes", "stricthostkeychecking true",
                   "globalknownhostsfile /dev/null", "identitiesonly yes", "batchmode yes",
                   "updatehostkeys false", f"userknownhostsfile {host.known_hosts}"):
        assert wanted in shown, (wanted, shown)
    assert not [line for line in shown if line.split()[0] in (
        "proxycommand", "localcommand", "remoteforward", "controlpath")], shown
    # And the real pull, in that namespace.
    result = backup(inventory, env(server.work), wrap)
    assert result.returncode == 0, result
    assert (Path(host.destination) / "tree" / "file").read_text() == "probe\n"
    assert sorted(os.listdir(marks)) == []  # no ProxyCommand, no LocalCommand, no mux


def test_the_pull_never_forwards_the_agent(server, hostile, tmp_path):
    host, work = server.host, server.work
    _, wrap = hostile
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        environ = env(work, SSH_AUTH_SOCK=str(sock))
        # The control: plain ssh with the hostile ForwardAgent yes asks to forward it.
        plain = subprocess.run(
            [*wrap, "ssh", "-v", "-o", "ProxyCommand=none", "-o", "ClearAllForwardings=yes",
             "-o", "ControlPath=none", "-o", f"UserKnownHostsFile={host.known_hosts}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
             "-i", host.backup_key, "-p", str(host.port), "root@127.0.0.1"],
            capture_output=True, text=True, timeout=60, env=environ, check=False,
            stdin=subprocess.DEVNULL)
        assert AGENT_FORWARDING in plain.stderr, plain.stderr
        # The pull's own ssh, verbose: the same agent, the same config, no request.
        with tempfile.TemporaryDirectory(dir=tmp_path) as dest:
            argv = pull.build_argv(host, dry_run=True, tty=False, local_rsync=REAL_RSYNC,
                                   dest=dest)
            argv[2] += " -v"
            result = subprocess.run([*wrap, *argv], capture_output=True, text=True,
                                    timeout=120, env=environ, check=False,
                                    stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result
        assert "debug1:" in result.stderr + result.stdout  # -v reached ssh
        assert AGENT_FORWARDING not in result.stderr + result.stdout
    finally:
        agent.terminate()
        agent.wait(timeout=10)
