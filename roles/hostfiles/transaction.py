"""Root files on a host, changed as one transaction: planned in Python, applied by one
root script, rolled back on any failure.

Order on the host, all in ONE ``sudo sh -c`` round trip:
  for each file that differs: check it is unchanged since it was read -> write a candidate
  next to it (same owner and mode) -> validate the candidate (``sshd -t -f``; the key line
  with ``ssh-keygen -l``; ``sh -n`` for scripts of ours) -> keep a ``.pullback-bak`` copy ->
  atomic ``mv -T`` into place; then, when sshd_config changed: ``sshd -t`` on the whole
  configuration and ``sshd -T -C`` for the backup host's connection must show the wanted
  PermitRootLogin (a drop-in or a Match block can override the edit) -> reload
  (``systemctl reload`` or SIGHUP to the pid in sshd's pidfile). Any failure restores every
  file already replaced and exits non-zero before sshd is signalled.
Then, from the client: a NEW admin connection (the first one stays open) must log in and
use sudo; if it cannot, the backups are restored over the first connection and sshd is
reloaded again.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import posixpath
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from roles.core import platforms
from roles.core.diffs import unified
from roles.core.hardened import PERMIT_ROOT_LOGIN, PRIVATE, ROOT_SSH, SSHD_CONFIG
from roles.core.outcome import Outcome
from roles.core.sshd_output import parse_sshd_T
from roles.remote.facts import FileFact, parse_report
from roles.remote.session import ConnectError, Session

if TYPE_CHECKING:
    from roles.remote.facts import HostFacts


BACKUP_SUFFIX = ".pullback-bak"


class SetupError(Exception):
    pass


@dataclass(frozen=True)
class FileChange:
    step: str            # "sshd_config", "authorized_keys", "rsyncd.conf", ...
    path: str
    old: bytes | None
    new: bytes | None    # None: remove the file (kept as FILE.pullback-bak)
    mode: int
    uid: int
    gid: int
    check_line: str | None = None  # authorized_keys: the managed line, for ssh-keygen -l
    check_sh: bool = False         # a script of ours: `sh -n` must accept the candidate

    def diff(self) -> str:
        return unified(self.path, self.old, self.new)


@dataclass(frozen=True)
class SetupPlan:
    host: str
    changes: tuple[FileChange, ...]
    fix_root_ssh: bool            # /root/.ssh missing or not 0700 root:root
    reload_sshd: bool
    client_addr: str
    sshd: str
    service: str | None
    pidfile: str
    forced_command: str | None
    warnings: tuple[str, ...] = ()
    steps: dict[str, str] = field(default_factory=dict)  # step -> "ok" | "changed"
    create_root_ssh: bool = False  # /root/.ssh does not exist: a failure removes it again
    # (mode, uid, gid) of an existing /root/.ssh this plan sets to 0700 root:root: a failure
    # (and the rollback) puts them back.
    root_ssh_was: tuple[int, int, int] | None = None
    make_dirs: tuple[str, ...] = ()  # pullback's own folders to create / set to 0700 root
    new_dirs: tuple[str, ...] = ()   # those of make_dirs that do not exist yet: a rollback
                                     # removes them again (when empty)

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.fix_root_ssh or bool(self.make_dirs)


def facts_after(facts: HostFacts, plan: SetupPlan) -> HostFacts:
    """The facts as they are once ``plan`` was applied (pure): lets a second plan follow the
    first one without reading the host again; the apply script's "unchanged since it was
    read" guard still catches anyone else's edit in between."""
    files = dict(facts.files)
    for change in plan.changes:
        if change.new is None:
            files.pop(change.path, None)
            continue
        files[change.path] = FileFact(change.path, change.new, change.mode, change.uid,
                                      change.gid)
    dirs = dict(facts.dirs)
    for folder in plan.make_dirs:
        dirs[folder] = PRIVATE
    if plan.fix_root_ssh:
        dirs[ROOT_SSH] = PRIVATE
    effective = dict(facts.effective)
    if plan.reload_sshd:
        effective["permitrootlogin"] = PERMIT_ROOT_LOGIN
    removed = {c.path for c in plan.changes if c.new is None}
    return dataclasses.replace(facts, files=files, dirs=dirs, effective=effective,
                               missing=(facts.missing | removed) - set(files))


