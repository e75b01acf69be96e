"""SSH connections to the hosts' admin accounts, with strict host key checking.

Fabric's ``Connection`` silently trusts unknown host keys (its constructor sets paramiko's
``AutoAddPolicy``). Every connection here loads the inventory's ``known_hosts`` and sets
``RejectPolicy``: an unknown or changed host key is an error, never a silent accept.

``backup`` runs rsync locally and never imports this module (the lean-path contract in
pyproject.toml), so Fabric and paramiko are imported at the top like everything else.

sudo: with ``sudo_password: true`` the password is asked once per admin user (getpass),
kept in this process's memory only, and given to sudo on stdin (``sudo -S``, Fabric's
``sudo`` with ``password=``). It is deliberately NOT put into Fabric's Config: invoke logs
every config layer at DEBUG level whenever it merges them. Without it every root command
runs as ``sudo -n``: sudo never waits for a password, so a host whose sudo wants one fails
at once with a clear ``SudoError`` instead of hanging (or answering sudo's prompt with
Fabric's unset password, "None"). A rejected password is a ``SudoError`` too; neither
message ever contains the password.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import secrets
import shlex
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko
from fabric import Connection
from invoke.exceptions import AuthFailure, UnexpectedExit

if TYPE_CHECKING:
    from fabric import Connection

    from roles.inventory.schema import Host


class ConnectError(Exception):
    pass


class UploadError(RuntimeError):
    """A long root script could not be uploaded; nothing ran."""


class SudoError(RuntimeError):
    """sudo refused to run a command as root (no password given, or a wrong one)."""


class RoundTrips:
    """Counts remote commands per host (one command = one SSH round trip)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.connections: dict[str, int] = {}

    def add(self, host: str) -> None:
        with self._lock:
            self.counts[host] = self.counts.get(host, 0) + 1

    def connected(self, host: str) -> None:
        with self._lock:
            self.connections[host] = self.connections.get(host, 0) + 1

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.connections.clear()


ROUND_TRIPS = RoundTrips()
_sudo_passwords: dict[str, str] = {}
_prompt_lock = threading.Lock()


def sudo_password(host: Host) -> str | None:
    """Prompt once per admin user for the sudo password (never stored on disk)."""
    if not host.sudo_password:
        return None
    with _prompt_lock:
        if host.admin_user not in _sudo_passwords:
            _sudo_passwords[host.admin_user] = getpass.getpass(
                f"[sudo] password for {host.admin_user}: "
            )
    return _sudo_passwords[host.admin_user]


def forget_sudo_password(user: str) -> None:
    """Drop a password sudo rejected: the next connection asks again."""
    with _prompt_lock:
        _sudo_passwords.pop(user, None)


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


def connect(host: Host, timeout: float = 10) -> Connection:
    """Open an admin connection to ``host``; raise ConnectError with a one-line reason."""
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
    password = sudo_password(host)
    conn = Connection(
        host.address, user=host.admin_user, port=host.port,
        connect_timeout=int(timeout), connect_kwargs=connect_kwargs,
    )
    conn._set(_pullback_sudo_password=password)  # a plain attribute, not config (see above)
    ROUND_TRIPS.connected(host.name)
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client.load_host_keys(str(known_hosts))
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise ConnectError(
            f"{host.name}: HOST KEY CHANGED for {host.address}:{host.port} "
            f"(got {exc.key.get_name()} {exc.key.fingerprint}); refusing to connect"
        ) from None
    except paramiko.SSHException as exc:
        message = str(exc)
        if "not found in known_hosts" in message:
            message = (
                f"host key of {host.address}:{host.port} is not in {known_hosts}; "
                "refusing to connect (verify and add it first)"
            )
        raise ConnectError(f"{host.name}: {message}") from None
    except OSError as exc:
        raise ConnectError(f"{host.name}: cannot connect to {host.address}:{host.port}: {exc}") \
            from None
    return conn


def run(c: Any, command: str | list[str], *, sudo: bool = False, host: str = "",
        warn: bool = True) -> Any:
    """Run one remote command (an argv list is quoted with shlex.join); count the trip.

    Root work with pipes or redirections goes through ``sudo sh -c <quoted script>``:
    Fabric's ``sudo`` only prefixes the command. ``sudo=True`` raises ``SudoError`` when
    sudo wants a password the inventory does not allow for, or rejects the one typed.
    """
    if isinstance(command, list):
        command = shlex.join(command)
    ROUND_TRIPS.add(host or getattr(c, "host", "local"))
    if not sudo:
        return c.run(command, hide=True, warn=warn, in_stream=False)

    user = getattr(c, "user", None) or "the admin"
    where = f"{host or getattr(c, 'host', 'local')}: sudo as {user}"
    password = getattr(c, "_pullback_sudo_password", None)
    if password is None:
        # Never Fabric's sudo without a password: it would answer sudo's prompt with "None".
        result = c.run(f"sudo -n {command}", hide=True, warn=True, in_stream=False)
        if result.exited != 0 and "a password is required" in result.stderr:
            raise SudoError(
                f"{where} needs a password on this host: set `sudo_password: true` for it "
                "in the inventory (asked once per run), or allow NOPASSWD sudo for that user"
            )
        if result.exited != 0 and not warn:

            raise UnexpectedExit(result)
        return result
    try:
        return c.sudo(command, password=password, hide=True, warn=warn, in_stream=False)
    except AuthFailure:
        forget_sudo_password(user)
        raise SudoError(f"{where} rejected the password (wrong sudo password); "
                        "nothing ran as root") from None


# sshd hands the command to the login shell as ONE argument, and Linux limits one argument to
# 128 KiB (MAX_ARG_STRLEN): a longer script (a big authorized_keys travels inside it) goes by
# SFTP instead. The margin covers quoting and the sudo prefix.
SCRIPT_ARG_MAX = 96 * 1024


def sudo_script(c: Any, script: str, *, host: str = "") -> Any:
    """Run a POSIX sh script as root: in one round trip, as ``sh -c SCRIPT``; a script too
    long for one argument is uploaded first (``upload_script``) and run from that file."""
    command = f"sh -c {shlex.quote(script)}"
    if len(command) <= SCRIPT_ARG_MAX:
        return run(c, command, sudo=True, host=host)
    path = upload_script(c, script, host=host)
    try:
        return run(c, f"sh {shlex.quote(path)}", sudo=True, host=host)
    finally:
        with contextlib.suppress(OSError):
            c.sftp().remove(path)


def upload_script(c: Any, script: str, *, host: str = "") -> str:
    """Write ``script`` to a new file in the login user's home over SFTP, as that user
    (Fabric's rule: upload as the login user, then act as root; never a sudo-put): a random
    name opened with O_EXCL, mode 0600 before any byte is written. Returns its path."""
    where = host or getattr(c, "host", "local")
    ROUND_TRIPS.add(where)
    try:
        sftp = c.sftp()
        path = f"{sftp.normalize('.').rstrip('/')}/.pullback-{secrets.token_hex(8)}.sh"
        with sftp.open(path, "wx") as handle:
            handle.chmod(0o600)
            handle.write(script.encode())
    except (OSError, paramiko.SSHException) as exc:
        raise UploadError(f"{where}: the root script ({len(script)} bytes) is too long for "
                          f"one command and uploading it over SFTP failed: {exc or 'closed'}"
                          "; nothing ran as root") from None
    return path
