"""Gather, in ONE remote command, every fact setup-remote needs from a host.

The script runs as root (``sudo sh -c``) and prints a line-oriented report: file contents
travel base64-encoded so that any byte (CRLF, non-UTF-8) survives. ``parse_report`` is pure
and unit-tested; ``gather`` is the only function here that touches a host.
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from roles import platforms

SSHD_CONFIG = "/etc/ssh/sshd_config"
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
RSYNCD_CONF = "/etc/rsyncd.conf"


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


def gather_script(rsync_binaries: list[str]) -> str:
    """The POSIX sh script; ``$1`` is the login shell's ``$SSH_CONNECTION``."""
    binaries = " ".join(shlex.quote(b) for b in rsync_binaries)
    known_sshd = platforms.candidates("sshd_binaries")
    sshd_paths = " ".join(shlex.quote(b) for b in known_sshd)
    units = " ".join(shlex.quote(u) for u in platforms.candidates("service"))
    spec = platforms.connection_spec("$addr")
    return rf"""
set -u
emit() {{
  if [ -f "$1" ]; then
    printf 'FILE %s %s\n' "$(stat -c '%a %u %g' "$1")" "$1"
    base64 -w0 < "$1"; echo
  else
    printf 'MISSING %s\n' "$1"
  fi
}}
addr=${{1%% *}}
printf 'CLIENT %s\n' "$addr"
if [ -r /etc/os-release ]; then
  . /etc/os-release; printf 'OS %s %s\n' "${{ID:-}}" "${{VERSION_CODENAME:-}}"
  printf 'OSLIKE %s\n' "${{ID_LIKE:-}}"
fi
printf 'OPENSSH %s\n' "$(ssh -V 2>&1 | head -n1)"
sshd=
for s in $(command -v sshd) {sshd_paths}; do
  if [ -x "$s" ]; then sshd=$s; break; fi
done
sshd=${{sshd:-{shlex.quote(known_sshd[0])}}}
printf 'SSHD %s\n' "$sshd"
emit {SSHD_CONFIG}
# sshd reads a CR as whitespace: a CRLF file's Include must not yield "*.conf\r".
awk '{{gsub(/\r/, " ")}} tolower($1)=="include"{{for(i=2;i<=NF;i++)print $i}}' \
  {SSHD_CONFIG} 2>/dev/null |
while read -r pattern; do
  case "$pattern" in /*) glob=$pattern ;; *) glob=/etc/ssh/$pattern ;; esac
  for f in $glob; do
    [ -f "$f" ] || continue
    printf 'INCLUDE %s %s\n' "$pattern" "$f"
    emit "$f"
  done
done
for d in /root/.ssh; do
  if [ -d "$d" ]; then printf 'DIR %s %s\n' "$(stat -c '%a %u %g' "$d")" "$d"; fi
done
emit {AUTHORIZED_KEYS}
emit {RSYNCD_CONF}
if out=$("$sshd" -T -C "{spec}" 2>&1); then
  printf '%s\n' "$out" | sed 's/^/T /'
else
  printf 'TERR %s\n' "$(printf '%s' "$out" | tr '\n' ' ')"
fi
if [ -d /run/systemd/system ]; then
  for unit in {units}; do
    if systemctl is-active --quiet "$unit" 2>/dev/null; then
      printf 'SERVICE %s\n' "$unit"; break
    fi
  done
fi
for r in {binaries} $(command -v rsync 2>/dev/null); do
  if [ -x "$r" ]; then printf 'RSYNC %s %s\n' "$r" "$("$r" --version 2>/dev/null | head -n1)"; fi
done
echo END
"""


_OPENSSH = re.compile(r"OpenSSH_(\d+)\.(\d+)")


def parse_report(text: str) -> HostFacts:
    """Parse the gather script's output (pure)."""
    files: dict[str, FileFact] = {}
    missing: set[str] = set()
    includes: dict[str, list[str]] = {}
    dirs: dict[str, tuple[int, int, int]] = {}
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
    for pattern in includes:
        includes[pattern] = sorted(includes[pattern])
    return HostFacts(
        files=files, missing=frozenset(missing), includes=includes, dirs=dirs,
        client_addr=values["client"], openssh=values["openssh"], sshd=values["sshd"],
        effective=effective, sshd_T_error=values["terr"], service=values["service"],
        rsync=rsync, os_id=values["os"][0], os_codename=values["os"][1],
        os_like=values["like"],
    )


def gather(c: Any, host_name: str, rsync_binaries: list[str]) -> HostFacts:
    """Run the gather script as root in one round trip and parse its report."""
    from roles.connection import run

    script = gather_script(rsync_binaries)
    # "$SSH_CONNECTION" is expanded by the admin's login shell, before sudo resets the
    # environment: it tells us the backup host's address as this server sees it.
    command = f'sh -c {shlex.quote(script)} sh "$SSH_CONNECTION"'
    result = run(c, command, sudo=True, host=host_name)
    if result.exited != 0 or not result.stdout.rstrip().endswith("END"):
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(
            f"reading facts as root failed (exit {result.exited}): "
            f"{detail[-1] if detail else 'no output'}"
        )
    return parse_report(result.stdout.rstrip("\n"))
