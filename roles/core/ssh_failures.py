"""Why an SSH connection failed, from ssh's stderr or paramiko's message: one table.

A pull runs rsync over ssh. When ssh fails, rsync still prints its own last words ("did
not see server greeting", "connection unexpectedly closed", code 5 or 12), which blame the
rsync daemon or the forced command; the cause is in ssh's line before them. backup, doctor
and trust-host therefore ask this table first, and explain rsync's words
(``roles.core.rsync_errors``) only when ssh itself got through.

Each row names the failure (``kind``), what it means, and the task to run next (``task``):
``trust-host`` for a host key that is not pinned, ``doctor`` for everything else.
Pure: no I/O, no imports beyond ``re`` and ``dataclasses``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNREACHABLE = frozenset({"not-sshd", "closed", "refused", "no-route", "dns", "timeout"})


@dataclass(frozen=True)
class SshFailure:
    kind: str  # host-key, host-key-changed, key-refused, not-sshd, closed, refused, timeout,
    #            no-route, dns
    meaning: str  # one line: what happened, in the user's terms
    task: str  # the task to run next: "doctor" or "trust-host"

    @property
    def unreachable(self) -> bool:
        """No SSH server was reached at all: nothing over SSH can work, so stop there."""
        return self.kind in UNREACHABLE

    def describe(self, target: str) -> str:
        """One line for ``target`` (``ADDRESS:PORT``)."""
        return f"ssh to {target} failed: {self.meaning}"


# (pattern, kind, meaning, next task), most specific first: ssh prints the specific line
# ("Connection timed out during banner exchange") before the general one ("Connection to X
# port P timed out"), and paramiko wraps the socket's errno into its own words.
_TABLE: tuple[tuple[str, str, str, str], ...] = (
    (r"REMOTE HOST IDENTIFICATION HAS CHANGED|HOST KEY CHANGED|BadHostKeyException",
     "host-key-changed",
     "the server's host key is not the one pinned in known_hosts (a reinstalled server, or "
     "someone in the middle): find out why before anything else", "doctor"),
    (r"Host key verification failed|No \S+ host key is known|not found in known_hosts|"
     r"is not in \S+; refusing",
     "host-key",
     "the server's host key is not pinned in the inventory's known_hosts: check its "
     "fingerprint and pin it", "trust-host"),
    (r"Permission denied \((?:publickey|password|keyboard|gssapi|hostbased)|"
     r"Authentication failed|No authentication methods available|"
     r"Too many authentication failures",
     "key-refused",
     "sshd answered but refused the key (the key is not authorized there, PermitRootLogin, "
     "from= or StrictModes)", "doctor"),
    (r"timed out during banner exchange|Error reading SSH protocol banner\s*:?\s*timed out|"
     r"No existing session|banner exchange: .*invalid format|Protocol major versions differ",
     "not-sshd",
     "the port accepted the connection but no SSH server answered on it: the port is not "
     "sshd's (check port in the inventory), or sshd is stuck", "doctor"),
    (r"kex_exchange_identification|ssh_exchange_identification|"
     r"Error reading SSH protocol banner",
     "closed",
     "the port accepted the connection and closed it before any SSH greeting: it is not "
     "sshd's port, or sshd turned this client away (MaxStartups, TCP wrappers, a blocklist "
     "such as fail2ban)", "doctor"),
    (r"Connection refused|Unable to connect to port|Errno 111\b",
     "refused",
     "nothing listens on that port (connection refused): sshd is down, or the port in the "
     "inventory is wrong", "doctor"),
    (r"No route to host|Network is unreachable|Errno 11[03]\b|Errno 101\b",
     "no-route",
     "no network path to the address: a wrong address, the host is down, or a firewall "
     "rejects it", "doctor"),
    (r"Could not resolve hostname|Name or service not known|Temporary failure in name "
     r"resolution|nodename nor servname|Errno -[23]\b",
     "dns",
     "the address does not resolve: check address in the inventory", "doctor"),
    (r"Connection timed out|Operation timed out|\btimed out\b",
     "timeout",
     "no answer from the address within the time limit: a wrong address, the host is down, "
     "or a firewall drops the packets", "doctor"),
)
_COMPILED = tuple((re.compile(p, re.IGNORECASE), kind, meaning, task)
                  for p, kind, meaning, task in _TABLE)


def classify_ssh_failure(text: str) -> SshFailure | None:
    """The SSH failure in ``text`` (ssh's stderr, a pull's output, or a paramiko error), or
    None when ssh got through (or failed in a way this table does not know)."""
    for pattern, kind, meaning, task in _COMPILED:
        if pattern.search(text):
            return SshFailure(kind, meaning, task)
    return None


# paramiko and socket errors leak their repr into str(): "[Errno None] Unable to connect to
# port 22 on 127.0.0.1", "Error reading SSH protocol banner[Errno 104] Connection reset by
# peer". What a user reads has neither.
_NOISE = (
    (re.compile(r"\[Errno None\]\s*"), ""),
    (re.compile(r"(\S)\[Errno -?\d+\]\s*"), r"\1: "),
    (re.compile(r"\[Errno -?\d+\]\s*"), ""),
)


def clean_message(text: str, host: str | None = None) -> str:
    """``text`` on one line, without errno brackets or a leading ``host: `` (the caller
    prints the host name once)."""
    text = " ".join(text.split())
    if host and text.startswith(f"{host}: "):
        text = text[len(host) + 2:]
    for pattern, replacement in _NOISE:
        text = pattern.sub(replacement, text)
    return text
