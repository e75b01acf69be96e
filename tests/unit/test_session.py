"""The Session's own logic: sudo -n or sudo -S, the SudoError texts, sudo_script's choice
between one command and an upload, the run's passwords and counters (a stand-in for Fabric's
connection records what would run; the real path is tested against lab hosts in
test_setup_remote and test_sudo_password)."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import paramiko
import pytest
from invoke.exceptions import AuthFailure, UnexpectedExit

from roles.remote import session as connection
from roles.remote.session import SCRIPT_ARG_MAX, Run, Session, SudoError, UploadError


class FakeFile:
    def __init__(self, store: dict, path: str) -> None:
        self.store, self.path = store, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def chmod(self, mode: int) -> None:
        self.store.setdefault("modes", []).append(mode)
        assert self.path not in self.store  # the mode is set before anything is written

    def write(self, data: bytes) -> None:
        self.store[self.path] = data


class FakeSftp:
    def __init__(self, fail: Exception | None = None) -> None:
        self.files: dict = {}
        self.removed: list[str] = []
        self.fail = fail

    def normalize(self, path: str) -> str:
        return "/home/admin"

    def open(self, path: str, mode: str) -> FakeFile:
        if self.fail:
            raise self.fail
        assert mode == "wx"  # O_EXCL: never through an existing file or link
        return FakeFile(self.files, path)

    def remove(self, path: str) -> None:
        self.removed.append(path)


class FakeConnection:
    """Fabric's Connection as the Session uses it: run, sudo, sftp, close."""

    def __init__(self, sftp: FakeSftp | None = None, *, exited: int = 0, stderr: str = "",
                 sudo_fails: bool = False) -> None:
        self._sftp = sftp or FakeSftp()
        self.commands: list[str] = []
        self.sudo_calls: list[tuple[str, str]] = []
        self.exited, self.stderr, self.sudo_fails = exited, stderr, sudo_fails
        self.closed = False

    def sftp(self) -> FakeSftp:
        return self._sftp

    def run(self, command: str, **kwargs):
        assert kwargs["hide"] is True and kwargs["in_stream"] is False  # never a terminal
        self.commands.append(command)
        return SimpleNamespace(exited=self.exited, stdout="", stderr=self.stderr,
                               command=command, encoding="utf-8", hide=(), pty=False)

    def sudo(self, command: str, *, password: str, **kwargs):
        self.sudo_calls.append((command, password))
        if self.sudo_fails:
            raise AuthFailure(result=None, prompt="[sudo] password: ")
        return SimpleNamespace(exited=0, stdout="", stderr="")

    def close(self) -> None:
        self.closed = True


HOST = SimpleNamespace(name="web1", admin_user="admin")


def session(conn: FakeConnection, password: str | None = None,
            run: Run | None = None) -> Session:
    return Session(HOST, conn, run or Run(ask=lambda prompt: pytest.fail("asked")), password)


def sudo_script(c: FakeConnection, script: str, **_: object):
    return session(c).sudo_script(script)


def test_a_short_script_is_one_command():
    c = FakeConnection(FakeSftp())
    sudo_script(c, "echo hi", host="web1")
    assert c.commands == [f"sudo -n sh -c {shlex.quote('echo hi')}"]


def test_without_a_password_root_commands_never_wait_for_one():
    c = FakeConnection()
    s = session(c)
    s.run(["id", "-u"], sudo=True)
    s.run("id -un")
    assert c.commands == ["sudo -n id -u", "id -un"] and c.sudo_calls == []


def test_a_sudo_that_wants_a_password_is_one_clear_error():
    c = FakeConnection(exited=1, stderr="sudo: a password is required\n")
    with pytest.raises(SudoError) as err:
        session(c).run("true", sudo=True)
    assert str(err.value) == ("web1: sudo as admin needs a password on this host: set "
                              "`sudo_password: true` for it in the inventory (asked once per "
                              "run), or allow NOPASSWD sudo for that user")


def test_a_failing_root_command_raises_only_when_asked():
    c = FakeConnection(exited=3)
    assert session(c).run("false", sudo=True).exited == 3
    with pytest.raises(UnexpectedExit):
        session(c).run("false", sudo=True, warn=False)


def test_a_stored_password_goes_to_sudo_on_stdin():
    c = FakeConnection()
    session(c, password="typed once").run(["id", "-u"], sudo=True)
    assert c.commands == [] and c.sudo_calls == [("id -u", "typed once")]


def test_a_rejected_password_is_forgotten_and_never_shown():
    typed: list[str] = []
    run = Run(ask=lambda prompt: typed.append(prompt) or "hunter2-typo")
    password = run.passwords.get("admin")
    c = FakeConnection(sudo_fails=True)
    with pytest.raises(SudoError) as err:
        session(c, password, run).run("true", sudo=True)
    assert str(err.value) == ("web1: sudo as admin rejected the password (wrong sudo "
                              "password); nothing ran as root")
    assert "hunter2" not in str(err.value)
    assert not run.passwords.remembers("admin")
    run.passwords.get("admin")
    assert typed == ["[sudo] password for admin: "] * 2  # asked again after the rejection


def test_passwords_are_asked_once_per_user_and_run():
    asked: list[str] = []
    first = Run(ask=lambda prompt: asked.append(prompt) or "pw")
    assert first.passwords.get("admin") == first.passwords.get("admin") == "pw"
    first.passwords.get("operator")
    second = Run(ask=lambda prompt: asked.append(prompt) or "other")
    assert second.passwords.get("admin") == "other"  # runs share nothing
    assert asked == ["[sudo] password for admin: ", "[sudo] password for operator: ",
                     "[sudo] password for admin: "]


