"""One ``Session`` per host: the one way to run a command on a host.

A ``Session`` owns one host's SSH connection to its admin account (Fabric), the sudo
password for that account, and counts its round trips on the run's ``Counters``. A ``Run``
is what the sessions of one task invocation share: the counters, and the ``Passwords`` that
ask each admin user's sudo password once. Nothing lives in module globals, so two runs in
one process (tests, benchmarks) never see each other's passwords or counts.

An ``Exchange`` is one root command in two turns on one SSH session: it prints a report,
then runs the script the client planned from it, read on its standard input (setup-remote's
gather and apply; ``Session.sudo_exchange``).

Host keys: Fabric's ``Connection`` silently trusts unknown host keys (its constructor sets
paramiko's ``AutoAddPolicy``). Every session loads the inventory's ``known_hosts`` and sets
``RejectPolicy``: an unknown or changed host key is an error, never a silent accept.

``backup`` runs rsync locally and never imports this module (the lean-path contract in
pyproject.toml), so Fabric and paramiko are imported at the top like everything else.

sudo: with ``sudo_password: true`` the password is asked once per admin user and run
(getpass unless the run is given another source), kept in this process's memory only, and
given to sudo on stdin (``sudo -S``, Fabric's ``sudo`` with ``password=``). It is
deliberately NOT put into Fabric's Config: invoke logs every config layer at DEBUG level
whenever it merges them. Without it every root command runs as ``sudo -n``: sudo never
waits for a password, so a host whose sudo wants one fails at once with a clear
``SudoError`` instead of hanging (or answering sudo's prompt with Fabric's unset password,
"None"). A rejected password is a ``SudoError`` too; neither message ever contains the
password.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import secrets
import shlex
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from invoke.exceptions import AuthFailure, UnexpectedExit

from roles.core.render import render
from roles.core.spec import HostSpec


class ConnectError(Exception):
    """A login that did not happen, in one line. ``passing`` when trying again may help (the
    connection was refused or cut before the SSH handshake ended, as while sshd restarts);
    not for an authentication failure or a host key problem, where it only adds failures
    to the server's per-source penalties (OpenSSH 9.8's PerSourcePenalties, fail2ban)."""

    def __init__(self, message: str, *, passing: bool = False) -> None:
        super().__init__(message)
        self.passing = passing


class UploadError(RuntimeError):
    """A long root script could not be uploaded; nothing ran."""


class SudoError(RuntimeError):
    """sudo refused to run a command as root (no password given, or a wrong one)."""


# sshd hands the command to the login shell as ONE argument, and Linux limits one argument to
# 128 KiB (MAX_ARG_STRLEN): a longer script (a big authorized_keys travels inside it) goes by
# SFTP instead. The margin covers quoting and the sudo prefix.
SCRIPT_ARG_MAX = 96 * 1024


class Counters:
    """Remote commands (one command = one SSH round trip) and logins, per host, for a run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.round_trips: dict[str, int] = {}
        self.connections: dict[str, int] = {}

    def add(self, host: str) -> None:
        with self._lock:
            self.round_trips[host] = self.round_trips.get(host, 0) + 1

    def connected(self, host: str) -> None:
        with self._lock:
            self.connections[host] = self.connections.get(host, 0) + 1


def _ask_terminal(prompt: str) -> str:
    return getpass.getpass(prompt)  # looked up per call: a test may stand in for the person


class Passwords:
    """sudo passwords, asked once per admin user through ``ask`` and kept in memory only."""

    def __init__(self, ask: Callable[[str], str] = _ask_terminal) -> None:
        self._ask = ask
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}

    def get(self, user: str) -> str:
        with self._lock:  # one prompt at a time, and only one per user
            if user not in self._known:
                self._known[user] = self._ask(f"[sudo] password for {user}: ")
            return self._known[user]

    def forget(self, user: str) -> None:
        """Drop a password sudo rejected: the next session asks again."""
        with self._lock:
            self._known.pop(user, None)

    def remembers(self, user: str) -> bool:
        with self._lock:
            return user in self._known


class Run:
    """What one task invocation's sessions share: the counters and the sudo passwords."""

    def __init__(self, ask: Callable[[str], str] = _ask_terminal) -> None:
        self.counters = Counters()
        self.passwords = Passwords(ask)

    def open(self, host: HostSpec, timeout: float = 10) -> Session:
        """A new admin login to ``host``; ConnectError with a one-line reason."""
        return Session.open(host, self, timeout)


def connect(host: HostSpec, run: Run | None = None, timeout: float = 10) -> Session:
    """A session to ``host`` in ``run`` (a run of its own when none is given)."""
    return (run or Run()).open(host, timeout)


def _nodelay_transport(sock: Any, **kwargs: Any) -> Any:
    """paramiko's Transport on a TCP socket with Nagle's algorithm off.

    paramiko writes the SSH handshake and each channel request as several small packets
    and waits for the answer; with Nagle on, a packet waits for the ACK of the one before,
    which the server delays (40 ms on Linux). Measured against a lab host: login 65 -> 20
    ms, and every later command on the connection about 45 ms sooner. A gateway's channel
    (ProxyJump) or a ProxyCommand pipe is left as it is.
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return paramiko.Transport(sock, **kwargs)


def _quiet_paramiko() -> None:
    """paramiko's transport thread logs every failed handshake with a traceback ("Error
    reading SSH protocol banner" while sshd re-executes after a reload, which the lockout
    check retries); with no handler configured Python prints it to stderr. The same
    failure reaches us as an exception, reported in one line: keep paramiko's log quiet."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


