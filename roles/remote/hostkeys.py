"""A server's host key, read from a key exchange alone (no authentication, nothing
trusted): what trust-host shows before pinning and doctor compares with known_hosts."""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass

import paramiko

from roles.core.errors import PullbackError
from roles.core.sshkeys import fingerprint_of


class HostKeyError(PullbackError):
    """The host key could not be read (no connection, no common key type)."""

def known_hosts_name(address: str, port: int) -> str:
    """The name ssh and paramiko look up: ``[addr]:port``, or ``addr`` for port 22."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass(frozen=True)
class HostKey:
    type: str  # "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"
    blob: str  # base64, as in known_hosts

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it (base64, no padding)."""
        return fingerprint_of(base64.b64decode(self.blob))

    def line(self, name: str) -> str:
        return f"{name} {self.type} {self.blob}\n"


def rsa_types(types: list[str]) -> list[str]:
    # A pinned "ssh-rsa" key is negotiated with the SHA-2 signature algorithms.
    out: list[str] = []
    for key_type in types:
        out += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" \
            else [key_type]
    return list(dict.fromkeys(out))


def fetch_host_key(address: str, port: int, *, key_types: list[str] | None = None,
                   timeout: float = 10) -> HostKey:
    """The server's host key from a key exchange only: no authentication, nothing trusted.

    ``key_types`` restricts the negotiation to the types already pinned, so a host with
    several keys is compared on the key that is pinned (as paramiko's client does).
    """
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise HostKeyError(f"cannot connect to {address}:{port}: {exc}") from None
    transport = paramiko.Transport(sock)
    try:
        if key_types:
            supported = set(transport.get_security_options().key_types)
            wanted = [t for t in rsa_types(key_types) if t in supported]
            if not wanted:
                raise HostKeyError(f"the pinned key types {', '.join(key_types)} are not "
                                 "supported here; refusing")
            transport.get_security_options().key_types = wanted
        try:
            transport.start_client(timeout=timeout)
        except paramiko.SSHException as exc:
            if key_types:
                raise HostKeyError(
                    f"{address}:{port} no longer offers a {'/'.join(key_types)} host key, the "
                    f"type pinned in known_hosts ({exc}); refusing: the host key changed"
                ) from None
            raise HostKeyError(f"SSH key exchange with {address}:{port} failed: {exc}") from None
        key = transport.get_remote_server_key()
        return HostKey(key.get_name(), key.get_base64())
    finally:
        transport.close()
        sock.close()
