"""setup-remote against real lab containers (real sshd, real sudo, real rsync), no mocks.

End state (checked with testinfra), what the backup key can and cannot do, idempotence,
--dry-run, sshd_config variants, lockout faults, existing files, and a bad inventory.
A test that changes a host gets its own container; the daemon-mode tests share one host
that the fixture sets up once through the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import select
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lab import hosts as lab
from roles.core.spec import HostSpec
from roles.core.sshd_output import parse_sshd_T
from roles.features import setup_remote as setup
from roles.hostfiles import transaction
from roles.inventory.schema import load
from roles.local import keys
from roles.remote.facts import (
    AUTHORIZED_KEYS,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    SSHD_CONFIG,
    gather,
)
from roles.remote.session import ConnectError, Session, connect
from tests.integration.conftest import NO_AGENT, Lab, closed_port, infra_host, invoke
from tests.unit.test_rsyncd import LEGACY

pytestmark = pytest.mark.integration

WANT = "forced-commands-only"
ROOT_SSH = "/root/.ssh"
DROP_IN = "/etc/ssh/sshd_config.d/50-cloud.conf"
WATCHED = (SSHD_CONFIG, DROP_IN, ROOT_SSH, AUTHORIZED_KEYS, RSYNCD_CONF, PULLBACK_DIR,
           PULLBACK_RSYNCD_CONF)
# The lab has no /usr/local/bin/rsync build.
FORCED = "/usr/bin/rsync --server --daemon --config=/etc/pullback/rsyncd.conf ."
STOCK_DEFAULT = b"#PermitRootLogin prohibit-password\n"
FCO_LINE = b"PermitRootLogin forced-commands-only\n"
ROOT_AT = "root@127.0.0.1"


def expected_rsyncd(addr: str) -> bytes:
    """/etc/pullback/rsyncd.conf for a backup host at ``addr``. Written out by hand, not
    rendered from the template: an independent check of the result."""
    return f"""# managed by pullback
# Read only by the backup key's forced command (rsync --server --daemon --config=...);
# never by an rsync daemon on TCP 873, which reads /etc/rsyncd.conf.
[system]
    path = /
    comment = pullback full-system backup (read-only)
    read only = yes
    list = false
    uid = 0
    gid = 0
    numeric ids = yes
    max connections = 1
    lock file = /run/rsyncd-pullback.lock
    refuse options = delete* remove-* backup* suffix partial-dir temp-dir inplace append* \
mkpath write-devices write-batch only-write-batch read-batch log-file*
    hosts allow = {addr}
    hosts deny = *
""".replace("\\\n", "").encode()


# What the previous version of setup-remote wrote into the shared /etc/rsyncd.conf, copied
# byte for byte in the unit tests (the migration must recognise exactly those bytes).
OLD_MODULE = LEGACY


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Target:
    lab: lab.LabHost
    inventory: Path
    host: HostSpec

    @property
    def name(self) -> str:
        return self.lab.name

    @property
    def key(self) -> Path:
        return Path(self.host.backup_key)


def make_target(lab_env: Lab, lab_host: lab.LabHost, **kwargs) -> Target:
    inventory = lab_env.inventory([lab_host], **kwargs)
    host = load(inventory).hosts[lab_host.name]
    keys.ensure_backup_key(Path(host.backup_key))
    return Target(lab_host, inventory, host)


def sh(lab_host: lab.LabHost, script: str, *args: str, input: bytes | None = None) -> str:
    """Run a script as root inside the container (test preparation and inspection)."""
    interactive = ["-i"] if input is not None else []
    result = lab.engine("exec", *interactive, lab_host.name, "sh", "-c", script, "sh", *args,
                        input=input)
    return result.stdout.decode(errors="replace")


def read(lab_host: lab.LabHost, path: str) -> bytes | None:
    result = lab.engine("exec", lab_host.name, "sh", "-c",
                        'if [ -e "$1" ]; then cat "$1"; else exit 3; fi', "sh", path, check=False)
    if result.returncode == 3:
        return None
    assert result.returncode == 0, result.stderr
    return result.stdout


def write(lab_host: lab.LabHost, path: str, data: bytes, mode: str = "0644") -> None:
    sh(lab_host, 'cat > "$1" && chown 0:0 "$1" && chmod "$2" "$1"', path, mode, input=data)


def snapshot(lab_host: lab.LabHost, paths: tuple[str, ...] = WATCHED) -> dict[str, str]:
    """sha256 + mode + owner of each file, mode + owner of each folder, or "missing"."""
    out = sh(lab_host, r"""
for f in "$@"; do
  if [ -d "$f" ]; then printf '%s dir %s\n' "$f" "$(stat -c '%a %u %g' "$f")"
  elif [ -e "$f" ]; then
    printf '%s %s %s\n' "$f" "$(sha256sum < "$f" | cut -d' ' -f1)" "$(stat -c '%a %u %g' "$f")"
  else printf '%s missing\n' "$f"; fi
done""", *paths)
    return dict(line.split(" ", 1) for line in out.splitlines())


def leftovers(lab_host: lab.LabHost) -> list[str]:
    """Candidate and backup files the apply script leaves behind."""
    out = sh(lab_host, "find /etc /root -name '*.pullback-*' 2>/dev/null || true")
    return out.split()


def sighups(lab_host: lab.LabHost) -> int:
    """sshd runs with -e: each reload logs "Received SIGHUP; restarting." to the engine log."""
    result = lab.engine("logs", lab_host.name)
    return (result.stdout + result.stderr).decode(errors="replace").count("Received SIGHUP")


def listener(lab_host: lab.LabHost) -> tuple[str, str]:
    """(pid, start time) of sshd's listener process."""
    for line in sh(lab_host, "ps -eo pid=,lstart=,args=").splitlines():
        if "[listener]" in line:
            parts = line.split()
            return parts[0], " ".join(parts[1:6])
    raise AssertionError("no sshd listener process")


def client_addr(target: Target) -> str:
    """The backup host's address as the server sees it ($SSH_CONNECTION, first field)."""
    conn = connect(target.host)
    try:
        return conn.run('printf %s "$SSH_CONNECTION"').stdout.split()[0]
    finally:
        conn.close()


def effective(lab_host: lab.LabHost, addr: str) -> str:
    out = sh(lab_host, '/usr/sbin/sshd -T -C "user=root,host=$1,addr=$1"', addr)
    return parse_sshd_T(out)["permitrootlogin"]


def assert_admin_login_works(target: Target) -> None:
    """A NEW admin connection logs in and uses sudo."""
    conn = connect(target.host)
    try:
        result = conn.run(["sudo", "-n", "id", "-u"])
        assert result.exited == 0 and result.stdout.strip() == "0", result.stderr
    finally:
        conn.close()