def merge_facts(facts: HostFacts, more: HostFacts) -> HostFacts:
    """``facts`` plus the files and folders of a second, smaller read (``gather_files``)."""
    return dataclasses.replace(
        facts, files={**facts.files, **more.files}, dirs={**facts.dirs, **more.dirs},
        missing=(facts.missing | more.missing) - set(more.files),
    )


def _q(value: str) -> str:
    return shlex.quote(value)


def reload_command(plan: SetupPlan) -> str:
    if plan.service:
        return f"systemctl reload {_q(plan.service)}"
    return f'kill -HUP "$(cat {_q(plan.pidfile)})"'


def apply_script(plan: SetupPlan) -> str:
    """The root script that applies ``plan`` atomically, or restores and fails."""
    out = [
        "set -u",
        "umask 077",
        f"sshd={_q(plan.sshd)}",
        "rd=0",
        "rs=0",
        *(f"d{i}=0" for i in range(len(plan.make_dirs))),
    ]
    restore = ["restore() {"]
    for i, change in enumerate(plan.changes):
        out.append(f"r{i}=0")
        target, bak = _q(change.path), _q(change.path + BACKUP_SUFFIX)
        undo = f"mv -fT {bak} {target}" if change.old is not None else f"rm -f {target}"
        restore.append(f'  if [ "$r{i}" = 1 ]; then {undo}; fi')
    restore.append("  :")
    restore.append("}")
    cands = " ".join(_q(c.path + ".pullback-new") for c in plan.changes if c.new is not None)
    remove_cands = f"rm -f {cands} 2>/dev/null; " if cands else ""
    out += restore
    # A /root/.ssh (or folder of ours) this script created goes too: "nothing changed" must
    # hold for folders.
    remove_dirs = "".join(
        f'if [ "$d{i}" = 1 ]; then rmdir {_q(folder)} 2>/dev/null; fi; '
        for i, folder in reversed(list(enumerate(plan.make_dirs))))
    put_back = ""
    if plan.root_ssh_was is not None:
        put_back = f'if [ "$rs" = 1 ]; then {_put_back_root_ssh(plan.root_ssh_was)}; fi; '
    out.append(
        "fail() { printf 'PULLBACK_FAIL %s\\n' \"$*\"; restore; "
        f"{remove_cands}"
        f'if [ "$rd" = 1 ]; then rmdir {ROOT_SSH} 2>/dev/null; fi; {put_back}{remove_dirs}'
        "exit 1; }"
    )
    if plan.fix_root_ssh:
        out.append(f"[ -d {ROOT_SSH} ] || {{ mkdir {ROOT_SSH} && rd=1; }} || "
                   f"fail 'cannot create {ROOT_SSH}'")
        out.append('[ "$rd" = 1 ] || rs=1')  # an existing folder: a failure puts it back
        out.append(f"chown 0:0 {ROOT_SSH} && chmod 0700 {ROOT_SSH} || fail 'cannot set "
                   f"{ROOT_SSH} to 0700 root:root'")
    for i, folder in enumerate(plan.make_dirs):
        # Missing parents (/usr/local/libexec) get the usual 0755, only our folder is 0700.
        parent, target = _q(posixpath.dirname(folder)), _q(folder)
        out.append(f"[ -d {target} ] || {{ (umask 022 && mkdir -p {parent}) && mkdir {target} "
                   f"&& d{i}=1; }} || fail {_q('cannot create ' + folder)}")
        out.append(f"chown 0:0 {target} && chmod 0700 {target} || "
                   f"fail {_q('cannot set ' + folder + ' to 0700 root:root')}")
    # Stage and validate every candidate before anything is replaced.
    for change in plan.changes:
        target, cand = _q(change.path), _q(change.path + ".pullback-new")
        if change.old is None:
            appeared = _q(change.path + " appeared since it was read; run again")
            out.append(f"[ ! -e {target} ] || fail {appeared}")
        else:
            digest = hashlib.sha256(change.old).hexdigest()
            out.append(
                f"printf '%s  %s\\n' {digest} {target} | sha256sum -c --status || "
                f"fail {_q(change.path + ' changed since it was read; run again')}"
            )
        if change.new is None:
            continue  # a removal: nothing to stage
        payload = base64.b64encode(change.new).decode()
        cannot = _q("cannot write " + change.path)
        out.append(f"printf '%s' {payload} | base64 -d > {cand} || fail {cannot}")
        out.append(
            f"chown {change.uid}:{change.gid} {cand} && chmod {change.mode:04o} {cand} || "
            f"fail {_q('cannot set owner and mode of ' + change.path)}"
        )
        if change.step == "sshd_config" and change.path == SSHD_CONFIG:
            out.append(
                f'out=$("$sshd" -t -f {cand} 2>&1) || '
                f'fail "sshd -t rejects the new {change.path}: $out"'
            )
        if change.check_sh:
            out.append(f'out=$(sh -n {cand} 2>&1) || fail "sh -n rejects the new {change.path}: '
                       '$out"')
        if change.check_line is not None:
            line_file = _q(change.path + ".pullback-line")
            out.append(
                f"printf '%s\\n' {_q(change.check_line)} > {line_file} && "
                f'out=$(ssh-keygen -l -f {line_file} 2>&1); rc=$?; rm -f {line_file}; '
                f'[ "$rc" = 0 ] || fail "ssh-keygen rejects the key line: $out"'
            )
    # Replace, keeping one backup of what was there.
    for i, change in enumerate(plan.changes):
        target, cand = _q(change.path), _q(change.path + ".pullback-new")
        bak = _q(change.path + BACKUP_SUFFIX)
        if change.old is not None:
            out.append(f"cp -p {target} {bak} || fail {_q('cannot back up ' + change.path)}")
        if change.new is None:
            out.append(f"rm -f {target} && r{i}=1 || fail {_q('cannot remove ' + change.path)}")
            continue
        cannot = _q("cannot replace " + change.path)
        out.append(f"mv -fT {cand} {target} && r{i}=1 || fail {cannot}")
    if plan.reload_sshd:
        addr = plan.client_addr
        spec = _q(platforms.connection_spec(addr))
        out.append('out=$("$sshd" -t 2>&1) || fail "sshd -t rejects the configuration: $out"')
        out.append(
            f'eff=$("$sshd" -T -C {spec} 2>/dev/null | '
            "awk '$1==\"permitrootlogin\"{print $2; exit}')"
        )
        out.append(
            f'[ "$eff" = {PERMIT_ROOT_LOGIN} ] || fail "after the edit sshd would still apply '
            f'PermitRootLogin $eff to root from {addr} (another file or a Match block decides)"'
        )
        out.append(f"{reload_command(plan)} || fail 'reloading sshd failed'")
    out.append("printf 'PULLBACK_OK\\n'")
    return "\n".join(out) + "\n"


