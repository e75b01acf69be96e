"""Gather, in ONE remote command, every fact setup-remote needs from a host.

The script runs as root (``sudo sh -c``) and prints a line-oriented report: file contents
travel base64-encoded so that any byte (CRLF, non-UTF-8) survives. ``parse_report`` is pure
and unit-tested; ``gather`` is the only function here that touches a host.

The script runs on every host at every run, a no-change re-run included, so it starts as
few processes as it can: each costs a fork, an exec and a dynamic link on the host (about
0.5 ms for ``/bin/true``, 3-4 ms for ``ssh -V`` or ``rsync --version``, which link
libcrypto; 7 ms for ``sshd -T``, measured on a Debian 12 lab host). One ``stat`` covers
every file and folder, ``base64`` runs once per file, ``sshd -T`` once, ``--version`` once
per distinct rsync binary, and the OpenSSH release comes from the banner sshd already sent
on this connection (``ssh -V`` only when the banner does not name one).
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from roles.core import platforms
from roles.core.hardened import (  # noqa: F401 - the paths a gather reads, named once
    AUTHORIZED_KEYS,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    SSHD_CONFIG,
)
from roles.core.render import render
from roles.remote.session import Exchange, Session


@dataclass(frozen=True)
class FileFact:
    path: str
    content: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class HostFacts:
    files: dict[str, FileFact]                 # existing files by path
    missing: frozenset[str]                    # asked for, not there
    includes: dict[str, list[str]]             # sshd Include argument -> matched paths
    dirs: dict[str, tuple[int, int, int]]      # path -> (mode, uid, gid)
    client_addr: str                           # the backup host's address as the remote sees it
    openssh: tuple[int, int] | None            # (major, minor)
    sshd: str                                  # sshd binary path
    effective: dict[str, str]                  # `sshd -T -C ...` (first value per key)
    sshd_T_error: str
    service: str | None                        # systemd unit running sshd, if any
    rsync: dict[str, str] = field(default_factory=dict)  # binary path -> `--version` line 1
    os_id: str = ""
    os_codename: str = ""
    os_like: tuple[str, ...] = ()              # /etc/os-release ID_LIKE

    def content(self, path: str) -> bytes | None:
        fact = self.files.get(path)
        return fact.content if fact else None

    @property
    def platform(self) -> platforms.Platform:
        """The host's row in the per-OS table (Debian defaults for an unknown Linux)."""
        found = platforms.lookup(self.os_id, self.os_codename, self.os_like)
        return found or platforms.DEFAULT

    @property
    def pidfile(self) -> str:
        """sshd's pidfile: what ``sshd -T`` says, else the platform's default."""
        return self.effective.get("pidfile") or self.platform.pidfile or "/run/sshd.pid"


def gather_script(rsync_binaries: list[str], *, then_stdin: bool = False) -> str:
    """The POSIX sh script; ``$1`` is the login shell's ``$SSH_CONNECTION``, ``$2`` the SSH
    banner of this connection's sshd when it names an OpenSSH release (else empty).
    ``then_stdin``: afterwards it runs the script sent on its standard input (``gather_then``)."""
    return render(
        "scripts/gather_then_stdin.sh.j2" if then_stdin else "scripts/gather.sh.j2",
        rsync_binaries=rsync_binaries, sshd_paths=platforms.candidates("sshd_binaries"),
        units=platforms.candidates("service"), spec=platforms.connection_spec("$addr"),
        sshd_config=SSHD_CONFIG, pullback_dir=PULLBACK_DIR, authorized_keys=AUTHORIZED_KEYS,
        rsyncd_conf=RSYNCD_CONF, pullback_rsyncd_conf=PULLBACK_RSYNCD_CONF)


_OPENSSH = re.compile(r"OpenSSH_(\d+)\.(\d+)")