def key_line(target: Target, command: str = FORCED, addr: str | None = None) -> bytes:
    """The backup key's line; from= the backup host's address as the server sees it
    (``addr``, else asked) unless the inventory says ``from: any`` or a pattern."""
    key_type, blob = Path(target.host.backup_pubkey).read_text().split()[:2]
    if target.host.from_ == "any":
        from_ = ""
    else:
        from_ = f'from="{target.host.from_ or addr or client_addr(target)}",'
    return (f'restrict,command="{command}",{from_}no-port-forwarding,no-agent-forwarding,'
            f"no-X11-forwarding,no-pty {key_type} {blob} pullback-backup").encode()


def step_lines(stdout: str, name: str) -> dict[str, str]:
    """`NAME  step  state` lines of the CLI output -> {step: state}."""
    steps = {}
    for line in stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[0] == name and not fields[1].startswith("failed"):
            steps[fields[1]] = fields[2]
    return steps


def key_options(target: Target) -> list[str]:
    """The backup key only, the pinned host key only, no prompts."""
    return ["-F", "/dev/null", "-i", str(target.key),
            "-o", f"UserKnownHostsFile={target.host.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10"]


def ssh_argv(target: Target, *options: str) -> list[str]:
    return ["ssh", *key_options(target), "-p", str(target.lab.port), *options]


def admin_argv(lab_env: Lab, target: Target, *options: str) -> list[str]:
    return ["ssh", "-F", str(lab_env.ssh_config([target.lab])), *options, target.name]


def rsync_e(target: Target) -> str:
    return shlex.join(ssh_argv(target))


def local(argv: list[str], input: bytes = b"", timeout: float = 30,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False,
                          env=env or NO_AGENT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_until(sock: socket.socket, marker: bytes, seconds: float = 5) -> bytes:
    data = b""
    deadline = time.monotonic() + seconds
    while marker not in data and time.monotonic() < deadline:
        try:
            chunk = sock.recv(256)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def through_tunnel(argv: list[str], port: int, socks: bool = False) -> tuple[bytes, bytes]:
    """Start ``ssh -N`` with a local or dynamic forward on ``port``, open a connection through
    it to the server's own sshd (127.0.0.1:22 inside); return what came back (a working
    tunnel returns sshd's banner) and ssh's stderr."""
    data = b""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=NO_AGENT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                break  # ssh gave up: no tunnel at all
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "ssh never listened on the forward port"
                time.sleep(0.1)
        if proc.returncode is None:
            with sock:
                sock.settimeout(5)
                if socks:
                    sock.sendall(b"\x05\x01\x00")
                    if _read_until(sock, b"\x05\x00", 5) == b"\x05\x00":
                        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                                     + (22).to_bytes(2, "big"))
                        data = _read_until(sock, b"SSH-")
                else:
                    data = _read_until(sock, b"SSH-")
    finally:
        proc.kill()  # ssh -N sometimes sits out SIGTERM for seconds; it holds no state
        _, stderr = proc.communicate(timeout=10)
    return data, stderr