def _put_back_root_ssh(was: tuple[int, int, int]) -> str:
    mode, uid, gid = was
    return f"chown {uid}:{gid} {ROOT_SSH} && chmod {mode:04o} {ROOT_SSH}"


def rollback_script(plan: SetupPlan) -> str:
    """Put back every file ``plan`` replaced, and reload sshd."""
    out = ["set -u", "rc=0"]
    for change in plan.changes:
        target, bak = _q(change.path), _q(change.path + BACKUP_SUFFIX)
        if change.old is None:
            out.append(f"rm -f {target} || rc=1")
        else:
            out.append(f"mv -fT {bak} {target} || rc=1")
    for folder in reversed(plan.new_dirs):
        out.append(f"rmdir {_q(folder)} 2>/dev/null || :")  # only when empty: ours alone
    if plan.create_root_ssh:
        out.append(f"rmdir {ROOT_SSH} 2>/dev/null || :")  # only when empty: ours alone
    elif plan.root_ssh_was is not None:
        out.append(f"{_put_back_root_ssh(plan.root_ssh_was)} || rc=1")
    if plan.reload_sshd:
        out.append(f"{reload_command(plan)} || rc=1")
    out.append('exit "$rc"')
    return "\n".join(out) + "\n"


def _script_error(result: Any) -> str | None:
    for line in result.stdout.splitlines():
        if line.startswith("PULLBACK_FAIL "):
            return line.removeprefix("PULLBACK_FAIL ")
    if "PULLBACK_OK" in result.stdout and result.exited == 0:
        return None
    detail = (result.stderr or result.stdout).strip().splitlines()
    return f"the root script failed (exit {result.exited}): {detail[-1] if detail else ''}"


