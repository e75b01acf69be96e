"""The one definition of a hardened host: what setup-remote and capture-command make true
on a server, and what doctor, verify and ``tests/infra`` check against.

A server is hardened when
- sshd applies ``PermitRootLogin forced-commands-only`` to the backup host's connection
  (``sshd -T -C``, Match blocks included);
- ``/root/.ssh`` is 0700 root and ``authorized_keys`` 0600 root, holding the backup key's
  line with a forced command and ``restrict`` plus the classic ``no-*`` options, and the
  ``from=`` of ``wanted_from`` (by default the backup host's own address);
- the forced command runs the pinned rsync build (``rsync.prefix/bin/rsync``) as soon as it
  exists, whichever of setup-remote and build-rsync ran first:
  - daemon mode: ``RSYNC --server --daemon --config=/etc/pullback/rsyncd.conf .``, with
    the module in pullback's own file (0600 root, folder 0700 root), never in the shared
    ``/etc/rsyncd.conf`` that any rsync daemon on the host would serve;
  - captured mode: the gate, a root-only allow-list of the two captured commands.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

PERMIT_ROOT_LOGIN = "forced-commands-only"

SSHD_CONFIG = "/etc/ssh/sshd_config"
ROOT_SSH = "/root/.ssh"
AUTHORIZED_KEYS = f"{ROOT_SSH}/authorized_keys"
RSYNCD_CONF = "/etc/rsyncd.conf"  # shared: read only to migrate the old module away from it
PULLBACK_DIR = "/etc/pullback"
PULLBACK_RSYNCD_CONF = f"{PULLBACK_DIR}/rsyncd.conf"  # daemon mode's module, ours alone

# Captured mode's root-only scripts and state on the host.
LIBEXEC = "/usr/local/libexec/pullback"
CAPTURE_SCRIPT = f"{LIBEXEC}/capture"
GATE = f"{LIBEXEC}/gate"
REMOTE_STATE = "/var/lib/pullback"
CAPTURED_FILE = f"{REMOTE_STATE}/captured-command"

# (mode, uid, gid)
PRIVATE = (0o700, 0, 0)  # /root/.ssh, pullback's folders and scripts
ROOT_ONLY = (0o600, 0, 0)  # authorized_keys, pullback's rsyncd.conf

# Every option the backup key's line carries besides command= and from=. ``restrict``
# (OpenSSH >= 7.2) denies all of these and whatever later releases add; the classic ones
# stay for older sshd and human readers.
RESTRICT = "restrict"
CLASSIC_NO_OPTIONS: tuple[str, ...] = (
    "no-port-forwarding",
    "no-agent-forwarding",
    "no-X11-forwarding",
    "no-pty",
)


# ``from: any`` in the inventory: the backup key's line carries no from= at all.
FROM_ANY = "any"


def wanted_from(from_: str | None, client_addr: str) -> str | None:
    """The backup key's ``from=`` value for a host, or None for no ``from=``.

    The one rule that setup-remote writes and doctor and verify check: the inventory's
    pattern list when it gives one; none with ``from: any``; by default the backup host's
    own address as the server sees it (``facts.client_addr``, from ``$SSH_CONNECTION`` of
    the admin login), so a stolen backup key is refused from anywhere else. None when the
    server reported no usable address (setup-remote warns).
    """
    if from_ == FROM_ANY:
        return None
    if from_ is not None:
        return from_
    try:
        ipaddress.ip_address(client_addr)
    except ValueError:
        return None
    return client_addr


def daemon_command(rsync: str) -> str:
    """Daemon mode's forced command: rsync's daemon over the ssh session, reading only
    pullback's own config file."""
    return f"{rsync} --server --daemon --config={PULLBACK_RSYNCD_CONF} ."


def forced_rsync(pinned: str, found: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(path, warning)``: the rsync a forced command must run on a host where ``found``
    maps each rsync binary to its ``--version`` line.

    The pinned build as soon as it is there; before build-rsync ran, the host's own rsync
    with a warning (the ends may then differ: the seed's protocol trouble); ``(None, None)``
    when the host has no rsync at all.
    """
    if pinned in found:
        return pinned, None
    others = [path for path in found if path != pinned]
    if not others:
        return None, None
    return others[0], (
        f"{pinned} is not installed yet: the forced command uses {others[0]} for now; "
        "`invoke build-rsync` installs it and points the forced command at it")


@dataclass(frozen=True)
class HelperFile:
    """A root-only script of pullback's own on a host (captured mode: the capture script,
    the gate), mode 0700 root:root in a 0700 root folder."""

    step: str
    path: str
    content: bytes


class Mode(StrEnum):
    """``forced_command`` in the inventory: what the backup key's forced command is."""

    DAEMON = "daemon"  # rsync's daemon over the ssh session; the client pulls HOST::MODULE
    CAPTURED = "captured"  # the gate: exactly the captured commands; the client pulls HOST:/