def sudo_command(command: str, password: str | None) -> str:
    """The command line a root command runs as without a password: ``sudo -n`` never
    waits for one. (With a password Fabric's ``sudo`` adds ``sudo -S -p PROMPT``.)"""
    return command if password is not None else f"sudo -n {command}"


def script_command(script: str) -> str | None:
    """``sh -c SCRIPT`` when it fits in one argument, else None (upload it first)."""
    command = f"sh -c {shlex.quote(script)}"
    return command if len(command) <= SCRIPT_ARG_MAX else None


def needs_password_error(where: str) -> SudoError:
    return SudoError(f"{where} needs a password on this host: set `sudo_password: true` for "
                     "it in the inventory (asked once per run), or allow NOPASSWD sudo for "
                     "that user")


def rejected_password_error(where: str) -> SudoError:
    return SudoError(f"{where} rejected the password (wrong sudo password); nothing ran as "
                     "root")


class Reply:
    """What a finished remote command left: its output and exit code (Fabric's names)."""

    def __init__(self, stdout: str, stderr: str, exited: int) -> None:
        self.stdout, self.stderr, self.exited = stdout, stderr, exited


def _rest(read: Callable[[int], bytes]) -> bytes:
    """Everything a channel stream still holds, until its end."""
    return b"".join(iter(lambda: read(65536), b""))


class Exchange:
    """One root command in two turns on one SSH session: it prints a report that ends in a
    marker line, then reads the script the client plans from that report on its standard
    input, runs it and ends (``templates/scripts/gather_then_stdin.sh.j2``). ``ended`` is
    set when the command ended before its report did (a failure: nothing to send)."""

    def __init__(self, channel: Any, report: str, ended: Reply | None = None) -> None:
        self._channel, self.report, self.ended = channel, report, ended
        self._open = ended is None

    def finish(self, script: str | None) -> Reply:
        """Send ``script`` (None: nothing), close the command's input, wait for its end."""
        if self.ended is not None:
            return self.ended
        chan = self._channel
        if script:
            chan.sendall(render("scripts/block.sh.j2", script=script).encode())
        chan.shutdown_write()
        out, err = _rest(chan.recv), _rest(chan.recv_stderr)
        self._open = False
        self.ended = Reply(out.decode(errors="replace"), err.decode(errors="replace"),
                           chan.recv_exit_status())
        return self.ended

    def close(self) -> None:
        """Without ``finish``: the command's input closes unsent, so it runs nothing more."""
        if self._open:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._channel.shutdown_write()
        self._channel.close()