def read_line(stream, seconds: float = 15) -> bytes:
    data = b""
    deadline = time.monotonic() + seconds
    fd = stream.fileno()
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line within {seconds}s: {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
    return data


# --- a host set up once through the CLI, for the read-only daemon-mode tests ------------------


@dataclass
class SetUp:
    target: Target
    cli: subprocess.CompletedProcess
    addr: str


@pytest.fixture(scope="module")
def set_up(lab_env: Lab) -> Iterator[SetUp]:
    lab_host = lab_env.start("setup")
    try:
        target = make_target(lab_env, lab_host)
        result = invoke("setup-remote", "--inventory", str(target.inventory))
        yield SetUp(target, result, client_addr(target))
    finally:
        lab_env.remove(lab_host)


def test_cli_sets_up_a_fresh_host(set_up: SetUp):
    result = set_up.cli
    assert result.returncode == 0, result.stdout + result.stderr
    assert step_lines(result.stdout, set_up.target.name) == {
        "sshd_config": "changed", "authorized_keys": "changed", "rsyncd.conf": "changed",
        "action": "reloaded sshd",
    }
    assert "failed" not in result.stdout


def test_end_state_with_testinfra(lab_env: Lab, set_up: SetUp):
    target, addr = set_up.target, set_up.addr
    host = infra_host(lab_env, target.lab)
    settings = host.check_output("sshd -T -C user=root,host=%s,addr=%s", addr, addr)
    assert "permitrootlogin forced-commands-only" in settings.splitlines()
    root_ssh = host.file(ROOT_SSH)
    assert root_ssh.is_directory
    assert (root_ssh.mode, root_ssh.user, root_ssh.group) == (0o700, "root", "root")
    authorized = host.file(AUTHORIZED_KEYS)
    assert (authorized.mode, authorized.user, authorized.group) == (0o600, "root", "root")
    assert authorized.content == key_line(target, addr=addr) + b"\n"
    assert f'",from="{addr}",no-port-forwarding'.encode() in authorized.content
    conf = host.file(PULLBACK_RSYNCD_CONF)
    assert (conf.mode, conf.user, conf.group) == (0o600, "root", "root")
    assert conf.content == expected_rsyncd(addr)
    folder = host.file(PULLBACK_DIR)
    assert (folder.mode, folder.user, folder.group) == (0o700, "root", "root")
    assert not host.file(RSYNCD_CONF).exists  # the shared file is never written
    assert leftovers(target.lab) == [SSHD_CONFIG + ".pullback-bak"]  # the one backup kept


def test_backup_key_pulls_in_daemon_mode(set_up: SetUp, tmp_path: Path):
    target = set_up.target
    dest = tmp_path / "pulled"
    result = local(["rsync", "-a", "-e", rsync_e(target), f"{ROOT_AT}::system/etc/ssh/",
                    f"{dest}/"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert (dest / "sshd_config").read_bytes() == read(target.lab, SSHD_CONFIG)
    # A root-only file: the daemon really reads as uid 0.
    private = "/etc/ssh/ssh_host_ed25519_key"
    assert (dest / "ssh_host_ed25519_key").read_bytes() == read(target.lab, private)


def in_container_login(lab_host: lab.LabHost, key: Path) -> subprocess.CompletedProcess:
    """The backup key used from INSIDE the server (ssh to its own 127.0.0.1): another
    source address than the backup host's, the one a stolen key would come from."""
    secret = "/tmp/pullback-stolen-key"
    write(lab_host, secret, key.read_bytes(), mode="0600")
    try:
        return lab.engine(
            "exec", lab_host.name, "timeout", "20", "ssh", "-F", "/dev/null", "-i", secret,
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-n", "-p", "22",
            "root@127.0.0.1", check=False, timeout=60)
    finally:
        sh(lab_host, f"rm -f {secret}")


def test_backup_key_only_works_from_the_backup_hosts_address(set_up: SetUp):
    """No `from` in the inventory: from="ADDR" (setup-remote's own view of this machine);
    the same key from another address (the server's own 127.0.0.1) is refused by sshd."""
    target, addr = set_up.target, set_up.addr
    assert addr != "127.0.0.1"  # the lab's server sees this machine from outside
    assert f'from="{addr}"'.encode() in read(target.lab, AUTHORIZED_KEYS)
    stolen = in_container_login(target.lab, target.key)
    assert stolen.returncode == 255, stolen
    assert b"Permission denied (publickey" in stolen.stderr, stolen.stderr
    assert b"@RSYNCD" not in stolen.stdout


def test_from_any_leaves_no_from_and_no_hosts_allow(lab_env: Lab, fresh_host: lab.LabHost,
                                                    tmp_path: Path):
    """`from: any` opts out: no from= on the line, no `hosts allow` in the module; the key
    then reaches the forced command from anywhere (the control for the refusal above)."""
    target = make_target(lab_env, fresh_host, defaults={"from": "any"})
    result = invoke("setup-remote", "--inventory", str(target.inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    content = read(fresh_host, AUTHORIZED_KEYS)
    assert content == key_line(target) + b"\n" and b"from=" not in content
    assert b"hosts allow" not in read(fresh_host, PULLBACK_RSYNCD_CONF)
    anywhere = in_container_login(fresh_host, target.key)
    assert anywhere.stdout.startswith(b"@RSYNCD: "), anywhere  # the daemon's greeting
    pulled = pull(target, "-a", f"{ROOT_AT}::system/etc/ssh/", f"{tmp_path}/")
    assert pulled.returncode == 0, pulled.stderr
    # Back to the default: from= this machine again, and the module admits it alone.
    default = make_target(lab_env, fresh_host)
    again = invoke("setup-remote", "--inventory", str(default.inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    addr = client_addr(default)
    assert read(fresh_host, AUTHORIZED_KEYS) == key_line(default, addr=addr) + b"\n"
    assert read(fresh_host, PULLBACK_RSYNCD_CONF) == expected_rsyncd(addr)
    assert in_container_login(fresh_host, default.key).returncode == 255
    pulled = pull(default, "-a", f"{ROOT_AT}::system/etc/ssh/", f"{tmp_path}/again/")
    assert pulled.returncode == 0, pulled.stderr


def test_backup_key_runs_no_shell_command(set_up: SetUp):
    target = set_up.target
    result = local(ssh_argv(target) + [ROOT_AT, "id; touch /tmp/pwned-by-shell"])
    assert b"uid=0" not in result.stdout
    assert result.stdout.startswith(b"@RSYNCD:")  # the forced command ran instead
    assert read(target.lab, "/tmp/pwned-by-shell") is None


def test_backup_key_gets_no_pty(lab_env: Lab, set_up: SetUp):
    target = set_up.target
    control = local(admin_argv(lab_env, target, "-tt") + ["tty"])  # the admin gets a pty
    assert control.returncode == 0 and control.stdout.startswith(b"/dev/pts/"), control
    refused = local(ssh_argv(target, "-tt") + [ROOT_AT, "tty"])
    assert refused.returncode != 0
    assert b"PTY allocation request failed" in refused.stderr, refused.stderr
    assert b"/dev/pts" not in refused.stdout


def test_backup_key_forwards_no_agent(lab_env: Lab, set_up: SetUp, tmp_path: Path):
    target = set_up.target
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if agent_sock.exists():
                break
            time.sleep(0.05)
        env = {**NO_AGENT, "SSH_AUTH_SOCK": str(agent_sock)}
        proc = subprocess.Popen(ssh_argv(target, "-A") + [ROOT_AT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            assert read_line(proc.stdout).startswith(b"@RSYNCD:")
            # The forced rsync daemon runs now: look at its session from inside.
            seen = sh(target.lab, r"""
for p in $(pgrep -x rsync); do
  printf 'PID %s\n' "$p"; tr '\0' '\n' < /proc/$p/environ | grep '^SSH_' || true
done
ls -d /tmp/ssh-* 2>/dev/null || true""")
        finally:
            try:
                proc.communicate(timeout=15)  # closes stdin: the daemon ends
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        # Control (after, so its socket cannot be mistaken): the admin does get the agent.
        control = local(admin_argv(lab_env, target, "-A") + ['printf %s "$SSH_AUTH_SOCK"'],
                        env=env)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    assert "PID " in seen and "SSH_CONNECTION=" in seen, seen
    assert "SSH_AUTH_SOCK" not in seen and "/tmp/ssh-" not in seen, seen
    assert control.stdout.startswith(b"/tmp/ssh-"), control


def test_backup_key_forwards_no_ports(lab_env: Lab, set_up: SetUp):
    target = set_up.target
    # Control: the admin's login can tunnel to the server's own sshd (-L and -D).
    port = free_port()
    data, _ = through_tunnel(
        admin_argv(lab_env, target, "-N", "-L", f"127.0.0.1:{port}:127.0.0.1:22"), port)
    assert data.startswith(b"SSH-")
    port = free_port()
    data, _ = through_tunnel(
        admin_argv(lab_env, target, "-N", "-D", f"127.0.0.1:{port}"), port, socks=True)
    assert b"SSH-" in data

    strict = ("-N", "-o", "ExitOnForwardFailure=yes")
    port = free_port()
    data, stderr = through_tunnel(
        ssh_argv(target, *strict, "-L", f"127.0.0.1:{port}:127.0.0.1:22") + [ROOT_AT], port)
    assert b"SSH-" not in data
    assert b"administratively prohibited" in stderr, stderr
    port = free_port()
    data, stderr = through_tunnel(
        ssh_argv(target, *strict, "-D", f"127.0.0.1:{port}") + [ROOT_AT], port, socks=True)
    assert b"SSH-" not in data
    assert b"administratively prohibited" in stderr, stderr
    remote = local(ssh_argv(target, *strict, "-R", f"127.0.0.1:{free_port()}:127.0.0.1:22")
                   + [ROOT_AT])
    assert remote.returncode != 0
    assert b"remote port forwarding failed" in remote.stderr, remote.stderr


def test_backup_key_cannot_use_sftp_or_scp(set_up: SetUp, tmp_path: Path):
    target = set_up.target
    common = [*key_options(target), "-P", str(target.lab.port)]  # sftp/scp: -P is the port
    # What the client gets instead is the forced rsync daemon's greeting: an SFTP client
    # reads its first bytes "@RSY" as a packet length.
    greeting = (str(int.from_bytes(b"@RSY", "big")).encode(), b"@RSYNCD:")
    sftp = local(["sftp", "-b", "-", *common, ROOT_AT], input=b"ls /\nget /etc/hostname\n")
    assert sftp.returncode != 0
    assert b"/etc" not in sftp.stdout
    assert greeting[0] in sftp.stderr, sftp.stderr
    planted = tmp_path / "planted"
    planted.write_text("x\n")
    for mode in ([], ["-O"]):  # the SFTP protocol (the default) and the legacy scp protocol
        copied = tmp_path / f"hostname{len(mode)}"
        down = local(["scp", *mode, *common, f"{ROOT_AT}:/etc/hostname", str(copied)])
        assert down.returncode != 0 and not copied.exists()
        up = local(["scp", *mode, *common, str(planted), f"{ROOT_AT}:/tmp/scp-planted"])
        assert up.returncode != 0
        for result in (down, up):
            # The daemon's greeting, or the session closed before scp read it: either way the
            # forced command ran instead of scp's server, and nothing was copied (above).
            assert any(g in result.stderr for g in greeting) or \
                result.stderr.strip() == b"lost connection", result.stderr
    assert read(target.lab, "/tmp/scp-planted") is None


def test_backup_key_cannot_write_to_the_server(lab_env: Lab, set_up: SetUp, tmp_path: Path):
    target = set_up.target
    payload = tmp_path / "x"
    payload.write_text("written by the backup key\n")
    push = local(["rsync", "-e", rsync_e(target), str(payload), f"{ROOT_AT}::system/tmp/x"],
                 timeout=60)
    assert push.returncode != 0
    # The daemon's "ERROR: module is read only" can be lost when it closes the channel
    # before the client reads it (seen once in CI): the exit code and the absent file
    # are what prove the refusal; the message, when it arrives, must be that one.
    assert not push.stderr or b"read only" in push.stderr, push.stderr
    assert not infra_host(lab_env, target.lab).file("/tmp/x").exists


def pull(target: Target, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """rsync with the backup key; retried while the previous connection's daemon still
    holds the module's lock (max connections = 1: it exits just after its client)."""
    for _ in range(20):
        result = local(["rsync", "-e", rsync_e(target), *args], timeout=timeout)
        if b"max connections" not in result.stderr:
            return result
        time.sleep(0.5)
    return result


def test_backup_key_pulls_with_the_default_options(set_up: SetUp, tmp_path: Path):
    # The module refuses delete* and more: what a pull with the default options sends
    # (--delete stays on the receiving side) must pass.
    result = pull(set_up.target, "-avzx", "--numeric-ids", "--delete", "--progress",
                  f"{ROOT_AT}::system/etc/ssh/", f"{tmp_path}/")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sshd_config").read_bytes() == read(set_up.target.lab, SSHD_CONFIG)


def test_backup_key_cannot_delete_through_the_daemon(set_up: SetUp, tmp_path: Path):
    target = set_up.target
    sh(target.lab, "mkdir -p /tmp/victim && echo keep > /tmp/victim/a")
    try:
        for option in ("--remove-source-files", "--remove-sent-files"):
            taken = pull(target, "-a", option, f"{ROOT_AT}::system/tmp/victim/",
                         f"{tmp_path}/{option}/")
            assert taken.returncode != 0
            assert b"The server is configured to refuse --remove-s" in taken.stderr, \
                taken.stderr
            assert read(target.lab, "/tmp/victim/a") == b"keep\n"
        empty = tmp_path / "empty"
        empty.mkdir()
        for option in ("--delete", "--delete-after", "--delete-excluded"):
            push = pull(target, "-r", option, f"{empty}/", f"{ROOT_AT}::system/tmp/victim/")
            assert push.returncode != 0
            assert b"refuse --delete" in push.stderr or b"read only" in push.stderr or \
                not push.stderr, push.stderr
            assert read(target.lab, "/tmp/victim/a") == b"keep\n"
    finally:
        sh(target.lab, "rm -rf /tmp/victim")


def test_backup_key_reaches_no_other_module(set_up: SetUp, tmp_path: Path):
    # Another module in the shared /etc/rsyncd.conf (an operator's own daemon): the old
    # forced command read that file, so the backup key reached it; ours does not.
    target = set_up.target
    write(target.lab, RSYNCD_CONF, b"[www]\n    path = /etc\n    uid = 0\n")
    try:
        other = pull(target, f"{ROOT_AT}::www/hostname", f"{tmp_path}/hostname")
        listing = pull(target, f"{ROOT_AT}::")
    finally:
        sh(target.lab, f"rm -f {RSYNCD_CONF}")
    assert other.returncode != 0 and not (tmp_path / "hostname").exists()
    assert b"Unknown module 'www'" in other.stderr, other.stderr
    assert b"www" not in listing.stdout and b"system" not in listing.stdout, listing


def test_second_run_changes_nothing_and_does_not_reload(set_up: SetUp):
    target = set_up.target
    paths = (*WATCHED, SSHD_CONFIG + ".pullback-bak")
    before = snapshot(target.lab, paths)
    pid, started = listener(target.lab)
    hups = sighups(target.lab)
    outcome = setup.setup_host(target.host)
    assert outcome.error is None
    assert outcome.steps == {"sshd_config": "ok", "authorized_keys": "ok", "rsyncd.conf": "ok"}
    assert outcome.actions == () and outcome.diffs == ()
    assert snapshot(target.lab, paths) == before
    assert listener(target.lab) == (pid, started)
    assert sighups(target.lab) == hups == 1  # the first run's reload only


# --- dry run ------------------------------------------------------------------------------------


def test_dry_run_prints_diffs_and_changes_nothing(lab_env: Lab, fresh_host: lab.LabHost):
    target = make_target(lab_env, fresh_host)
    before = snapshot(fresh_host)
    result = invoke("setup-remote", "--inventory", str(target.inventory), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "--- a/etc/ssh/sshd_config\n+++ b/etc/ssh/sshd_config\n" in out
    assert f" {STOCK_DEFAULT.decode()}+{FCO_LINE.decode()}" in out
    line = key_line(target).decode()
    assert f"--- /dev/null\n+++ b/root/.ssh/authorized_keys\n@@ -0,0 +1 @@\n+{line}\n" in out
    wanted = expected_rsyncd(client_addr(target)).decode()
    expected_conf = "".join("+" + ln for ln in wanted.splitlines(True))
    assert (f"--- /dev/null\n+++ b/etc/pullback/rsyncd.conf\n@@ -0,0 +1,16 @@\n{expected_conf}"
            in out)
    assert "b/etc/rsyncd.conf" not in out  # the shared file is never written
    assert step_lines(out, target.name) == {
        "sshd_config": "would change", "authorized_keys": "would change",
        "rsyncd.conf": "would change", "action": "would reload sshd",
    }
    after = snapshot(fresh_host)
    assert after == before
    assert after[ROOT_SSH] == after[AUTHORIZED_KEYS] == after[RSYNCD_CONF] == "missing"
    assert after[PULLBACK_DIR] == after[PULLBACK_RSYNCD_CONF] == "missing"
    assert leftovers(fresh_host) == []
    assert sighups(fresh_host) == 0


# --- sshd_config variants -------------------------------------------------------------------


def _replace(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(content: bytes) -> bytes:
        assert content.count(old) == 1
        return content.replace(old, new)
    return edit


ADD_AFTER_DEFAULT = _replace(STOCK_DEFAULT, STOCK_DEFAULT + FCO_LINE)
CRLF = STOCK_DEFAULT.replace(b"\n", b"\r\n")

# name -> (preparation as root, the file setup must edit, expected edit of that file)
VARIANTS: dict[str, tuple[str, str, Callable[[bytes], bytes]]] = {
    "active-yes": (
        "sed -i 's/^#PermitRootLogin prohibit-password$/PermitRootLogin yes/' /etc/ssh/sshd_config",
        SSHD_CONFIG, _replace(b"\nPermitRootLogin yes\n", b"\n" + FCO_LINE)),
    "commented-default": (":", SSHD_CONFIG, ADD_AFTER_DEFAULT),
    "match-block-only": (
        "printf 'Match User nobody\\n  PermitRootLogin yes\\n' >> /etc/ssh/sshd_config",
        SSHD_CONFIG, ADD_AFTER_DEFAULT),
    "drop-in": (
        f"printf 'PermitRootLogin yes\\n' > {DROP_IN}", DROP_IN,
        _replace(b"PermitRootLogin yes\n", FCO_LINE)),
    "crlf": ("sed -i 's/$/\\r/' /etc/ssh/sshd_config", SSHD_CONFIG,
             _replace(CRLF, CRLF + FCO_LINE.replace(b"\n", b"\r\n"))),
    "crlf-with-drop-in": (
        f"sed -i 's/$/\\r/' /etc/ssh/sshd_config && printf 'PermitRootLogin yes\\n' > {DROP_IN}",
        DROP_IN, _replace(b"PermitRootLogin yes\n", FCO_LINE)),
    "no-final-newline": (
        "printf '%s' \"$(cat /etc/ssh/sshd_config)\" > /etc/ssh/sshd_config.tmp && "
        "mv /etc/ssh/sshd_config.tmp /etc/ssh/sshd_config", SSHD_CONFIG, ADD_AFTER_DEFAULT),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sshd_config_variant(lab_env: Lab, fresh_host: lab.LabHost, variant: str):
    prepare, edited, edit = VARIANTS[variant]
    sh(fresh_host, prepare)
    target = make_target(lab_env, fresh_host)
    originals = {path: read(fresh_host, path) for path in (SSHD_CONFIG, DROP_IN)}
    assert originals[SSHD_CONFIG] is not None
    if variant == "no-final-newline":
        assert not originals[SSHD_CONFIG].endswith(b"\n")
    addr = client_addr(target)

    outcome = setup.setup_host(target.host)
    assert outcome.error is None, outcome
    assert outcome.steps["sshd_config"] == "changed"
    assert outcome.actions == ("reloaded sshd",)
    for path, old in originals.items():
        expected = edit(old) if path == edited else old
        assert read(fresh_host, path) == expected, path
    if variant == "no-final-newline":
        assert not read(fresh_host, SSHD_CONFIG).endswith(b"\n")
    if variant == "match-block-only":
        assert any("Match User nobody" in w for w in outcome.warnings), outcome.warnings
    assert effective(fresh_host, addr) == WANT
    assert sighups(fresh_host) == 1
    assert_admin_login_works(target)


# --- lockout faults ---------------------------------------------------------------------------


def assert_unchanged(target: Target, before: dict[str, str], hups: int = 0) -> None:
    assert snapshot(target.lab) == before
    assert leftovers(target.lab) == []
    assert sighups(target.lab) == hups
    assert_admin_login_works(target)


def test_fault_invalid_sshd_config_fails_cleanly_through_cli(lab_env: Lab,
                                                             fresh_host: lab.LabHost):
    # An edit on disk that was never reloaded: sshd -T (gather) and sshd -t both reject it.
    sh(fresh_host, "printf 'NoSuchDirective yes\\n' >> /etc/ssh/sshd_config")
    target = make_target(lab_env, fresh_host)
    before = snapshot(fresh_host)
    result = invoke("setup-remote", "--inventory", str(target.inventory))
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [ln for ln in result.stdout.splitlines() if "failed:" in ln]
    assert len(failed) == 1 and failed[0].startswith(target.name), result.stdout
    assert "sshd -T fails" in failed[0] or "sshd -t rejects" in failed[0]
    assert "NoSuchDirective" in failed[0]
    assert_unchanged(target, before)


def _gather_and_plan(target: Target):
    conn = connect(target.host)
    facts = gather(conn, [target.host.rsync.remote_binary])
    forced, _ = setup.daemon_command(facts, target.host)
    public_key = setup.read_public_key(target.host)
    return conn, setup.plan_setup(facts, target.host, public_key, forced)


def test_fault_candidate_rejected_by_sshd_t(lab_env: Lab, fresh_host: lab.LabHost):
    target = make_target(lab_env, fresh_host)
    before = snapshot(fresh_host)
    conn, plan = _gather_and_plan(target)
    try:
        broken = tuple(
            dataclasses.replace(c, new=c.new + b"NoSuchDirective yes\n")
            if c.step == "sshd_config" else c
            for c in plan.changes)
        outcome = transaction.apply(conn, dataclasses.replace(plan, changes=broken))
    finally:
        conn.close()
    assert outcome.error is not None
    assert outcome.error.startswith(f"sshd -t rejects the new {SSHD_CONFIG}")
    assert "NoSuchDirective" in outcome.error and "nothing changed" in outcome.error
    assert_unchanged(target, before)


def test_fault_new_login_fails_after_reload_rolls_back(lab_env: Lab, fresh_host: lab.LabHost):
    target = make_target(lab_env, fresh_host)
    addr = client_addr(target)
    original = effective(fresh_host, addr)
    assert original != WANT
    before = snapshot(fresh_host)
    seen: list[str] = []

    def login_fails(session: Session, plan: transaction.SetupPlan) -> None:
        seen.append(effective(fresh_host, addr))  # the edit was live when the check ran
        raise transaction.SetupError("simulated: a new admin login fails")

    outcome = setup.setup_host(target.host, check_login=login_fails)
    assert seen == [WANT]
    assert outcome.error == "simulated: a new admin login fails; restored and reloaded"
    assert effective(fresh_host, addr) == original
    assert_unchanged(target, before, hups=2)  # the reload, then the reload after restoring


def test_which_failed_logins_the_lockout_check_tries_again(lab_env: Lab,
                                                          shared_host: lab.LabHost):
    # Against real sshd: a refused connection may pass (sshd restarting); a failed
    # authentication or a host key that does not match will not.
    host = make_target(lab_env, shared_host).host
    with pytest.raises(ConnectError) as refused:
        connect(dataclasses.replace(host, port=closed_port()))
    with pytest.raises(ConnectError) as unknown_user:
        connect(dataclasses.replace(host, admin_user="nobody-here"))
    with pytest.raises(ConnectError) as wrong_key:
        connect(dataclasses.replace(host, admin_key=host.backup_key))
    assert [e.value.passing for e in (refused, unknown_user, wrong_key)] == [True, False, False]
    assert "Authentication failed" in str(wrong_key.value)


def test_a_real_lockout_is_rolled_back_at_the_first_failed_login(lab_env: Lab,
                                                                   fresh_host: lab.LabHost):
    # Root as the admin, by its own key: the inventory refuses `admin_user: root` for this
    # very reason, so the spec is made by hand. Once PermitRootLogin is forced-commands-only
    # root's key without a forced command no longer logs in: the lockout check's real new
    # login fails to authenticate, and setup-remote must roll back over the first session at
    # once (an authentication failure is not tried again: each try is one more failure in
    # the server's per-source penalties).
    target = make_target(lab_env, fresh_host)
    addr = client_addr(target)
    admin_pub = Path(f"{target.host.admin_key}.pub").read_bytes()
    sh(fresh_host, 'mkdir -p -m 700 /root/.ssh && cat >> /root/.ssh/authorized_keys && '
                   'chmod 600 /root/.ssh/authorized_keys', input=admin_pub)
    as_root = dataclasses.replace(target.host, admin_user="root")
    with connect(as_root) as session:  # root logs in with the admin key before
        assert session.run(["id", "-u"]).stdout.strip() == "0"
    original = effective(fresh_host, addr)
    before = snapshot(fresh_host)
    outcome = setup.setup_host(as_root)
    assert outcome.error is not None
    # sshd refuses the login (paramiko: "Authentication failed"), or, seen with OpenSSH 9.2,
    # its monitor ends the session it had let begin ("unexpected authentication"): both are
    # the lockout, and both roll back.
    assert outcome.error.startswith(("a new admin login fails after the reload: ",
                                     "the new admin login was cut off: ")), outcome.error
    assert outcome.error.endswith("; restored and reloaded"), outcome.error
    log = lab.engine("logs", fresh_host.name)
    refused = (log.stdout + log.stderr).decode(errors="replace").count("ROOT LOGIN REFUSED")
    assert refused == 1  # one failed login, not tried again (a refusal while sshd restarts is)
    assert effective(fresh_host, addr) == original
    assert_unchanged(target, before, hups=2)
    with connect(as_root) as session:  # and root logs in with it again
        assert session.run(["id", "-u"]).stdout.strip() == "0"


def test_a_lockout_already_on_disk_is_reported_after_the_rollback(lab_env: Lab,
                                                                  fresh_host: lab.LabHost):
    # Someone added `DenyUsers admin` to sshd_config and never reloaded: setup-remote's reload
    # makes it live, the lockout check fails and the files are put back, and the files as
    # they were still lock the admin out. The report must say so, not "restored".
    target = make_target(lab_env, fresh_host)
    sh(fresh_host, "printf 'DenyUsers %s\\n' \"$1\" >> /etc/ssh/sshd_config",
       target.host.admin_user)
    before = snapshot(fresh_host)
    outcome = setup.setup_host(target.host)
    assert outcome.error is not None
    assert outcome.error.startswith("a new admin login fails after the reload: "), outcome.error
    assert "; restored and reloaded, but NEW ADMIN LOGINS STILL FAIL (" in outcome.error
    assert outcome.error.endswith("fix it from a console or a session that is still open")
    assert snapshot(fresh_host) == before and leftovers(fresh_host) == []
    with pytest.raises(ConnectError):
        connect(target.host)


def test_fault_midway_staging_failure_leaves_nothing(lab_env: Lab, fresh_host: lab.LabHost):
    # rsyncd.conf and authorized_keys are staged first; the sshd_config candidate then
    # cannot be written (a non-empty folder is in its way).
    target = make_target(lab_env, fresh_host)
    before = snapshot(fresh_host)
    fail_while_staging(target)
    assert_unchanged(target, before)


def fail_while_staging(target: Target) -> None:
    """A setup run whose sshd_config candidate cannot be written (a folder is in its way)."""
    sh(target.lab, "mkdir /etc/ssh/sshd_config.pullback-new && "
                   "touch /etc/ssh/sshd_config.pullback-new/blocker")
    outcome = setup.setup_host(target.host)
    assert outcome.error == f"cannot write {SSHD_CONFIG}; nothing changed"
    sh(target.lab, "rm -r /etc/ssh/sshd_config.pullback-new")


def test_fault_after_replacing_every_file_restores_them(lab_env: Lab, fresh_host: lab.LabHost):
    # A Match block for the backup host's address keeps PermitRootLogin yes: all three files
    # are replaced, then the sshd -T check fails and every one must be put back.
    target = make_target(lab_env, fresh_host)
    addr = client_addr(target)
    sh(fresh_host, 'printf "Match Address %s\\n    PermitRootLogin yes\\n" "$1" '
                   ">> /etc/ssh/sshd_config", addr)
    before = snapshot(fresh_host)
    outcome = setup.setup_host(target.host)
    assert outcome.error is not None
    assert outcome.error.startswith("after the edit sshd would still apply PermitRootLogin yes")
    assert outcome.error.endswith("; nothing changed")
    assert effective(fresh_host, addr) == "yes"
    assert_unchanged(target, before)


def test_fault_file_changed_between_read_and_write(lab_env: Lab, fresh_host: lab.LabHost):
    target = make_target(lab_env, fresh_host)
    conn, plan = _gather_and_plan(target)
    try:
        assert [c.step for c in plan.changes] == ["rsyncd.conf", "authorized_keys", "sshd_config"]
        sh(fresh_host, "printf '# edited by someone else\\n' >> /etc/ssh/sshd_config")
        before = snapshot(fresh_host)
        outcome = transaction.apply(conn, plan)
    finally:
        conn.close()
    assert outcome.error == (f"{SSHD_CONFIG} changed since it was read; run again; "
                             "nothing changed")
    assert_unchanged(target, before)


# --- existing files ---------------------------------------------------------------------------


def test_existing_keys_and_rsyncd_modules_are_preserved(lab_env: Lab, fresh_host: lab.LabHost,
                                                        tmp_path: Path):
    pubs = []
    for name in ("with-command", "without-command"):
        path = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        pubs.append(path.with_suffix(".pub").read_text().strip())
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "without-command")],
                                 capture_output=True, text=True, check=True).stdout.split()[1]
    old_keys = (f"# keys of the ops team\n"
                f'command="/usr/bin/uptime" {pubs[0]}\n'
                f"{pubs[1]}\n").encode()
    old_conf = (b"log file = /var/log/rsyncd.log\n\n"
                b"[www]\n    path = /var/www\n    read only = yes\n")
    sh(fresh_host, "install -d -m 0700 -o 0 -g 0 /root/.ssh")
    write(fresh_host, AUTHORIZED_KEYS, old_keys, "0600")
    write(fresh_host, RSYNCD_CONF, old_conf, "0644")
    target = make_target(lab_env, fresh_host)

    outcome = setup.setup_host(target.host)
    assert outcome.error is None, outcome
    assert read(fresh_host, AUTHORIZED_KEYS) == old_keys + key_line(target) + b"\n"
    assert read(fresh_host, RSYNCD_CONF) == old_conf  # not ours: never written
    assert read(fresh_host, PULLBACK_RSYNCD_CONF) == expected_rsyncd(client_addr(target))
    unrestricted = [w for w in outcome.warnings if "without command=" in w]
    assert len(unrestricted) == 1
    assert fingerprint in unrestricted[0] and "without-command" in unrestricted[0]
    assert "with-command" not in unrestricted[0].replace("without-command", "")

    again = setup.setup_host(target.host)
    assert again.error is None
    assert again.steps == {"sshd_config": "ok", "authorized_keys": "ok", "rsyncd.conf": "ok"}
    content = read(fresh_host, AUTHORIZED_KEYS)
    assert content == old_keys + key_line(target) + b"\n"
    assert content.count(key_line(target).split()[-2]) == 1  # the blob, once
    assert read(fresh_host, RSYNCD_CONF) == old_conf


# --- no rsync daemon on the host serves / ---------------------------------------------------


def start_daemon(lab_host: lab.LabHost, port: int, *options: str) -> None:
    """A real rsync daemon as root inside the container (as Debian's rsync.service runs
    it), listening on ``port`` inside only; it goes with the container."""
    sh(lab_host, f"rsync --daemon --port={port} {shlex.join(options)}")


def steal_shadow(lab_host: lab.LabHost, port: int) -> subprocess.CompletedProcess:
    """The attack: an anonymous read of /etc/shadow through module [system], from inside."""
    return lab.engine("exec", lab_host.name, "rsync", f"rsync://127.0.0.1:{port}/system/etc/shadow",
                      "/tmp/stolen", check=False, timeout=60)


def test_no_daemon_serves_the_module_before_or_after(lab_env: Lab, fresh_host: lab.LabHost,
                                                     tmp_path: Path):
    # An operator's own daemon, with its own module, already running on the host.
    write(fresh_host, RSYNCD_CONF, b"[pub]\n    path = /srv\n    read only = yes\n")
    start_daemon(fresh_host, 8873)
    before = steal_shadow(fresh_host, 8873)
    assert before.returncode != 0 and b"Unknown module 'system'" in before.stderr, before

    target = make_target(lab_env, fresh_host)
    outcome = setup.setup_host(target.host)
    assert outcome.error is None, outcome
    after = steal_shadow(fresh_host, 8873)  # the daemon reads its file at each connection
    assert after.returncode != 0 and b"Unknown module 'system'" in after.stderr, after
    assert read(fresh_host, "/tmp/stolen") is None
    # Even a daemon started on pullback's own file admits no one but the backup host.
    addr = client_addr(target)
    if addr != "127.0.0.1":
        start_daemon(fresh_host, 8874, f"--config={PULLBACK_RSYNCD_CONF}")
        own = steal_shadow(fresh_host, 8874)
        assert own.returncode != 0 and read(fresh_host, "/tmp/stolen") is None, own
    # ... while the backup key's daemon-over-ssh pull works.
    result = pull(target, f"{ROOT_AT}::system/etc/shadow", f"{tmp_path}/shadow")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shadow").read_bytes() == read(fresh_host, "/etc/shadow")


def test_migration_from_the_shared_rsyncd_conf(lab_env: Lab, fresh_host: lab.LabHost,
                                               tmp_path: Path):
    # A host set up by the previous version: its module appended to an operator's
    # /etc/rsyncd.conf (globals, comments with CRLF, another module), as the old code did.
    others = (b"# the ops team's rsync daemon\r\n"
              b"pid file = /run/rsyncd-ops.pid\n"
              b"max verbosity = 2\n"
              b"\n"
              b"; a public mirror\r\n"
              b"[pub]\n    path = /srv\n    read only = yes\n    comment = caf\xc3\xa9\n")
    write(fresh_host, RSYNCD_CONF, others + b"\n" + OLD_MODULE, "0640")
    start_daemon(fresh_host, 8875)
    # The hole this fixes: anyone on the host's port 873 reads /etc/shadow.
    before = steal_shadow(fresh_host, 8875)
    assert before.returncode == 0, before
    assert read(fresh_host, "/tmp/stolen") == read(fresh_host, "/etc/shadow")
    sh(fresh_host, "rm -f /tmp/stolen")

    target = make_target(lab_env, fresh_host)
    preview = setup.setup_host(target.host, dry_run=True)
    assert preview.steps["old rsyncd module"] == "would remove"
    (diff,) = [d for d in preview.diffs if d.startswith("--- a/etc/rsyncd.conf")]
    assert "-[system]\n" in diff and "-# managed by pullback\n" in diff
    outcome = setup.setup_host(target.host)
    assert outcome.error is None, outcome
    assert outcome.steps == {"sshd_config": "changed", "authorized_keys": "changed",
                             "rsyncd.conf": "changed", "old rsyncd module": "removed"}
    assert not [w for w in outcome.warnings if "rsyncd" in w], outcome.warnings
    host = infra_host(lab_env, fresh_host)
    shared = host.file(RSYNCD_CONF)
    assert shared.sha256sum == hashlib.sha256(others).hexdigest()  # the rest, byte for byte
    assert (shared.mode, shared.user, shared.group) == (0o640, "root", "root")
    own = host.file(PULLBACK_RSYNCD_CONF)
    assert (own.mode, own.user, own.group) == (0o600, "root", "root")
    assert own.content == expected_rsyncd(client_addr(target))
    after = steal_shadow(fresh_host, 8875)
    assert after.returncode != 0 and b"Unknown module 'system'" in after.stderr, after
    assert read(fresh_host, "/tmp/stolen") is None
    result = pull(target, f"{ROOT_AT}::system/etc/hostname", f"{tmp_path}/hostname")
    assert result.returncode == 0, result.stderr

    paths = (*WATCHED, RSYNCD_CONF + ".pullback-bak")
    before_again = snapshot(fresh_host, paths)
    again = setup.setup_host(target.host)
    assert again.error is None
    assert again.steps == {"sshd_config": "ok", "authorized_keys": "ok", "rsyncd.conf": "ok"}
    assert again.actions == () and again.diffs == ()
    assert snapshot(fresh_host, paths) == before_again


def test_migration_removes_a_file_that_held_only_the_old_module(lab_env: Lab,
                                                                fresh_host: lab.LabHost):
    # Without /etc/rsyncd.conf Debian's rsync.service does not start at all: pullback
    # created that file, so it goes (kept as .pullback-bak).
    write(fresh_host, RSYNCD_CONF, OLD_MODULE)
    target = make_target(lab_env, fresh_host)
    outcome = setup.setup_host(target.host)
    assert outcome.error is None, outcome
    assert outcome.steps["old rsyncd module"] == "removed"
    assert read(fresh_host, RSYNCD_CONF) is None
    assert read(fresh_host, RSYNCD_CONF + ".pullback-bak") == OLD_MODULE


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inventory_exits_2_and_touches_no_host(lab_env: Lab, shared_host: lab.LabHost):
    inventory = lab_env.inventory([shared_host])
    data = yaml.safe_load(inventory.read_text())
    data["hosts"]["bogus"] = {"address": "127.0.0.1", "port": 0}
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    keys.ensure_backup_key(Path(data["defaults"]["backup_key"]))
    before = snapshot(shared_host)
    hups = sighups(shared_host)
    result = invoke("setup-remote", "--inventory", str(inventory))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{inventory}:") and "hosts.bogus.port" in lines[0]
    assert snapshot(shared_host) == before
    assert sighups(shared_host) == hups


@pytest.mark.parametrize("fault", ["staging", "login"])
def test_fault_puts_back_the_mode_of_an_existing_root_ssh(lab_env: Lab, fresh_host: lab.LabHost,
                                                          fault: str):
    # /root/.ssh exists with another mode: the plan sets it to 0700, then a failure (in the
    # apply script, or the lockout check after it) must put 0755 back with the files.
    target = make_target(lab_env, fresh_host)
    sh(fresh_host, "mkdir -p /root/.ssh && chmod 0755 /root/.ssh")
    before = snapshot(fresh_host)
    assert before["/root/.ssh"] == "dir 755 0 0"
    if fault == "staging":
        fail_while_staging(target)
        assert_unchanged(target, before)
    else:
        def login_fails(session: Session, plan: transaction.SetupPlan) -> None:
            assert snapshot(fresh_host)["/root/.ssh"] == "dir 700 0 0"  # fixed meanwhile
            raise transaction.SetupError("simulated: a new admin login fails")

        outcome = setup.setup_host(target.host, check_login=login_fails)
        assert outcome.error == "simulated: a new admin login fails; restored and reloaded"
        assert_unchanged(target, before, hups=2)


def test_an_authorized_keys_larger_than_one_command_line(lab_env: Lab,
                                                        fresh_host: lab.LabHost):
    # 160 KB of other people's lines: the apply script carries the new file (base64), far
    # more than the 128 KiB Linux allows one argument. setup-remote sends it on the gather's
    # own session (standard input has no such limit); a root script of its own that long is
    # uploaded over SFTP, run and removed.
    from roles.remote.session import SCRIPT_ARG_MAX, Run

    target = make_target(lab_env, fresh_host)
    others = b"".join(b"# line %05d kept by setup-remote " % i + b"x" * 60 + b"\n"
                      for i in range(1700))
    assert len(others) > 1.5 * SCRIPT_ARG_MAX
    sh(fresh_host, "mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys && "
                   "chmod 600 /root/.ssh/authorized_keys", input=others)
    sessions = Run()
    outcome = setup.setup_host(target.host, sessions=sessions)
    assert outcome.error is None, outcome
    assert outcome.steps["authorized_keys"] == "changed"
    content = read(fresh_host, AUTHORIZED_KEYS)
    assert content.startswith(others) and content.count(b"\n") == 1701
    assert sessions.counters.round_trips == {target.name: 2}  # gather + apply, the check
    again = setup.setup_host(target.host)
    assert again.error is None and set(again.steps.values()) == {"ok"}
    assert read(fresh_host, AUTHORIZED_KEYS) == content

    script = "# " + "x" * SCRIPT_ARG_MAX + "\nid -u\n"
    with sessions.open(target.host) as session:
        result = session.sudo_script(script)
    assert result.exited == 0 and result.stdout.strip() == "0"
    assert sessions.counters.round_trips == {target.name: 4}  # + the upload and its run
    home = sh(fresh_host, "ls -A ~admin").split()
    assert not [n for n in home if n.startswith(".pullback-")], home  # the upload is gone


def test_a_script_cut_off_on_the_gathers_session_runs_nothing(lab_env: Lab,
                                                              fresh_host: lab.LabHost):
    """The one-session apply on a real host: the gather's root command runs the script it
    reads on standard input only once the whole brace group arrived. Cut off (a dropped
    connection), nothing of it runs; whole, it runs as root; none, nothing more runs."""
    from roles.core.render import render
    from roles.remote.facts import gather_then
    from roles.remote.session import Run

    target = make_target(lab_env, fresh_host)
    marker = "/root/pullback-cut-off-test"
    whole = render("scripts/block.sh.j2", script=f"touch {marker}\nid -u\n")
    with Run().open(target.host) as session:
        facts, exchange = gather_then(session, [target.host.rsync.remote_binary])
        assert facts.client_addr
        channel = exchange._channel
        channel.sendall(whole[: whole.index("id -u")].encode())  # the connection drops here
        channel.shutdown_write()
        assert channel.recv_exit_status() != 0
        exchange.close()
        assert read(fresh_host, marker) is None

        facts, exchange = gather_then(session, [target.host.rsync.remote_binary])
        reply = exchange.finish(f"touch {marker}\nid -u\n")
        assert (reply.exited, reply.stdout.strip()) == (0, "0")
        assert read(fresh_host, marker) == b""

        sh(fresh_host, f"rm {marker}")
        facts, exchange = gather_then(session, [target.host.rsync.remote_binary])
        assert exchange.finish(None).exited == 0
        assert read(fresh_host, marker) is None