def parse_report(text: str) -> HostFacts:
    """Parse the gather script's output (pure).

    Files and folders come as ``STAT mode uid gid path`` lines (one ``stat`` for all), and
    each file's content as ``DATA path`` followed by one base64 line: a STAT path with DATA
    is a file, one without is a folder. ``sshd -T`` prints its lines between ``TBEGIN``
    and ``TEND``. The older one-at-a-time forms (``FILE`` + content, ``DIR``, ``T key
    value``) are read too: ``setup.read_files_script`` prints them.
    """
    files: dict[str, FileFact] = {}
    missing: set[str] = set()
    includes: dict[str, list[str]] = {}
    dirs: dict[str, tuple[int, int, int]] = {}
    stats: dict[str, tuple[int, int, int]] = {}
    data: dict[str, bytes] = {}
    effective: dict[str, str] = {}
    rsync: dict[str, str] = {}
    values: dict[str, Any] = {"client": "", "openssh": None, "sshd": "/usr/sbin/sshd",
                              "terr": "", "service": None, "os": ("", ""), "like": ()}
    lines = text.splitlines()
    if not lines or lines[-1] != "END":
        raise ValueError("the fact report is incomplete (no END line)")
    index = 0
    while index < len(lines):
        line = lines[index]
        tag, _, rest = line.partition(" ")
        if tag == "FILE":
            mode, uid, gid, path = rest.split(" ", 3)
            index += 1
            content = base64.b64decode(lines[index]) if lines[index] else b""
            files[path] = FileFact(path, content, int(mode, 8), int(uid), int(gid))
        elif tag == "STAT":
            mode, uid, gid, path = rest.split(" ", 3)
            stats[path] = (int(mode, 8), int(uid), int(gid))
        elif tag == "DATA":
            index += 1
            data[rest] = base64.b64decode(lines[index]) if lines[index] else b""
        elif tag == "TBEGIN":
            index += 1
            while index < len(lines) - 1 and lines[index] != "TEND":  # the last is END
                key, _, value = lines[index].partition(" ")
                effective.setdefault(key.lower(), value)
                index += 1
            if lines[index] != "TEND":
                raise ValueError("the fact report is incomplete (sshd -T has no TEND)")
        elif tag == "MISSING":
            missing.add(rest)
        elif tag == "INCLUDE":
            pattern, path = rest.split(" ", 1)
            includes.setdefault(pattern, []).append(path)
        elif tag == "DIR":
            mode, uid, gid, path = rest.split(" ", 3)
            dirs[path] = (int(mode, 8), int(uid), int(gid))
        elif tag == "CLIENT":
            values["client"] = rest.strip()
        elif tag == "OS":
            os_id, _, codename = rest.partition(" ")
            values["os"] = (os_id, codename.strip())
        elif tag == "OSLIKE":
            values["like"] = tuple(rest.split())
        elif tag == "OPENSSH":
            match = _OPENSSH.search(rest)
            values["openssh"] = (int(match[1]), int(match[2])) if match else None
        elif tag == "SSHD":
            values["sshd"] = rest.strip()
        elif tag == "T":
            key, _, value = rest.partition(" ")
            effective.setdefault(key.lower(), value)
        elif tag == "TERR":
            values["terr"] = rest.strip()
        elif tag == "SERVICE":
            values["service"] = rest.strip()
        elif tag == "RSYNC":
            path, _, version = rest.partition(" ")
            rsync[path] = version.strip()
        index += 1
    for path, content in data.items():
        if path not in stats:
            raise ValueError(f"the fact report has {path}'s content but not its mode "
                             "(did it vanish while it was read? run again)")
        files[path] = FileFact(path, content, *stats[path])
    dirs.update((path, stat) for path, stat in stats.items() if path not in data)
    for pattern in includes:
        includes[pattern] = sorted(includes[pattern])
    return HostFacts(
        files=files, missing=frozenset(missing), includes=includes, dirs=dirs,
        client_addr=values["client"], openssh=values["openssh"], sshd=values["sshd"],
        effective=effective, sshd_T_error=values["terr"], service=values["service"],
        rsync=rsync, os_id=values["os"][0], os_codename=values["os"][1],
        os_like=values["like"],
    )


# A banner sshd sends on every connection: "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3".
_BANNER = re.compile(r"SSH-2\.0-OpenSSH_\d+\.\d+[ -~]*")


def openssh_banner(s: Session) -> str:
    """This connection's server banner when it names an OpenSSH release, else "".

    It is the release of the sshd that answers on this host and port, the one that will
    read the backup key's authorized_keys line (``ssh -V`` only names the client of the
    same package), and it costs the host nothing: sshd sent it before the key exchange.
    Only printable ASCII passes, so that the report stays one fact a line.
    """
    banner = s.banner
    return banner if isinstance(banner, str) and _BANNER.fullmatch(banner) else ""


def _gather_command(s: Session, script: str) -> str:
    # "$SSH_CONNECTION" is expanded by the admin's login shell, before sudo resets the
    # environment: it tells us the backup host's address as this server sees it.
    return f'sh -c {shlex.quote(script)} sh "$SSH_CONNECTION" {shlex.quote(openssh_banner(s))}'


def _facts(result: Any) -> HostFacts:
    if result.exited != 0 or not result.stdout.rstrip().endswith("END"):
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(
            f"reading facts as root failed (exit {result.exited}): "
            f"{detail[-1] if detail else 'no output'}"
        )
    return parse_report(result.stdout.rstrip("\n"))


def gather(s: Session, rsync_binaries: list[str]) -> HostFacts:
    """Run the gather script as root in one round trip and parse its report."""
    return _facts(s.run(_gather_command(s, gather_script(rsync_binaries)), sudo=True))


def gather_then(s: Session, rsync_binaries: list[str]) -> tuple[HostFacts, Exchange] | None:
    """The facts, from a root command that then waits for the script to run on them
    (``Exchange.finish``): gather, plan and apply in one SSH session. None when the host's
    sudo takes a password (use ``gather``, then a command of its own)."""
    command = _gather_command(s, gather_script(rsync_binaries, then_stdin=True))
    exchange = s.sudo_exchange(command)
    if exchange is None:
        return None
    try:
        if exchange.ended is not None:
            return _facts(exchange.ended), exchange  # raises: the report did not finish
        return parse_report(exchange.report.rstrip("\n")), exchange
    except Exception:
        exchange.close()
        raise