class Session:
    """One host's admin connection, its sudo password and its share of the run's counters.

    ``conn`` is anything with Fabric's ``run``/``sudo``/``sftp``/``close`` (a
    ``fabric.Connection``; a unit test's stand-in).
    """

    def __init__(self, host: HostSpec, conn: Any, run: Run, password: str | None = None) -> None:
        self.host = host
        self.conn = conn
        self.shared = run
        self.password = password

    @classmethod
    def open(cls, host: HostSpec, run: Run, timeout: float = 10) -> Session:
        _quiet_paramiko()
        known_hosts = Path(host.known_hosts)
        if not known_hosts.is_file():
            raise ConnectError(
                f"known_hosts file {known_hosts} does not exist: add the host key first "
                "(never trusted on first use)"
            )
        connect_kwargs: dict[str, Any] = {"look_for_keys": host.admin_key is None,
                                          "transport_factory": _nodelay_transport}
        if host.admin_key:
            connect_kwargs["key_filename"] = [host.admin_key]
        password = run.passwords.get(host.admin_user) if host.sudo_password else None
        conn = Connection(
            host.address, user=host.admin_user, port=host.port,
            connect_timeout=int(timeout), connect_kwargs=connect_kwargs,
        )
        run.counters.connected(host.name)
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client.load_host_keys(str(known_hosts))
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            raise ConnectError(
                f"{host.name}: HOST KEY CHANGED for {host.address}:{host.port} "
                f"(got {exc.key.get_name()} {exc.key.fingerprint}); refusing to connect"
            ) from None
        except paramiko.AuthenticationException as exc:
            raise ConnectError(f"{host.name}: {exc}") from None
        except paramiko.SSHException as exc:
            message = str(exc)
            if "not found in known_hosts" in message:
                raise ConnectError(
                    f"{host.name}: host key of {host.address}:{host.port} is not in "
                    f"{known_hosts}; refusing to connect (verify and add it first)") from None
            raise ConnectError(f"{host.name}: {message}", passing=True) from None
        except (OSError, EOFError) as exc:
            raise ConnectError(
                f"{host.name}: cannot connect to {host.address}:{host.port}: "
                f"{str(exc) or type(exc).__name__}", passing=True) from None
        return cls(host, conn, run, password)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def counters(self) -> Counters:
        return self.shared.counters

    def reopen(self) -> Session:
        """A NEW login to the same host in the same run (the lockout check's)."""
        return self.shared.open(self.host)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, command: str | list[str], *, sudo: bool = False, warn: bool = True) -> Any:
        """Run one remote command (an argv list is quoted with shlex.join); count the trip.

        Root work with pipes or redirections goes through ``sudo sh -c <quoted script>``
        (``sudo_script``): Fabric's ``sudo`` only prefixes the command. ``sudo=True`` raises
        ``SudoError`` when sudo wants a password the inventory does not allow for, or
        rejects the one typed.
        """
        if isinstance(command, list):
            command = shlex.join(command)
        self.counters.add(self.name)
        if not sudo:
            return self.conn.run(command, hide=True, warn=warn, in_stream=False)
        where = f"{self.name}: sudo as {self.host.admin_user}"
        if self.password is None:
            # Never Fabric's sudo without a password: it would answer sudo's prompt with "None".
            result = self.conn.run(sudo_command(command, None), hide=True, warn=True,
                                   in_stream=False)
            if result.exited != 0 and "a password is required" in result.stderr:
                raise needs_password_error(where)
            if result.exited != 0 and not warn:
                raise UnexpectedExit(result)
            return result
        try:
            return self.conn.sudo(command, password=self.password, hide=True, warn=warn,
                                  in_stream=False)
        except AuthFailure:
            self.shared.passwords.forget(self.host.admin_user)
            raise rejected_password_error(where) from None

    def sudo_script(self, script: str) -> Any:
        """Run a POSIX sh script as root: in one round trip, as ``sh -c SCRIPT``; a script
        too long for one argument is uploaded first (``upload_script``) and run from there."""
        command = script_command(script)
        if command is not None:
            return self.run(command, sudo=True)
        path = self.upload_script(script)
        try:
            return self.run(f"sh {shlex.quote(path)}", sudo=True)
        finally:
            with contextlib.suppress(OSError):
                self.conn.sftp().remove(path)

    def upload_script(self, script: str) -> str:
        """Write ``script`` to a new file in the login user's home over SFTP, as that user
        (Fabric's rule: upload as the login user, then act as root; never a sudo-put): a
        random name opened with O_EXCL, mode 0600 before any byte is written. Its path."""
        self.counters.add(self.name)
        try:
            sftp = self.conn.sftp()
            path = f"{sftp.normalize('.').rstrip('/')}/.pullback-{secrets.token_hex(8)}.sh"
            with sftp.open(path, "wx") as handle:
                handle.chmod(0o600)
                handle.write(script.encode())
        except (OSError, paramiko.SSHException) as exc:
            raise UploadError(f"{self.name}: the root script ({len(script)} bytes) is too "
                              "long for one command and uploading it over SFTP failed: "
                              f"{exc or 'closed'}; nothing ran as root") from None
        return path

    def upload(self, local: str | Path, remote: str) -> None:
        """Copy a local file to ``remote`` over SFTP as the login user (then sudo installs)."""
        self.counters.add(self.name)
        self.conn.put(str(local), remote)

    def sudo_exchange(self, command: str, marker: str = "END") -> Exchange | None:
        """Start ``command`` as root on a session of its own and read its report up to the
        line ``marker``; the caller answers with ``Exchange.finish``. One round trip fewer
        than two commands. None when this host's sudo takes a password: it would travel on
        the same standard input, so the caller runs its two commands instead."""
        if self.password is not None:
            return None
        self.counters.add(self.name)
        chan = self.conn.client.get_transport().open_session()
        chan.exec_command(sudo_command(command, None))
        report, end = bytearray(), f"\n{marker}\n".encode()
        while not report.endswith(end):
            data = chan.recv(65536)
            if not data:  # the command ended before its report did
                err = _rest(chan.recv_stderr).decode(errors="replace")
                if "a password is required" in err:
                    chan.close()
                    raise needs_password_error(f"{self.name}: sudo as {self.host.admin_user}")
                ended = Reply(report.decode(errors="replace"), err, chan.recv_exit_status())
                return Exchange(chan, ended.stdout, ended)
            report += data
        return Exchange(chan, report.decode(errors="replace"))

    def exec_raw(self, command: str, timeout: float = 20) -> tuple[int, bytes, bytes]:
        """Exit code and the exact bytes of stdout and stderr (Fabric would decode them)."""
        self.counters.add(self.name)
        _, stdout, stderr = self.conn.client.exec_command(command, timeout=timeout)
        out, err = stdout.read(), stderr.read()
        return stdout.channel.recv_exit_status(), out, err

    @property
    def banner(self) -> str | None:
        """The server's SSH version string (``SSH-2.0-OpenSSH_9.2p1 ...``), as sent."""
        return getattr(getattr(self.conn, "transport", None), "remote_version", None)

    def server_key(self) -> Any:
        """The host key this session's server presented (paramiko's PKey)."""
        return self.conn.client.get_transport().get_remote_server_key()