def check_new_login(s: Session, plan: SetupPlan, attempts: int = 10) -> None:
    """Open a NEW admin login to the session's host (same run), use sudo, and confirm the
    effective setting."""
    spec = platforms.connection_spec(plan.client_addr)
    last = ""
    for _ in range(attempts):
        try:
            fresh = s.reopen()
        except ConnectError as exc:
            last = str(exc)
            time.sleep(0.3)
            continue
        with fresh:
            result = fresh.run([plan.sshd, "-T", "-C", spec], sudo=True)
        if result.exited != 0:
            raise SetupError(f"new admin login works but sudo sshd -T failed: {result.stderr}")
        value = parse_sshd_T(result.stdout).get("permitrootlogin")
        if value != PERMIT_ROOT_LOGIN:
            raise SetupError(f"after reload sshd applies PermitRootLogin {value!r}, "
                             f"not {PERMIT_ROOT_LOGIN}")
        return
    raise SetupError(f"a new admin login fails after the reload: {last}")


def apply(s: Session, plan: SetupPlan,
          check_login: Callable[[Session, SetupPlan], None] = check_new_login) -> Outcome:
    host = s.host
    steps = dict(plan.steps)
    if not plan.changed:
        return Outcome(host.name, steps, warnings=plan.warnings)
    result = s.sudo_script(apply_script(plan))
    error = _script_error(result)
    if error:
        return Outcome(host.name, steps, error=f"{error}; nothing changed",
                       warnings=plan.warnings)
    actions = ("reloaded sshd",) if plan.reload_sshd else ()
    if plan.reload_sshd:
        try:
            check_login(s, plan)
        except Exception as exc:  # noqa: BLE001 - any failure here means: roll back
            undo = s.sudo_script(rollback_script(plan))
            state = "restored and reloaded" if undo.exited == 0 else \
                f"RESTORE FAILED (exit {undo.exited}): {undo.stderr.strip()}"
            return Outcome(host.name, steps, error=f"{exc}; {state}", warnings=plan.warnings)
    return Outcome(host.name, steps, warnings=plan.warnings, actions=actions)


def read_files_script(paths: list[str], dirs: list[str], clear: list[str]) -> str:
    """Report ``paths`` and ``dirs`` in the fact report's format, then remove ``clear``."""
    out = [
        "set -u",
        "emit() {",
        "  if [ -f \"$1\" ]; then",
        "    printf 'FILE %s %s\\n' \"$(stat -c '%a %u %g' \"$1\")\" \"$1\"",
        "    base64 -w0 < \"$1\"; echo",
        "  else",
        "    printf 'MISSING %s\\n' \"$1\"",
        "  fi",
        "}",
    ]
    out += [f"emit {_q(path)}" for path in paths]
    out += [f"if [ -d {_q(d)} ]; then printf 'DIR %s %s\\n' \"$(stat -c '%a %u %g' {_q(d)})\" "
            f"{_q(d)}; fi" for d in dirs]
    out += [f"rm -f {_q(path)} || exit 1" for path in clear]
    out.append("echo END")
    return "\n".join(out) + "\n"


def gather_files(s: Session, paths: Iterable[str], dirs: Iterable[str] = (),
                 clear: Iterable[str] = ()) -> HostFacts:
    """Read a few root-only files and folders in one round trip (then remove ``clear``).

    The answer is a partial ``HostFacts`` (files, missing, dirs): merge it with
    ``merge_facts``. It is a separate read so that the main fact report stays the same for
    every mode.
    """
    paths = list(paths)
    result = s.sudo_script(read_files_script(paths, list(dirs), list(clear)))
    if result.exited != 0 or not result.stdout.rstrip().endswith("END"):
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"reading {', '.join(paths) or 'files'} as root failed "
                           f"(exit {result.exited}): {detail[-1] if detail else 'no output'}")
    return parse_report(result.stdout.rstrip("\n"))
