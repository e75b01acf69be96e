"""trust: pin a host's SSH host key in the inventory's ``known_hosts``, after a person checks it.

Nothing in pullback accepts an unknown host key (Fabric connections use ``RejectPolicy``,
the backup's ssh runs with ``StrictHostKeyChecking=yes``); this is the one deliberate way
in. The key is fetched with a bare SSH key exchange (paramiko ``Transport``, no
authentication, nothing trusted), its type and SHA256 fingerprint are shown, and only after
a "yes" on the terminal (or ``--yes``) is one line appended to ``known_hosts``:

    [ADDRESS]:PORT KEYTYPE BASE64        (plain ADDRESS when the port is 22)

Lines are written unhashed, so a person can read which hosts are pinned; ssh and paramiko
also read hashed (``|1|salt|hash``) entries, and this module matches those too. A key
already pinned for that name and type: "already trusted", nothing written. A DIFFERENT key
pinned (or the server no longer offering the pinned key type, or the key listed as
``@revoked``): refused, never replaced; the message says how to remove the old line once
the change is known to be genuine. The file is rewritten through a temp file and a rename.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import paramiko

from roles.core.outcome import Trust
from roles.core.spec import HostSpec
from roles.core.ssh_failures import classify_ssh_failure, clean_message
from roles.local.files import write_atomic
from roles.remote.hostkeys import HostKey, HostKeyError, fetch_host_key, known_hosts_name


class TrustError(HostKeyError):
    """Refused or failed; the task exits 1."""


# --- pure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinned:
    lineno: int
    key: HostKey
    revoked: bool = False


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            _, _, salt, digest = pattern.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
        except ValueError:
            return False
    return pattern == name


def pinned_keys(text: str, name: str) -> list[Pinned]:
    """The entries of known_hosts ``text`` for ``name`` (plain or hashed; ``@revoked`` too).

    ``@cert-authority`` lines, comments and malformed lines are ignored, as are wildcard
    patterns (pullback writes and needs exact names).
    """
    found: list[Pinned] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        revoked = False
        if fields[0].startswith("@"):
            if fields[0] != "@revoked":
                continue
            revoked = True
            fields = fields[1:]
        if len(fields) < 3:
            continue
        patterns, key_type, blob = fields[:3]
        if any(_matches(p, name) for p in patterns.split(",")):
            found.append(Pinned(lineno, HostKey(key_type, blob), revoked))
    return found


class Action(StrEnum):
    """What ``plan_trust`` decides for the offered key."""

    ADD = "add"
    ALREADY = "already"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def plan_trust(pinned: list[Pinned], offered: HostKey, name: str, known_hosts: str) -> Decision:
    """ADD an unknown key; ALREADY for the same key; REFUSE a different or revoked one."""
    for entry in pinned:
        if entry.revoked and entry.key.blob == offered.blob:
            return Decision(Action.REFUSE, f"{known_hosts}:{entry.lineno} marks this key "
                                           "@revoked; refusing")
    for entry in pinned:
        if not entry.revoked and entry.key.type == offered.type:
            if entry.key.blob == offered.blob:
                return Decision(Action.ALREADY)
            return Decision(Action.REFUSE, mismatch_message(name, known_hosts, entry, offered))
    return Decision(Action.ADD)


def mismatch_message(name: str, known_hosts: str, entry: Pinned, offered: HostKey) -> str:
    return (
        f"HOST KEY MISMATCH for {name}: {known_hosts}:{entry.lineno} pins {entry.key.type} "
        f"{entry.key.fingerprint}, the host now offers {offered.fingerprint}. Refusing: "
        "either the server was reinstalled or someone is in the middle. Check the key on "
        "the server's console (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub); only if the change "
        f"is genuine, remove the old entry with `ssh-keygen -R '{name}' -f {known_hosts}` and "
        "run trust-host again"
    )


def appended(old: bytes, line: str) -> bytes:
    """``old`` with ``line`` added; a missing final newline is added first."""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    return old + line.encode()


# --- the network --------------------------------------------------------------------------


def _fetch(host: HostSpec, types: list[str], timeout: float) -> HostKey:
    """The offered key, or a TrustError of one line: a port that is not sshd (silent, or
    closing at once) ends paramiko's key exchange with a bare ``SSHException`` or
    ``EOFError``, which named nothing and printed a traceback."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:  # its transport thread would print the failure a second time
        logger.addHandler(logging.NullHandler())
    target = f"{host.address}:{host.port}"
    try:
        return fetch_host_key(host.address, host.port, key_types=types or None,
                              timeout=timeout)
    except HostKeyError as exc:
        failure = classify_ssh_failure(str(exc))
        if failure is None or not failure.unreachable:
            raise
        raise TrustError(f"{clean_message(str(exc))} -- {failure.meaning}") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        message = clean_message(str(exc)) or type(exc).__name__
        failure = classify_ssh_failure(message)
        meaning = failure.meaning if failure else "the SSH key exchange did not finish"
        raise TrustError(f"no host key from {target}: {message} -- {meaning}") from None


# --- one host -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    host: str
    state: Trust
    key: HostKey
    name: str
    known_hosts: str


def read_known_hosts(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise TrustError(f"cannot read {path}: {exc.strerror}") from None


def describe_key(host: HostSpec, key: HostKey) -> str:
    return (f"{host.name}: {host.address}:{host.port} offers {key.type} {key.fingerprint}\n"
            f"  compare it with what the server itself shows (on its console, not over this "
            f"network): ssh-keygen -lf /etc/ssh/ssh_host_{_file_type(key.type)}_key.pub")


def _file_type(key_type: str) -> str:
    if key_type.startswith("ecdsa-"):
        return "ecdsa"
    return {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(key_type, "*")


def trust_host(host: HostSpec, confirm, *, show=print, timeout: float = 10) -> Outcome:
    """Fetch, show, confirm (``confirm(question) -> bool``), pin. Raise TrustError to refuse.

    ``confirm`` raises TrustError itself when there is no terminal to ask on.
    """
    path = Path(host.known_hosts)
    name = known_hosts_name(host.address, host.port)
    old = read_known_hosts(path)
    pinned = pinned_keys(old.decode("utf-8", "replace"), name)
    types = list(dict.fromkeys(p.key.type for p in pinned if not p.revoked))
    key = _fetch(host, types, timeout)
    decision = plan_trust(pinned, key, name, str(path))
    if decision.action == Action.REFUSE:
        raise TrustError(f"{host.name}: {decision.reason}")
    if decision.action == Action.ALREADY:
        return Outcome(host.name, Trust.ALREADY, key, name, str(path))
    show(describe_key(host, key))
    if not confirm(f"Trust this key for {host.name} and add it to {path}? [y/N] "):
        return Outcome(host.name, Trust.DECLINED, key, name, str(path))
    # Written while we waited for the answer? Start again rather than lose that edit.
    if read_known_hosts(path) != old:
        raise TrustError(f"{path} changed while waiting for the answer; run trust-host again")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    mode = 0o644
    if path.exists():
        mode = os.stat(path).st_mode & 0o777
    write_atomic(path, appended(old, key.line(name)), mode)
    return Outcome(host.name, Trust.ADDED, key, name, str(path))
