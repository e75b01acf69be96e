"""sudo_script's choice between one command and an upload (a fake connection records what
would run; the real path is tested against a lab host in test_setup_remote)."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import paramiko
import pytest

from roles.remote import connection
from roles.remote.connection import SCRIPT_ARG_MAX, UploadError, sudo_script


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
    host = "web1"

    def __init__(self, sftp: FakeSftp) -> None:
        self._sftp = sftp
        self.commands: list[str] = []

    def sftp(self) -> FakeSftp:
        return self._sftp

    def run(self, command: str, **kwargs):
        self.commands.append(command)
        return SimpleNamespace(exited=0, stdout="", stderr="")


def test_a_short_script_is_one_command():
    c = FakeConnection(FakeSftp())
    sudo_script(c, "echo hi", host="web1")
    assert c.commands == [f"sudo -n sh -c {shlex.quote('echo hi')}"]


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
from roles.remote import connection
from roles.inventory.compiled import Record
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(5)
def serve():
    while True:
        c, _ = srv.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
host = Record({{"name": "web1", "address": "127.0.0.1", "port": srv.getsockname()[1],
               "admin_user": "admin", "admin_key": None, "known_hosts": {str(tmp_path / "kh")!r},
               "sudo_password": False}})
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