def test_each_run_counts_its_own_round_trips():
    one, two = Run(), Run()
    s = session(FakeConnection(), run=one)
    s.run("true")
    s.sudo_script("echo hi")
    session(FakeConnection(), run=two).run("true")
    assert one.counters.round_trips == {"web1": 2} and two.counters.round_trips == {"web1": 1}


def test_a_session_closes_its_connection_as_a_context_manager():
    c = FakeConnection()
    with session(c) as s:
        s.run("true")
    assert c.closed


def test_a_long_script_is_uploaded_private_run_from_the_file_and_removed():
    sftp = FakeSftp()
    c = FakeConnection(sftp)
    script = "# " + "x" * SCRIPT_ARG_MAX + "\necho hi\n"
    sudo_script(c, script, host="web1")
    (path,) = [p for p in sftp.files if p != "modes"]
    assert path.startswith("/home/admin/.pullback-") and path.endswith(".sh")
    assert sftp.files[path] == script.encode() and sftp.files["modes"] == [0o600]
    assert c.commands == [f"sudo -n sh {path}"]
    assert sftp.removed == [path]


@pytest.mark.parametrize("error", [OSError(13, "Permission denied"),
                                   paramiko.SSHException("Channel closed.")])
def test_a_failed_upload_runs_nothing_as_root(error):
    c = FakeConnection(FakeSftp(fail=error))
    with pytest.raises(UploadError, match=r"^web1: the root script \(\d+ bytes\) is too long "
                       r"for one command and uploading it over SFTP failed: .+; nothing ran "
                       r"as root$"):
        sudo_script(c, "x" * (SCRIPT_ARG_MAX + 1), host="web1")
    assert c.commands == []
    assert isinstance(connection.UploadError("x"), RuntimeError)  # setup reports it per host


def test_a_failed_handshake_is_one_error_line_and_no_traceback(tmp_path):
    """A server that closes before its banner (sshd re-executing after a reload): connect
    raises ConnectError, and paramiko's thread prints no traceback to stderr."""
    import subprocess
    import sys
    from pathlib import Path

    probe = f"""
import socket, threading
from roles.remote import session as connection
from roles.inventory.schema import validate_host
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(5)
def serve():
    while True:
        c, _ = srv.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
host = validate_host({{"name": "web1", "address": "127.0.0.1", "port": srv.getsockname()[1],
                      "admin_user": "admin", "known_hosts": {str(tmp_path / "kh")!r},
                      "backup_key": {str(tmp_path / "key")!r}}})
try:
    connection.connect(host, timeout=3)
except connection.ConnectError as exc:
    print(exc)
"""
    (tmp_path / "kh").write_text("")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                            text=True, timeout=60, check=False)
    # paramiko may add the socket's error ("[Errno 104] Connection reset by peer").
    assert result.stdout.startswith("web1: Error reading SSH protocol banner")
    assert result.stdout.count("\n") == 1 and result.stderr == ""


def test_the_admin_socket_sends_small_packets_at_once():
    """connect() builds its paramiko Transport with Nagle's algorithm off (TCP_NODELAY)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    try:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        transport = connection._nodelay_transport(client)
        assert isinstance(transport, paramiko.Transport)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        transport.close()
    finally:
        client.close()
        server.close()


class FakeChannel:
    """paramiko's Channel as an Exchange uses it, after the report was read."""

    def __init__(self, out: bytes = b"PULLBACK_OK\n", err: bytes = b"", status: int = 0):
        self.sent = b""
        self.out, self.err, self.status = [out], [err], status
        self.write_closed = self.closed = False

    def sendall(self, data: bytes) -> None:
        assert not self.write_closed
        self.sent += data

    def shutdown_write(self) -> None:
        self.write_closed = True

    def recv(self, n: int) -> bytes:
        return self.out.pop() if self.out else b""

    def recv_stderr(self, n: int) -> bytes:
        return self.err.pop() if self.err else b""

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        self.closed = True


def test_an_exchange_sends_the_script_as_one_group_then_ends_the_input():
    from roles.remote.session import Exchange

    chan = FakeChannel(err=b"warning\n", status=3)
    reply = Exchange(chan, "FACTS\nEND\n").finish("set -u\necho hi\n")
    assert chan.sent == b"{\nset -u\necho hi\n}\n" and chan.write_closed
    assert (reply.stdout, reply.stderr, reply.exited) == ("PULLBACK_OK\n", "warning\n", 3)


def test_an_exchange_closed_unanswered_sends_nothing():
    from roles.remote.session import Exchange

    chan = FakeChannel()
    Exchange(chan, "FACTS\nEND\n").close()
    assert chan.sent == b"" and chan.write_closed and chan.closed


def test_a_script_cut_off_on_the_way_runs_nothing(tmp_path):
    """The defence of the one-session apply, on a real sh: a brace group that does not
    arrive whole is a syntax error before its first command runs."""
    import subprocess

    from roles.core.render import render

    marker = tmp_path / "ran"
    whole = render("scripts/block.sh.j2", script=f"touch {marker}\necho more\n")
    cut = whole[: whole.index("echo more")]
    result = subprocess.run(["sh"], input=cut, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and not marker.exists()
    assert subprocess.run(["sh"], input=whole, capture_output=True, text=True,
                          check=False).returncode == 0 and marker.exists()
