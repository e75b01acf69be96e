"""doctor: the seed's manual troubleshooting, automated.

Per host, each finding is three lines: what is wrong, why it breaks the backup, the fix;
levels ``ok``, ``warn``, ``error`` (any error: exit 1). The checks, in the seed's order of
discovery:

1. host key and reachability: the admin login with strict host keys; an unknown or changed
   key is an error that shows the fingerprint the server offers (read with a bare
   paramiko ``Transport``, which trusts nothing);
2. clean shell: an admin login running ``true`` must print zero bytes, and so must root's
   shell when sshd starts the forced command (simulated as sshd does it: ``SHELL -c`` with
   ``SSH_CLIENT`` set, so Debian's bash reads ``~/.bashrc``); the startup file that prints
   is named;
3. rsync on both ends: the binaries the backup uses (local: ``find_local_rsync``; remote:
   the forced command's, the capture gate's recorded one, else ``rsync.prefix``),
   versions, protocols, the inventory's pin;
4. sshd: ``sshd -T -C`` for the backup host's connection (permitrootlogin,
   pubkeyauthentication, authorizedkeysfile, strictmodes) and the managed key line;
5. the forced command against what the backup sends: a daemon forced command with a
   captured-mode inventory (the seed's "protocol version mismatch -- is your shell
   clean?"), a dry-run flag baked into the command, a missing rsync path, a daemon
   reading the shared ``/etc/rsyncd.conf`` instead of ``--config=/etc/pullback/rsyncd.conf``,
   that file without ``uid = 0``, without the module or its refusals, or not 0600 root,
   a module an older pullback left in ``/etc/rsyncd.conf`` (any rsync daemon on the host
   serves it), options drifted since capture. Captured
   mode is checked both ways: a hand-made ``rsync --server --sender`` forced command
   against what the local rsync sends now (``simulate_sent_command``: a fake ``-e``
   records it, no network), and capture-command's gate against its local record
   (``capture.check_drift``), the gate's content and the remote rsync's version;
6. a dry-run pull of ``/etc/hostname`` with the backup key (daemon ``::``; single colon
   for a captured-mode inventory facing a daemon command, which shows the seed's error),
   its failure explained. A gate serves only the recorded source: no test pull there;
7. the local destination (no host contacted): folders on the way that others could change
   (``roles.local.folders``: backup refuses them), a DEST that is not 0700 or still in the old
   mirror layout, and a file system mounted without ``nosuid``/``nodev``;
8. the server's file systems below ``backup.source`` that a ``-x`` pull skips, from the
   root script's ``/proc/self/mountinfo`` (``roles.core.mounts.skipped``): a warning each,
   naming ``backup.extra_sources``.

Round trips: the admin login, ``facts.gather`` (one), ``true`` (one), one read-only root
script for the rest (one), and one more only when a shell turns out not to be clean. The
pull is one ssh connection with the backup key. Everything that decides is pure and
unit-tested; the explanations of rsync's errors live in ``roles.core.rsync_errors``, so
``backup`` reads them without importing doctor (or paramiko).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from roles.config import gate as gate_scripts
from roles.config import rootkey, rsyncd
from roles.config.rootkey import (
    ForcedCommand,
    KeyLine,
    find_key_line,
    from_allows,
    parse_forced_command,
)
from roles.core import fleet, hardened, mounts, pull
from roles.core.hardened import Mode
from roles.core.outcome import Finding, Level
from roles.core.render import render
from roles.core.rsync import (
    DEFAULT_VERSION,
    MIN_SAFE_CLIENT,
    CaptureError,
    client_exposure,
    parse_version_output,
    remote_paths,
)
from roles.core.rsync_errors import explain_exit, explain_rsync_error, signature  # noqa: F401
from roles.core.spec import HostSpec
from roles.core.ssh_failures import classify_ssh_failure, clean_message
from roles.core.sshkeys import fingerprint_of
from roles.local import capture_record, folders, runner, store
from roles.remote.facts import (
    AUTHORIZED_KEYS,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    HostFacts,
    gather,
)
from roles.remote.hostkeys import fetch_host_key, known_hosts_name
from roles.remote.session import ConnectError, Run, Session

PROBE_PATH = "/etc/hostname"
SSHD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's default
SHOW_BYTES = 200
PULL_TIMEOUT = 60.0
MIN_GOOD_PROTOCOL = 30  # rsync 3.0: incremental recursion, the protocol every 3.x speaks
OLDEST_PROTOCOL = 20    # rsync 3.x refuses older peers
METADATA_PROTOCOL = 30   # -A/--acls and -X/--xattrs: rsync 3.0 on both ends


@dataclass
class Report:
    host: str
    target: str  # "ADDR:PORT"
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.WARN]


def ok(check: str, what: str) -> Finding:
    return Finding(check, Level.OK, what)


def warn(check: str, what: str, why: str, fix: str) -> Finding:
    return Finding(check, Level.WARN, what, why, fix)


def error(check: str, what: str, why: str, fix: str) -> Finding:
    return Finding(check, Level.ERROR, what, why, fix)


# --- what a single-colon client sends (local, no network) -------------------------------

_FAKE_RSH = '#!/bin/sh\nprintf \'%s\\0\' "$@" > "$0.args"\nexit 1\n'


def simulate_sent_command(local_rsync: str, host: HostSpec,
                          options: Iterable[str] | None = None) -> tuple[str, ...]:
    """The command the local rsync sends for a single-colon pull of ``backup.source``:
    run it with ``-e`` pointing at a script that records its arguments and fails, as
    capture-command does on the server, but without a network."""
    chosen = pull.drop_progress(host.backup.options if options is None else options)
    with tempfile.TemporaryDirectory(prefix="pullback-doctor-") as tmp:
        fake = Path(tmp) / "rsh"
        fake.write_text(_FAKE_RSH)
        fake.chmod(0o700)
        address = f"[{host.address}]" if ":" in host.address else host.address
        extras = tuple(getattr(host.backup, "extra_sources", ()))
        if extras:  # as a captured-mode pull sends them (roles.core.pull.source_specs)
            chosen.append("--relative")
        sources = [f"root@{address}:{path}"
                   for path in remote_paths(host.backup.source, extras)]
        argv = [local_rsync, "-e", str(fake), *chosen, *sources,
                str(Path(tmp) / "dest") + "/"]
        subprocess.run(argv, capture_output=True, check=False, timeout=30,
                       stdin=subprocess.DEVNULL)
        args_file = Path(str(fake) + ".args")
        if not args_file.exists():
            raise RuntimeError(f"{local_rsync} did not start its remote shell")
        words = args_file.read_bytes().decode(errors="replace").split("\0")[:-1]
    if host.address in words:
        words = words[words.index(host.address) + 1:]
    return tuple(words)


def same_command(forced: tuple[str, ...], sent: tuple[str, ...]) -> bool:
    """Equal apart from the program (the forced command calls rsync by full path) and a
    trailing slash on the path."""
    def norm(argv: tuple[str, ...]) -> tuple[str, ...]:
        body = list(argv[1:])
        if body and body[-1].startswith("/"):
            body[-1] = body[-1].rstrip("/") or "/"
        return tuple(body)
    return norm(forced) == norm(sent)


# --- the host's read-only root script (pure text + parser) -------------------------------

def root_script(program: str, rsync: str, files: Iterable[str], client_addr: str) -> str:
    """One read-only root script: does the forced command's ``program`` exist (found as
    sshd would: root's shell, sshd's default PATH), the ``rsync`` it runs and its version,
    the contents of ``files`` (a daemon's non-default config, the gate), the mount table
    (and which mount points are files), and root's shell started as sshd starts a forced
    command."""
    return render("scripts/doctor_root.sh.j2", sshd_path=SSHD_PATH, program=program,
                  rsync=rsync, files=list(files), addr=client_addr or "127.0.0.1")


def admin_probe_script() -> str:
    """Run as the admin (no sudo): which of its startup files prints."""
    return render("scripts/doctor_admin.sh.j2", sshd_path=SSHD_PATH)


@dataclass(frozen=True)
class RootFacts:
    program: str | None = None         # the forced command's program, resolved; None: missing
    binary: str | None = None          # the rsync it runs, resolved; None: missing
    version_line: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()
    shell: str = ""
    root_stdout: bytes = b""
    root_stderr: bytes = b""
    probes: tuple[tuple[int, str], ...] = ()
    mountinfo: str | None = None       # /proc/self/mountinfo; None: the host has none
    not_directories: frozenset[str] = frozenset()  # mount points that are files


def _after_marker(text: str) -> list[str]:
    """Lines after our marker: a dirty login prints its junk before it."""
    lines = text.splitlines()
    if "PULLBACK_DOCTOR" not in lines:
        raise ValueError("no PULLBACK_DOCTOR marker in the output")
    lines = lines[lines.index("PULLBACK_DOCTOR") + 1:]
    if not lines or lines[-1] != "END":
        raise ValueError("the doctor report is incomplete (no END line)")
    return lines[:-1]


def parse_probes(lines: Iterable[str]) -> tuple[tuple[int, str], ...]:
    out: list[tuple[int, str]] = []
    for line in lines:
        tag, _, rest = line.partition(" ")
        if tag == "PROBE":
            count, _, path = rest.strip().partition(" ")
            if count.isdigit():
                out.append((int(count), path))
    return tuple(out)


def parse_root_report(text: str) -> RootFacts:
    values: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    missing: set[str] = set()
    not_dirs: set[str] = set()
    lines = _after_marker(text)
    index = 0
    while index < len(lines):
        tag, _, rest = lines[index].partition(" ")
        if tag == "PROGRAM":
            values["program"] = rest.strip()
        elif tag == "BIN":
            values["binary"] = rest.strip()
        elif tag == "BINVERSION":
            values["version_line"] = rest.strip()
        elif tag == "FILE":
            index += 1
            files[rest] = base64.b64decode(lines[index]) if lines[index] else b""
        elif tag == "MISSING":
            missing.add(rest)
        elif tag == "SHELL":
            values["shell"] = rest.strip()
        elif tag == "ROOTOUT":
            values["root_stdout"] = base64.b64decode(rest.strip())
        elif tag == "ROOTERR":
            values["root_stderr"] = base64.b64decode(rest.strip())
        elif tag == "MOUNTINFO":
            values["mountinfo"] = base64.b64decode(rest.strip()).decode("utf-8", "replace")
        elif tag == "NOTDIR":
            not_dirs.add(mounts.unescape(rest))
        index += 1
    return RootFacts(**values, files=files, missing=frozenset(missing),
                     probes=parse_probes(lines), not_directories=frozenset(not_dirs))


# --- the checks (pure) -------------------------------------------------------------------


def show_bytes(data: bytes) -> str:
    shown = repr(data[:SHOW_BYTES])
    return shown + (f" (first {SHOW_BYTES} of {len(data)})" if len(data) > SHOW_BYTES else "")


def _culprits(probes: Iterable[tuple[int, str]]) -> list[str]:
    return [f"{path} ({count} bytes)" for count, path in probes if count > 0]


def check_clean_shell(who: str, shell: str, stdout: bytes, stderr: bytes,
                      probes: Iterable[tuple[int, str]], *, root: bool) -> list[Finding]:
    check = "clean shell"
    session = ("root's shell when sshd starts the forced command" if root
               else "an admin login running `true`") + (f" ({shell})" if shell else "")
    culprits = _culprits(probes)
    if culprits:
        where = "it comes from " + ", ".join(culprits)
    else:
        where = (f"none of {who}'s startup files prints on its own: look at what "
                 "/etc/bash.bashrc and ~/.bashrc source, /etc/ssh/sshrc and ~/.ssh/rc "
                 "(not /etc/motd or ~/.profile: sshd shows motd and bash reads ~/.profile "
                 "only for interactive logins)")
    findings: list[Finding] = []
    if stdout:
        why = ("rsync reads the remote side's stdout as its protocol, so these bytes arrive "
               "before rsync's greeting: 'protocol version mismatch -- is your shell clean?'")
        if not root:
            why += ("; the admin's startup files are the probe the seed used, and root's "
                    "usually follow the same pattern")
        findings.append(error(
            check, f"{session} printed {len(stdout)} bytes on stdout: "
                   f"{show_bytes(stdout)}; {where}",
            why, "remove that output, or print only on a terminal: guard it with "
                 "`[ -t 1 ] &&` or put it after the `case $- in *i*)` test of ~/.bashrc"))
    if stderr:
        findings.append(warn(
            check, f"{session} printed {len(stderr)} bytes on stderr: "
                   f"{show_bytes(stderr)}",
            "stderr does not break rsync's protocol, but it lands in every backup log and "
            "often means a startup file runs commands that expect a terminal",
            "make the startup files silent for non-interactive sessions"))
    if not findings:
        findings.append(ok(check, f"{session} prints nothing"))
    return findings


def _keys_file_for_root(value: str) -> bool:
    for token in value.split():
        path = token.replace("%h", "/root").replace("%u", "root").replace("%%", "%")
        if not path.startswith("/"):
            path = "/root/" + path
        if os.path.normpath(path) == AUTHORIZED_KEYS:
            return True
    return False


def check_sshd(facts: HostFacts) -> list[Finding]:
    check = "sshd"
    spec = f"sshd -T -C user=root,host={facts.client_addr},addr={facts.client_addr}"
    if facts.sshd_T_error:
        return [error(check, f"`{spec}` fails: {facts.sshd_T_error}",
                      "sshd cannot parse its configuration: the next reload or restart fails "
                      "and nobody can log in, the backup key included",
                      "fix the file `sshd -t` names, then run `invoke setup-remote`")]
    eff = facts.effective
    findings: list[Finding] = []
    permit = eff.get("permitrootlogin", "")
    if permit == hardened.PERMIT_ROOT_LOGIN:
        findings.append(ok(check, f"permitrootlogin {permit} for root from {facts.client_addr}"))
    elif permit == "no":
        findings.append(error(
            check, f"sshd applies PermitRootLogin no to root from {facts.client_addr}",
            "sshd refuses every root login, the backup key's included: 'Permission denied "
            "(publickey)', rsync exit 255", "run `invoke setup-remote` (it sets "
            "forced-commands-only where sshd reads it; a Match block must be fixed by hand)"))
    else:
        findings.append(error(
            check, f"sshd applies PermitRootLogin {permit or '(unknown)'} to root from "
                   f"{facts.client_addr}, not {hardened.PERMIT_ROOT_LOGIN}",
            "the backup works, but root keys without command= (and passwords, with yes) "
            "still give a full root shell: the restricted key is not the only way in",
            "run `invoke setup-remote`; if it reports a Match block, fix that block by hand"))
    pubkey = eff.get("pubkeyauthentication", "yes")
    if pubkey != "yes":
        findings.append(error(
            check, f"pubkeyauthentication {pubkey}",
            "sshd accepts no key at all: the backup key is refused (rsync exit 255)",
            "set `PubkeyAuthentication yes` in sshd_config (or the drop-in / Match block "
            "that turns it off) and reload sshd"))
    else:
        findings.append(ok(check, "pubkeyauthentication yes"))
    keys_file = eff.get("authorizedkeysfile", ".ssh/authorized_keys .ssh/authorized_keys2")
    if _keys_file_for_root(keys_file):
        findings.append(ok(check, f"authorizedkeysfile {keys_file}"))
    else:
        findings.append(error(
            check, f"authorizedkeysfile is {keys_file!r}: sshd does not read "
                   f"{AUTHORIZED_KEYS}",
            "the managed key line is in a file sshd never reads: the key is refused",
            "add .ssh/authorized_keys to AuthorizedKeysFile (or install the key where it "
            "points) and reload sshd"))
    return findings


def check_key_files(facts: HostFacts) -> list[Finding]:
    check = "key files"
    strict = facts.effective.get("strictmodes", "yes") == "yes"
    findings: list[Finding] = []
    for path, want, kind in ((hardened.ROOT_SSH, hardened.PRIVATE[0], "folder"),
                             (AUTHORIZED_KEYS, hardened.ROOT_ONLY[0], "file")):
        fact = facts.dirs.get(path) if kind == "folder" else (
            (facts.files[path].mode, facts.files[path].uid, facts.files[path].gid)
            if path in facts.files else None)
        if fact is None:
            findings.append(error(
                check, f"{path} does not exist", "sshd finds no key for root",
                "run `invoke setup-remote`"))
            continue
        mode, uid, gid = fact
        shown = f"{path} is {mode:04o} {uid}:{gid}"
        if strict and (uid != 0 or mode & 0o022):
            findings.append(error(
                check, shown + f", not {want:04o} 0:0",
                "StrictModes: sshd ignores authorized_keys when it or its folder is owned by "
                "another user or writable by group or others: the key is refused",
                f"chown 0:0 {path} && chmod {want:04o} {path} (or `invoke setup-remote`)"))
        elif (mode, uid, gid) != (want, 0, 0):
            findings.append(warn(
                check, shown + f", not {want:04o} 0:0",
                "sshd still accepts the key, but other users can read which keys log in as "
                "root; `invoke verify` fails on it",
                f"chown 0:0 {path} && chmod {want:04o} {path} (or `invoke setup-remote`)"))
        else:
            findings.append(ok(check, shown))
    return findings


def check_key_line(key: KeyLine | None, host: HostSpec, facts: HostFacts) -> list[Finding]:
    check = "key line"
    mode_fix = ("`invoke setup-remote`" if host.forced_command == Mode.DAEMON
                else "`invoke capture-command`")
    if key is None:
        return [error(check, f"the backup key ({host.backup_pubkey}) is not in "
                             f"{AUTHORIZED_KEYS}",
                      "sshd refuses the backup key: 'Permission denied (publickey)', exit 255",
                      f"run {mode_fix}")]
    findings: list[Finding] = []
    if key.problem:
        findings.append(error(check, f"sshd cannot use the key line's options: {key.problem}",
                              "sshd skips a line whose options it cannot parse: the key is "
                              "refused", f"run {mode_fix} (it rewrites the line)"))
    if key.count > 1:
        findings.append(warn(check, f"the backup key appears on {key.count} lines",
                             "sshd uses the first; the others are dead text that may hold an "
                             "older, wider command", f"run {mode_fix} (it keeps one line)"))
    if key.command is None:
        findings.append(error(
            check, "the backup key's line has no command=",
            "under PermitRootLogin forced-commands-only sshd refuses it; under anything "
            "else it is a full root shell", f"run {mode_fix}"))
    missing = key.missing_restrictions
    if missing:
        findings.append(error(
            check, "the key line has neither `restrict` nor " + ", ".join(missing),
            "the key can open tunnels, forward the agent or X11, or get a pty: far more "
            "than running rsync", f"run {mode_fix}"))
    if key.from_ is not None and facts.client_addr and \
            not from_allows(key.from_, facts.client_addr):
        findings.append(error(
            check, f"from=\"{key.from_}\" does not match this client ({facts.client_addr} as "
                   "the server sees it)",
            "sshd refuses the key from here: 'Permission denied (publickey)', exit 255",
            "set the inventory's `from` to include that address and run setup-remote"))
    wanted = hardened.wanted_from(host.from_, facts.client_addr)
    if key.from_ != wanted and (wanted is not None or host.from_ is not None):
        says = (f"from: {host.from_}" if host.from_ is not None
                else f"no `from`: the backup host's address {facts.client_addr}")
        findings.append(warn(
            check, f"the line has from={key.from_!r}, wanted {wanted!r} (the inventory has "
                   f"{says})",
            "the installed restriction is not the one the inventory asks for"
            + (": anyone holding the backup key can log in from anywhere"
               if key.from_ is None else ""),
            f"run {mode_fix}"))
    if not findings or all(f.level is Level.OK for f in findings):
        options = ",".join(o for o in key.options if not o.lower().startswith("command="))
        findings.append(ok(check, f"command=\"{key.command}\" with {options or 'no options'}"))
    return findings


@dataclass(frozen=True)
class Capture:
    """What doctor knows of captured mode: the local record (capture-command's) and the
    command the local rsync sends now (simulated)."""

    record: Any = None            # roles.features.capture.CaptureRecord
    problem: str = ""             # the record is missing a part, damaged or for another host
    sent: tuple[str, ...] | None = None
    local_version: str = ""       # the local rsync's --version line 1


def _gate_exec_lines(text: bytes) -> list[ForcedCommand]:
    out = []
    for line in text.decode(errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("exec "):
            out.append(parse_forced_command(stripped.removeprefix("exec ")))
    return out


def check_gate(host: HostSpec, root: RootFacts, capture: Capture) -> list[Finding]:
    """Captured mode through capture-command's gate: record, drift, the installed gate."""
    check = "forced command"
    again = "run `invoke capture-command` again"
    findings: list[Finding] = []
    if capture.problem:
        return [error(check, capture.problem,
                      "the backup refuses a captured-mode run without a valid record", again)]
    record = capture.record
    if record is None:
        return [error(check, f"the forced command is the capture gate, but there is no capture "
                             f"record here ({capture_record.record_path(host)})",
                      "the backup refuses a captured-mode run without it (it was captured "
                      "from another machine, or the record was removed)", again)]
    drift = capture_record.check_drift(host, record, capture.local_version)
    sent = " ".join(capture.sent) if capture.sent else None
    if sent is not None and sent != record.sent:
        drift = (drift or "").split(": the forced command")[0] or "the command"
        drift += f"; the client now sends {sent!r}, the gate allows {record.sent!r}"
    if drift:
        findings.append(error(
            check, f"drifted since capture: {drift.split(': the forced command')[0]}",
            "the gate allows only the recorded commands: the client now sends another one "
            "and the gate refuses it (the backup itself refuses first, naming the drift)",
            again))
    gate = root.files.get(hardened.GATE)
    if gate is not None:
        for exec_line in _gate_exec_lines(gate)[:1]:
            if exec_line.dry_run:
                findings.append(error(
                    check, f"the gate's real command holds a dry-run flag: "
                           f"{exec_line.text!r}",
                    "a real run against a forced `n` breaks the protocol ('Invalid file "
                    "index') and was measured deleting destination files before it failed",
                    again))
        if gate != gate_scripts.gate_file(record).content:
            findings.append(error(
                check, f"{hardened.GATE} on the host is not the gate of the local capture "
                       "record (edited by hand, or captured from another backup host)",
                "the gate compares the client's command byte for byte: commands recorded "
                "elsewhere are refused, or an edited gate runs what nobody recorded", again))
    if root.binary is None:
        findings.append(error(
            check, f"{record.remote_rsync}, the rsync the gate runs, is gone from the host",
            "the gate's exec fails: 'connection unexpectedly closed' (exit 12)",
            "run `invoke build-rsync`, then `invoke capture-command` again"))
    elif root.version_line != record.remote_version:
        findings.append(error(
            check, f"{record.remote_rsync} is now {root.version_line!r}, captured with "
                   f"{record.remote_version!r}",
            "the captured command carries the capabilities of the rsyncs it was captured "
            "with; another build may speak differently", again))
    return findings


def check_forced_command(host: HostSpec, forced: ForcedCommand, root: RootFacts,
                         rsyncd_text: bytes | None,
                         capture: Capture | None = None,
                         found: dict[str, str] | None = None) -> list[Finding]:
    """The signatures of section 5 of the module docstring. ``found``: the rsync binaries
    on the host (path -> version line)."""
    check = "forced command"
    capture = capture or Capture()
    gate = forced.binary == hardened.GATE
    findings: list[Finding] = []
    wanted, _ = hardened.forced_rsync(host.rsync.remote_binary, found or {})
    if (forced.daemon and host.forced_command == Mode.DAEMON and wanted is not None
            and forced.binary != wanted):
        findings.append(error(
            check, f"the forced command runs {forced.binary}, not the pinned build {wanted}",
            "the two ends then run different rsyncs, the seed's protocol-mismatch pitfall; "
            "it happens when setup-remote ran before build-rsync installed the build",
            "run `invoke build-rsync` (it points the forced command at the build it "
            "installs) or `invoke setup-remote`"))
    if root.program is None:
        fix = ("run `invoke build-rsync` (it installs it) and then `invoke setup-remote`"
               if forced.binary == host.rsync.remote_binary else
               "run `invoke setup-remote` (daemon mode) or `invoke capture-command` so the "
               "command names a program that exists")
        findings.append(error(
            check, f"the forced command's program {forced.binary} does not exist on the host",
            "sshd runs the forced command whatever the client asks; its shell fails with "
            "'not found' and the client sees 'did not see server greeting' (daemon, exit 5) "
            "or 'connection unexpectedly closed' (exit 12)", fix))
    elif not forced.is_rsync and not gate:
        findings.append(warn(
            check, f"the forced command runs {forced.binary}, neither rsync nor pullback's gate",
            "doctor cannot tell which rsync it starts or what it allows",
            "make sure it execs the pinned rsync by full path"))
    if forced.daemon and host.forced_command == Mode.CAPTURED:
        findings.append(error(
            check, "the forced command is an rsync daemon (--daemon) but the inventory says "
                   "forced_command: captured, so the backup pulls root@host:/ (one colon)",
            "a single-colon client starts `rsync --server --sender` and expects its reply, "
            "but the daemon answers with its '@RSYNCD:' greeting: 'protocol version mismatch "
            "-- is your shell clean?' (the seed's error; the shell is not the problem)",
            "either set `forced_command: daemon` for this host (the backup then pulls "
            f"root@host::{host.backup.module}/), or run `invoke capture-command` to install "
            "the command the client really sends"))
    elif host.forced_command == Mode.DAEMON and not forced.daemon and (forced.is_rsync or gate):
        findings.append(error(
            check, f"the inventory uses daemon mode but the forced command is not a daemon: "
                   f"{forced.text!r}",
            f"the backup pulls root@host::{host.backup.module}/ and expects the daemon's "
            "'@RSYNCD:' greeting; a --server --sender command answers with protocol data "
            "instead (exit 5 or 12)",
            "run `invoke setup-remote` (it installs the daemon command), or set "
            "`forced_command: captured` if the capture is what you want"))
    if forced.dry_run:
        findings.append(error(
            check, f"the forced command holds a dry-run flag: {forced.text!r} ('n' in "
                   f"-{forced.short_flags})",
            "it was captured from a `-n` run; a real run against it breaks the protocol "
            "('Invalid file index', exit 2 or 12), and a real run was measured deleting "
            "destination files before it failed",
            "run `invoke capture-command` (it captures with the real options, never -n, and "
            "installs a gate that runs the real command or its dry run) and do not run a "
            "real backup until then"))
    if forced.sender and capture.sent is not None and host.forced_command == Mode.CAPTURED:
        mine = parse_forced_command(" ".join(forced.without_dry_run()))
        if not same_command(mine.argv, capture.sent):
            findings.append(error(
                check, f"drifted since capture: the forced command {forced.text!r} is not what "
                       f"the client sends now: {' '.join(capture.sent)!r}",
                "sshd runs the forced command, not the client's: when the options, the "
                "source or the local rsync changed since capture, the two ends disagree "
                "about the protocol ('Invalid file index', 'error in rsync protocol data "
                "stream', exit 2 or 12)",
                "run `invoke capture-command` again"))
    if gate and host.forced_command == Mode.CAPTURED and root.program is not None:
        findings.extend(check_gate(host, root, capture))
    if forced.daemon:
        findings.extend(check_rsyncd(host, forced, root, rsyncd_text))
    if all(f.level is Level.OK for f in findings):
        findings.insert(0, ok(check, f"{forced.text!r} fits {host.forced_command} mode"))
    return findings


_RSYNCD_ERRORS = ("no [", "uid", "gid", "path", "read only", "write only", "defined",
                  "refuse options")
_SHARED_WHY = ("any rsync daemon on the host (Debian's and Ubuntu's rsync.service starts "
               "whenever /etc/rsyncd.conf exists) serves it on TCP 873 to anyone: path = /, "
               "uid 0, no auth users, no hosts allow: /etc/shadow and every other file")


def check_rsyncd(host: HostSpec, forced: ForcedCommand, root: RootFacts,
                 text: bytes | None) -> list[Finding]:
    check = "rsyncd.conf"
    config = forced.config
    findings: list[Finding] = []
    if config != PULLBACK_RSYNCD_CONF:
        findings.append(error(
            check, f"the forced command's daemon reads {config}, not pullback's own "
                   f"{PULLBACK_RSYNCD_CONF}",
            f"a module the backup key needs in {config} is one {_SHARED_WHY}; and the key "
            f"reaches every other module of that file" if config == RSYNCD_CONF else
            "doctor cannot tell who else reads or writes that file",
            "run `invoke setup-remote` (it writes --config=" + PULLBACK_RSYNCD_CONF + ")"))
    if config != RSYNCD_CONF:
        text = root.files.get(config)
    if text is None:
        return [*findings, error(check, f"{config} does not exist",
                      "the daemon started by the forced command has no module: '@ERROR: "
                      "Unknown module' (exit 5)", "run `invoke setup-remote`")]
    try:
        problems = rsyncd.check_module(text, host.backup.module, path="/")
    except ValueError as exc:
        return [*findings, error(check, f"{config} cannot be parsed: {exc}",
                      "rsyncd refuses to start with it", "fix the file or run "
                      "`invoke setup-remote`")]
    for problem in problems:
        if problem.startswith("no ["):
            findings.append(error(
                check, f"{config}: {problem}",
                f"the pull asks for ::{host.backup.module}/: '@ERROR: Unknown module' (exit 5)",
                "run `invoke setup-remote`"))
        elif problem.startswith(("uid", "gid")):
            findings.append(error(
                check, f"{config} [{host.backup.module}]: {problem}",
                "the daemon drops to nobody: most of / is unreadable ('Permission denied "
                "(13)', exit 23, an incomplete backup)",
                f"run `invoke setup-remote` (it writes uid = 0 and gid = 0 into "
                f"[{host.backup.module}])"))
        elif problem.startswith(_RSYNCD_ERRORS):
            findings.append(error(
                check, f"{config} [{host.backup.module}]: {problem}",
                "the module does not serve exactly / read-only: a wrong or writable backup "
                "source", "run `invoke setup-remote`"))
        else:
            findings.append(warn(
                check, f"{config} [{host.backup.module}]: {problem}",
                "not fatal for a pull, but weaker than pullback's module",
                "run `invoke setup-remote`"))
    if not findings:
        findings.append(ok(check, f"[{host.backup.module}] path = /, uid = 0, gid = 0, "
                                  "read only, list = false, refuses deletes"))
    return findings


def check_mounts(host: HostSpec, root: RootFacts) -> list[Finding]:
    """Pure: the server's file systems below ``backup.source`` that a ``-x`` pull leaves
    out (roles.core.mounts.skipped), one warning each, naming the field that pulls it."""
    check, source = "mounts", host.backup.source
    if root.mountinfo is None:
        return [ok(check, "not checked: the host has no /proc/self/mountinfo")]
    if not pull.has_flag(host.backup.options, "x", "--one-file-system"):
        return [ok(check, "the pull crosses file systems (no -x in backup.options)")]
    extra = tuple(getattr(host.backup, "extra_sources", ()))
    left_out = mounts.skipped(mounts.parse_mountinfo(root.mountinfo), source,
                              host.backup.pull_exclude, extra, root.not_directories)
    findings = []
    for mount in left_out:
        relative = mount.point[len(source.rstrip("/")):]
        findings.append(warn(
            check, f"{mount.point} ({mount.fstype}) is a file system of its own: the backup "
                   f"skips it",
            f"the pull stays on the file system of {source} (-x): only the empty folder "
            f"{mount.point} is in the copy, none of its files",
            f"pull it as well with backup.extra_sources: [{mount.point}] in the inventory, "
            f"or leave it out on purpose with backup.exclude: [{relative}/*]"))
    if not findings:
        also = f" and {', '.join(extra)}" if extra else ""
        findings.append(ok(check, f"every file system below {source}{also} with files is "
                                  f"in the backup"))
    return findings


def check_rsyncd_files(host: HostSpec, facts: HostFacts) -> list[Finding]:
    """Where the module lives (either mode): none of ours left in the shared
    /etc/rsyncd.conf, and our own file and folder private to root. Problems only."""
    check = "rsyncd.conf"
    findings: list[Finding] = []
    shared = facts.content(RSYNCD_CONF)
    try:
        old = rsyncd.legacy_modules(rsyncd.parse_rsyncd_conf(shared)) if shared else ()
    except ValueError:
        old = ()
    if old:
        names = ", ".join(f"[{s.name}]" for s in old)
        findings.append(error(
            check, f"{RSYNCD_CONF} still holds pullback's old module {names} (this host was "
                   "set up by an older pullback and not migrated)",
            f"that module is one {_SHARED_WHY}",
            "run `invoke setup-remote` (it removes that module and nothing else)"))
    fact = facts.files.get(PULLBACK_RSYNCD_CONF)
    if fact is not None and host.forced_command == Mode.DAEMON and (
            fact.mode & 0o077 or (fact.uid, fact.gid) != (0, 0)):
        findings.append(error(
            check, f"{PULLBACK_RSYNCD_CONF} is mode {fact.mode:04o}, owner "
                   f"{fact.uid}:{fact.gid}, not 0600 root:root",
            "someone other than root can read it, or change the module the backup key "
            "serves (turn off read only, widen hosts allow)", "run `invoke setup-remote`"))
    elif fact is not None and host.forced_command == Mode.CAPTURED:
        findings.append(warn(
            check, f"{PULLBACK_RSYNCD_CONF} is left from daemon mode",
            "captured mode does not use it; it only confuses a later reader",
            "run `invoke setup-remote` (it removes it)"))
    folder = facts.dirs.get(PULLBACK_DIR)
    if folder is not None and (folder[0] & 0o022 or folder[1] != 0):
        findings.append(error(
            check, f"{PULLBACK_DIR} is mode {folder[0]:04o}, owner {folder[1]}:{folder[2]}",
            "whoever can write to it can replace the module file the backup key's daemon "
            "reads", "run `invoke setup-remote` (it sets 0700 root:root)"))
    return findings


@dataclass(frozen=True)
class RsyncEnd:
    path: str
    version: str | None
    protocol: int | None
    note: str = ""  # why it is not the pinned build, or why the version is unknown
    line: str = ""  # `--version` line 1


def check_rsync(host: HostSpec, local: RsyncEnd | None, remote: RsyncEnd | None) -> list[Finding]:
    check = "rsync"
    findings: list[Finding] = []
    pinned = host.rsync.version
    for label, end, fix in (
        ("local", local, "run `invoke build-rsync --local-only`"),
        ("remote", remote, "run `invoke build-rsync --remote-only`, then `invoke setup-remote` "
                           "so the forced command calls it"),
    ):
        if end is None:
            continue
        if end.version is None:
            findings.append(error(check, f"{label} rsync {end.path}: {end.note}",
                                  "the backup cannot run without it", fix))
            continue
        shown = f"{label} {end.path}: rsync {end.version}, protocol {end.protocol}"
        issues = [end.note] if end.note else []
        if end.version != pinned:
            issues.append(f"not the inventory's rsync.version {pinned}")
        if issues:
            findings.append(warn(
                check, f"{shown}; {'; '.join(issues)}",
                "the backup runs another build than the one pinned and tested; two "
                "different builds are how the seed's protocol trouble began", fix))
        else:
            findings.append(ok(check, shown))
    if local is not None and local.version is not None:
        findings.extend(check_client_exposure(host, local))
    if local and remote and local.version and remote.version and local.version != remote.version:
        findings.append(warn(
            check, f"the ends run different rsync releases: local {local.version}, remote "
                   f"{remote.version}",
            "the seed's protocol mismatch: two releases negotiate the older protocol, and "
            "what the client sends (captured mode) changes with its release",
            "run `invoke build-rsync` so both ends run rsync.version"))
    if local and remote and local.protocol and remote.protocol:
        low = min(local.protocol, remote.protocol)
        if OLDEST_PROTOCOL <= low < METADATA_PROTOCOL:
            findings.append(warn(
                check, f"protocol {low} (rsync 2.6.9 on an end): the copy has no ACLs and no "
                       "xattrs (file capabilities such as ping's cap_net_raw, SELinux labels) "
                       "and whole-second mtimes",
                "-A/-X need rsync 3.0 on both ends; a machine restored from this copy lacks "
                "them (backup.options defaults to -HS there, not -HAXS)",
                "run `invoke build-rsync` with rsync.version 3.x on both ends"))
        if low < OLDEST_PROTOCOL:
            findings.append(error(
                check, f"protocol {low} is older than rsync 3.x accepts ({OLDEST_PROTOCOL})",
                "the two ends cannot talk at all ('protocol incompatibility', exit 2)",
                "run `invoke build-rsync` so both ends run the same release"))
        elif low < MIN_GOOD_PROTOCOL:
            findings.append(warn(
                check, f"protocols {local.protocol} and {remote.protocol}: the pull speaks "
                       f"protocol {low}",
                "pre-3.0 protocols are where the seed met 'Invalid file index' and crashes; "
                f"its last-resort fallback was `--protocol={low}` on the client",
                "run `invoke build-rsync` so both ends run the same, current release"))
        else:
            same = "same" if local.protocol == remote.protocol else "they negotiate"
            findings.append(ok(check, f"protocols {local.protocol} and {remote.protocol}: "
                                      f"{same} protocol {low}, both >= {MIN_GOOD_PROTOCOL}"))
    return findings


def client_refused(host: HostSpec, local: RsyncEnd | None) -> bool:
    """backup refuses this local rsync (older than 3.4.1, no rsync.allow_vulnerable)."""
    return (local is not None and local.version is not None
            and not host.rsync.allow_vulnerable
            and client_exposure(local.version) is not None)


def check_client_exposure(host: HostSpec, local: RsyncEnd) -> list[Finding]:
    """The local rsync against the servers it pulls from: an error when backup refuses it,
    a warning when rsync.allow_vulnerable lets it run; nothing when it is 3.4.1 or newer."""
    exposure = client_exposure(local.version, f"the local rsync {local.path}")
    if exposure is None:
        return []
    fix = (f"build {MIN_SAFE_CLIENT} or newer: set rsync.version (default {DEFAULT_VERSION}) "
           "and run `invoke build-rsync`")
    if host.rsync.allow_vulnerable:
        return [warn("client rsync", exposure,
                     "rsync.allow_vulnerable: true lets backup run it anyway", fix)]
    return [error("client rsync", exposure,
                  "backup refuses to run it (exit 1) unless rsync.allow_vulnerable: true",
                  f"{fix}; or set rsync.allow_vulnerable: true knowingly")]


def check_sandbox(host: HostSpec) -> list[Finding]:
    """backup.sandbox on without bwrap: every backup of the host fails at once."""
    try:
        bwrap = runner.find_bwrap(host)
    except store.BackupError as exc:
        return [error("sandbox", str(exc), "backup and restore refuse to run",
                      "apt-get install bubblewrap, or set backup.sandbox: false")]
    if bwrap is None:
        return [warn("sandbox", "backup.sandbox is false: the local rsync runs as root "
                                "without the sandbox", "a hostile server that exploits it "
                                "could write anywhere on this machine",
                     "set backup.sandbox: true where bwrap is available")]
    return [ok("sandbox", f"the local rsync runs in {bwrap}, writing only "
                          f"{host.destination}")]


def version_end(path: str, text: str, note: str = "") -> RsyncEnd:
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    try:
        version, protocol = parse_version_output(text)
    except ValueError:
        return RsyncEnd(path, None, None, f"`--version` printed {first[:80]!r}", first)
    return RsyncEnd(path, version, protocol, note, first)


# --- talking to the host -------------------------------------------------------------------


def check_unreachable(host: HostSpec, message: str) -> Finding:
    """Classify a failed admin login: unknown or changed host key, or another reason."""
    check = "host key"
    label = known_hosts_name(host.address, host.port)
    failure = classify_ssh_failure(message)
    if failure is None or not failure.unreachable:
        try:
            offered = fetch_host_key(host.address, host.port)
            key_type, blob = offered.type, base64.b64decode(offered.blob)
        except Exception as exc:  # noqa: BLE001 - any failure: report it, classified
            message = str(exc)
            failure = classify_ssh_failure(message)
    if failure is not None and failure.unreachable:
        return error("reach", f"cannot reach sshd at {host.address}:{host.port}: "
                              f"{clean_message(message, host.name)}",
                     f"{failure.meaning}; neither the admin tasks nor the backup can connect",
                     "check address and port in the inventory, that sshd runs there, and "
                     "firewalls")
    fingerprint = fingerprint_of(blob)
    known = paramiko.HostKeys()
    with contextlib.suppress(OSError, paramiko.SSHException):
        known.load(host.known_hosts)
    entries = known.lookup(label) or {}
    if not entries:
        return error(
            check, f"{label} offers {key_type} {fingerprint}, and {host.known_hosts} has no key "
                   "for it",
            "pullback and the backup (StrictHostKeyChecking=yes) refuse an unknown host key: "
            "'Host key verification failed', exit 255",
            f"verify {fingerprint} out of band (on the server: ssh-keygen -lf "
            f"/etc/ssh/ssh_host_{key_type.removeprefix('ssh-').split('-')[0]}_key.pub), then "
            f"add `ssh-keyscan -p {host.port} {host.address}` output to {host.known_hosts}")
    expected = entries.get(key_type)
    if expected is not None and expected.asbytes() != blob:
        return error(
            check, f"HOST KEY CHANGED: {label} offers {key_type} {fingerprint}, "
                   f"{host.known_hosts} has {fingerprint_of(expected.asbytes())}",
            "a reinstalled server, or someone in the middle; the backup refuses to connect "
            "(exit 255)", "find out why it changed; only then replace the line in "
                          f"{host.known_hosts}")
    return error("reach", f"admin login as {host.admin_user} fails: {message}",
                 "pullback's admin tasks (setup-remote, doctor, verify) cannot run",
                 "check admin_user, admin_key and that the admin's key is authorized")


def local_rsync_end(host: HostSpec) -> tuple[RsyncEnd | None, str | None]:
    try:
        path, note = runner.find_local_rsync(host)
    except store.BackupError as exc:
        return RsyncEnd(host.rsync.local_binary, None, None, str(exc)), None
    result = subprocess.run([path, "--version"], capture_output=True, check=False, timeout=30)
    line = result.stdout.decode(errors="replace")
    if note:
        note = f"{host.rsync.local_binary} is not built, PATH's rsync is used"
    return version_end(path, line, note or ""), path


def pull_argv(host: HostSpec, local_rsync: str, dest: str, *, single_colon: bool) -> list[str]:
    """The backup's argv (``pull.build_argv``) with -n, pulling only ``PROBE_PATH``."""
    # One path only: without backup.extra_sources (no -R, one source to replace).
    daemon_host = dataclasses.replace(
        host, forced_command=Mode.DAEMON,
        backup=dataclasses.replace(host.backup, extra_sources=()))
    argv = pull.build_argv(daemon_host, dry_run=True, tty=False, local_rsync=local_rsync,
                             dest=dest)
    address = f"[{host.address}]" if ":" in host.address else host.address
    argv[-2] = (f"root@{address}:{PROBE_PATH}" if single_colon
                else f"root@{address}::{host.backup.module}{PROBE_PATH}")
    return argv


def try_pull(host: HostSpec, local_rsync: str, *, single_colon: bool) -> Finding:
    check = "test pull"
    with tempfile.TemporaryDirectory(prefix="pullback-doctor-") as tmp:
        argv = pull_argv(host, local_rsync, tmp, single_colon=single_colon)
        shown = argv[-2]
        with contextlib.suppress(store.BackupError):  # no bwrap: check_sandbox says so
            argv = runner.sandboxed(host, argv, runner.find_bwrap(host), writable=[Path(tmp)])
        try:
            result = subprocess.run(argv, capture_output=True, check=False,
                                    timeout=PULL_TIMEOUT, stdin=subprocess.DEVNULL,
                                    env=runner.rsync_env())
        except subprocess.TimeoutExpired:
            return error(check, f"dry-run pull of {shown} hung for {PULL_TIMEOUT:.0f} s",
                         "a backup would hang the same way",
                         "check the network and that the forced command is rsync")
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return ok(check, f"dry-run pull of {shown} with the backup key works")
    scanner = pull.OutputScanner()
    scanner.feed(output + b"\n")
    scanner.close()
    text = output.decode(errors="replace")
    # rsync's and ssh's error lines, plus the remote shell's ("sh: 1: /x/rsync: not found")
    # and the gate's, which the backup's scanner does not look for: output order.
    wanted = set(scanner.errors)
    lines = list(dict.fromkeys(
        line.strip() for line in text.replace("\r", "\n").splitlines()
        if line.strip() and (line.strip() in wanted or signature(line))))
    if len(lines) > 3:
        lines = [*lines[:2], lines[-1]]  # the first (the cause) and rsync's summary
    known = signature(text)
    explained = explain_rsync_error(text, ssh_first=False).splitlines()
    return error(
        check, f"dry-run pull of {shown} with the backup key fails: rsync exit "
               f"{result.returncode}: {' / '.join(lines) or 'no message'}",
        f"{explain_exit(result.returncode)}"
        + (f" (the '{known}' signature)" if known else ""),
        explained[1].strip() if known else "see the findings above")


def _remote_binary(key: KeyLine | None, host: HostSpec) -> str:
    forced = key.forced if key else None
    if forced and forced.binary and forced.is_rsync:
        return forced.binary
    return host.rsync.remote_binary


def _admin_shell(conn: Session, host: HostSpec, findings: list[Finding]) -> None:
    """The clean-shell test for the admin login; a second trip only when it is not clean."""
    _, out, err = conn.exec_raw("true")
    probes: tuple[tuple[int, str], ...] = ()
    shell = ""
    if out or err:
        probe = conn.run(admin_probe_script())
        with contextlib.suppress(ValueError):
            lines = _after_marker(probe.stdout)
            probes = parse_probes(lines)
            shell = next((ln.split(" ", 1)[1] for ln in lines if ln.startswith("SHELL ")), "")
    findings.extend(check_clean_shell(host.admin_user, shell, out, err, probes, root=False))


def _capture_info(host: HostSpec, forced: ForcedCommand | None, local: RsyncEnd | None,
                  local_path: str | None, findings: list[Finding]) -> Capture:
    if host.forced_command != Mode.CAPTURED:
        return Capture()
    record, problem = None, ""
    try:
        record = capture_record.load_record(host)
    except CaptureError as exc:
        problem = str(exc)
    sent = None
    if forced is not None and (forced.sender or forced.binary == hardened.GATE) and local_path:
        try:
            sent = simulate_sent_command(local_path, host)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            findings.append(warn("forced command", f"cannot tell what the client sends: {exc}",
                                 "the drift check is skipped", "check the local rsync"))
    return Capture(record, problem, sent, local.line if local else "")


def _pull_or_skip(host: HostSpec, forced: ForcedCommand | None, local_path: str) -> Finding:
    if host.forced_command == Mode.CAPTURED and forced is not None and not forced.daemon:
        if forced.binary == hardened.GATE:
            return ok("test pull", "skipped: the gate runs only the recorded pull of "
                                   "backup.source and its dry run; `invoke backup --dry-run` "
                                   "goes through it")
        return ok("test pull", "skipped: the forced command serves only the captured source, "
                               "whatever path a test pull asks for")
    return try_pull(host, local_path, single_colon=host.forced_command == Mode.CAPTURED)


@dataclass(frozen=True)
class DestinationFacts:
    dest: str
    problem: str | None      # folders.check_folder's refusal, for DEST or its state folder
    mode: int | None         # DEST's permission bits; None when it does not exist yet
    layout: str | None       # mirror mode: store.MirrorLayout.state; None for snapshots
    mount: folders.Mount | None


def check_destination(facts: DestinationFacts) -> list[Finding]:
    """Pure: the backup host's side of the destination."""
    check, dest = "destination", facts.dest
    if facts.problem:
        return [error(check, facts.problem,
                      "another user could swap the folders that hold copies of root's files; "
                      "backup refuses to run", "the fix named above")]
    findings: list[Finding] = []
    if facts.mode is not None and facts.mode != 0o700:
        findings.append(warn(check, f"{dest} has mode {facts.mode:04o}",
                             "local users could reach the copies of the server's setuid "
                             "binaries and device nodes inside it",
                             f"the next backup makes it 0700 (or: chmod 700 {dest})"))
    if facts.layout in ("old", "migrating"):
        findings.append(warn(check, f"{dest} is in the old mirror layout (the copy's top "
                                    f"level directly in it)",
                             "the copy belongs in DEST/tree, inside the 0700 container",
                             "the next backup moves it there (renames, nothing is copied)"))
    if facts.mount is not None:
        missing = folders.missing_mount_options(facts.mount)
        if missing:
            findings.append(warn(
                check, f"{facts.mount.point} (holding {dest}) is mounted without "
                       f"{' and '.join(missing)}",
                "setuid binaries and device nodes in the copies stay usable to anyone who "
                "reaches them",
                f"mount the backup file system with nosuid,nodev (fstab options, or: mount "
                f"-o remount,nosuid,nodev {facts.mount.point})"))
    if not findings:
        where = f", on {facts.mount.point} (nosuid,nodev)" if facts.mount else ""
        findings.append(ok(check, f"{dest}: private{where}"))
    return findings


def gather_destination(host: HostSpec, mountinfo: str | None = None) -> DestinationFacts:
    """Local reads only: lstat of the folders on the way, DEST's entries, the mount table."""
    dest = host.destination.rstrip("/")
    problem = None
    try:
        folders.check_folder(dest)
        folders.check_folder(store.state_dir(host))
    except folders.FolderError as exc:
        problem = str(exc)
    try:
        mode: int | None = os.lstat(dest).st_mode & 0o7777
    except OSError:
        mode = None
    layout = None
    if not host.backup.snapshots:
        try:
            layout = store.read_mirror_layout(Path(dest), store.state_dir(host)).state
        except (store.BackupError, OSError):
            layout = None
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    # The nearest existing folder: a DEST not created yet will live on its parent's mount.
    near = dest
    while not os.path.exists(near) and near != "/":
        near = os.path.dirname(near)
    mount = folders.mount_of(folders.parse_mountinfo(mountinfo), os.path.realpath(near))
    return DestinationFacts(dest, problem, mode, layout, mount)


def diagnose(host: HostSpec, sessions: Run | None = None) -> Report:
    """Every check for one host; never raises for a host problem (it becomes a finding)."""
    started = time.monotonic()
    report = Report(host.name, f"{host.address}:{host.port}")
    findings = report.findings
    local, local_path = local_rsync_end(host)
    try:
        blob = rootkey.parse_public_key(Path(host.backup_pubkey).read_text()).blob
    except (OSError, ValueError) as exc:
        blob = None
        findings.append(error("backup key", f"cannot read {host.backup_pubkey}: {exc}",
                              "without the backup key there is no backup",
                              "run `invoke keygen`"))
    forced: ForcedCommand | None = None
    unreachable = False
    try:
        conn = (sessions or Run()).open(host)
    except ConnectError as exc:
        findings.append(check_unreachable(host, str(exc)))
        # No sshd answered: the test pull would only wait for the same failure (up to
        # ConnectTimeout) and then blame rsync's missing greeting.
        unreachable = findings[-1].check == "reach" and findings[-1].what.startswith(
            "cannot reach")
        conn = None
    if conn is not None:
        try:
            key = conn.server_key()
            findings.append(ok("host key", f"{key.get_name()} "
                                           f"{fingerprint_of(key.asbytes())} matches "
                                           f"{host.known_hosts}"))
            _admin_shell(conn, host, findings)
            facts = gather(conn, [host.rsync.remote_binary])
            key_line = find_key_line(facts.content(AUTHORIZED_KEYS), blob) if blob else None
            forced = key_line.forced if key_line else None
            capture = _capture_info(host, forced, local, local_path, findings)
            gate = forced is not None and forced.binary == hardened.GATE
            rsync = (capture.record.remote_rsync if gate and capture.record
                     else _remote_binary(key_line, host))
            files = [hardened.GATE] if gate else []
            if forced is not None and forced.daemon and forced.config != RSYNCD_CONF:
                files.append(forced.config)
            script = root_script(forced.binary if forced else "", rsync, files,
                                 facts.client_addr)
            root = parse_root_report(conn.sudo_script(script).stdout)
            if root.shell:
                findings.extend(check_clean_shell("root", root.shell, root.root_stdout,
                                                  root.root_stderr, root.probes, root=True))
            remote = (version_end(root.binary, root.version_line) if root.binary else
                      RsyncEnd(rsync, None, None, "does not exist on the host"))
            findings.extend(check_rsync(host, local, remote))
            findings.extend(check_sshd(facts))
            findings.extend(check_key_files(facts))
            if blob:
                findings.extend(check_key_line(key_line, host, facts))
            if forced is not None:
                findings.extend(check_forced_command(host, forced, root,
                                                     facts.content(RSYNCD_CONF), capture,
                                                     found=facts.rsync))
            findings.extend(check_rsyncd_files(host, facts))
            findings.extend(check_mounts(host, root))
        except Exception as exc:  # noqa: BLE001 - a broken probe is a finding, not a crash
            findings.append(error("doctor", f"{type(exc).__name__}: {exc}",
                                  "doctor could not finish its checks",
                                  "run it again; report it if it stays"))
        finally:
            conn.close()
    if unreachable:
        findings.append(ok("test pull", "skipped: no sshd answered (see reach)"))
    elif blob and local_path and client_refused(host, local):
        findings.append(ok("test pull", "skipped: backup refuses the local rsync (see "
                                        "client rsync)"))
    elif blob and local_path:
        findings.append(_pull_or_skip(host, forced, local_path))
    findings.extend(check_sandbox(host))
    findings.extend(check_destination(gather_destination(host)))
    report.seconds = time.monotonic() - started
    return report


def diagnose_all(hosts: list[HostSpec], sessions: Run | None = None) -> list[Report]:
    sessions = sessions or Run()

    def failed(host: HostSpec, exc: Exception) -> Report:
        return Report(host.name, f"{host.address}:{host.port}", [error(
            "doctor", f"{type(exc).__name__}: {exc}", "doctor could not finish its checks",
            "run it again; report it if it stays")])

    return fleet.for_each(hosts, lambda h: diagnose(h, sessions), failed, parallel=8)


# --- output --------------------------------------------------------------------------------

_INDENT = " " * 24


def format_report(report: Report) -> str:
    lines = [f"{report.host} ({report.target})"]
    for f in report.findings:
        lines.append(f"  {f.level:6} {f.check:14} {f.what}")
        if f.level is not Level.OK:
            lines.append(f"{_INDENT}why: {f.why}")
            lines.append(f"{_INDENT}fix: {f.fix}")
    errors, warnings = len(report.errors), len(report.warnings)
    lines.append(f"  => {errors} error{'s' * (errors != 1)}, {warnings} "
                 f"warning{'s' * (warnings != 1)} ({report.seconds:.1f} s)")
    return "\n".join(lines) + "\n"
