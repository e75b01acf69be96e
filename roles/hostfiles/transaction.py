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
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from roles.core import platforms
from roles.core.diffs import unified
from roles.core.hardened import PERMIT_ROOT_LOGIN, PRIVATE, ROOT_SSH, SSHD_CONFIG
from roles.core.outcome import Outcome, State
from roles.core.render import render
from roles.core.sshd_output import parse_sshd_T
from roles.remote.facts import FileFact, parse_report
from roles.remote.session import ConnectError, Exchange, Session, SudoError

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
    steps: dict[str, State] = field(default_factory=dict)
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


def reload_command(plan: SetupPlan) -> str:
    return render("scripts/reload_sshd.sh.j2", service=plan.service,
                  pidfile=plan.pidfile).rstrip("\n")


def _root_ssh_was(plan: SetupPlan) -> dict[str, object] | None:
    if plan.root_ssh_was is None:
        return None
    mode, uid, gid = plan.root_ssh_was
    return {"mode": f"{mode:04o}", "uid": uid, "gid": gid}


def _changes(plan: SetupPlan) -> list[dict[str, object]]:
    """Each change as the scripts use it; the values are quoted in the templates."""
    return [{
        "i": i, "path": c.path, "bak": c.path + BACKUP_SUFFIX, "cand": c.path + ".pullback-new",
        "line_file": c.path + ".pullback-line", "had": c.old is not None,
        "writes": c.new is not None, "uid": c.uid, "gid": c.gid, "mode": f"{c.mode:04o}",
        "digest": hashlib.sha256(c.old).hexdigest() if c.old is not None else "",
        "payload": base64.b64encode(c.new).decode() if c.new is not None else "",
        "check_sshd": c.step == "sshd_config" and c.path == SSHD_CONFIG,
        "check_sh": c.check_sh, "check_line": c.check_line,
    } for i, c in enumerate(plan.changes)]


def apply_script(plan: SetupPlan) -> str:
    """The root script that applies ``plan`` atomically, or restores and fails."""
    changes = _changes(plan)
    return render(
        "scripts/apply.sh.j2", sshd=plan.sshd, changes=changes,
        # A /root/.ssh (or folder of ours) this script created goes too on failure: "nothing
        # changed" must hold for folders. Missing parents (/usr/local/libexec) get the usual
        # 0755, only our folder is 0700.
        dirs=[{"i": i, "path": d, "parent": posixpath.dirname(d)}
              for i, d in enumerate(plan.make_dirs)],
        candidates=[c["cand"] for c in changes if c["writes"]], root_ssh=ROOT_SSH,
        root_ssh_was=_root_ssh_was(plan), fix_root_ssh=plan.fix_root_ssh,
        reload=reload_command(plan) if plan.reload_sshd else "",
        spec=platforms.connection_spec(plan.client_addr), client_addr=plan.client_addr,
        permit_root_login=PERMIT_ROOT_LOGIN)


def rollback_script(plan: SetupPlan) -> str:
    """Put back every file ``plan`` replaced, and reload sshd."""
    return render(
        "scripts/rollback.sh.j2", changes=_changes(plan), new_dirs=list(plan.new_dirs),
        create_root_ssh=plan.create_root_ssh, root_ssh=ROOT_SSH,
        root_ssh_was=_root_ssh_was(plan),
        reload=reload_command(plan) if plan.reload_sshd else "")


def _script_error(result: Any) -> str | None:
    for line in result.stdout.splitlines():
        if line.startswith("PULLBACK_FAIL "):
            return line.removeprefix("PULLBACK_FAIL ")
    if "PULLBACK_OK" in result.stdout and result.exited == 0:
        return None
    detail = (result.stderr or result.stdout).strip().splitlines()
    return f"the root script failed (exit {result.exited}): {detail[-1] if detail else ''}"


def retry_delays(first: float = 0.01, longest: float = 0.25,
                 within: float = 5.0) -> Iterator[float]:
    """Pauses between the lockout check's login attempts: short at first, doubling up to
    ``longest``, ``within`` seconds in all.

    After the reload sshd re-executes itself and refuses connections until it listens
    again (measured in the lab: the first login 10-70 ms after the reload is refused,
    every time). A refusal is answered at once, so short first pauses cost nothing; a
    fixed 0.3 s pause made a first run 0.3 s slower on every host."""
    spent, delay = 0.0, first
    while spent + delay <= within:
        yield delay
        spent += delay
        delay = min(delay * 2, longest)


def new_login(s: Session, delays: Callable[[], Iterable[float]] = retry_delays,
              sleep: Callable[[float], None] = time.sleep) -> Session:
    """A NEW admin login to the session's host (same run). A login refused or cut off while
    sshd restarts is tried again (``delays``); a failed authentication is the lockout
    itself: SetupError at once, no second try."""
    pauses = iter(delays())
    while True:
        try:
            return s.reopen()
        except ConnectError as exc:
            pause = next(pauses, None) if exc.passing else None
            if pause is None:
                raise SetupError(f"a new admin login fails after the reload: {exc}") from None
            sleep(pause)


def _sudo_on(fresh: Session, argv: list[str]) -> Any:
    """``argv`` as root on a new login, which is closed after; SetupError when the login
    breaks off (a SudoError stays what it is)."""
    try:
        with fresh:
            return fresh.run(argv, sudo=True)
    except SudoError:
        raise
    except Exception as exc:  # noqa: BLE001 - paramiko's and the socket's: roll back
        raise SetupError("the new admin login was cut off: "
                         f"{str(exc) or type(exc).__name__}") from None


def check_new_login(s: Session, plan: SetupPlan,
                    delays: Callable[[], Iterable[float]] = retry_delays,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Open a NEW admin login (``new_login``), use sudo, and confirm the effective
    setting."""
    spec = platforms.connection_spec(plan.client_addr)
    result = _sudo_on(new_login(s, delays, sleep), [plan.sshd, "-T", "-C", spec])
    if result.exited != 0:
        raise SetupError(f"new admin login works but sudo sshd -T failed: {result.stderr}")
    value = parse_sshd_T(result.stdout).get("permitrootlogin")
    if value != PERMIT_ROOT_LOGIN:
        raise SetupError(f"after reload sshd applies PermitRootLogin {value!r}, "
                         f"not {PERMIT_ROOT_LOGIN}")


def login_after_rollback(s: Session) -> str | None:
    """None when a NEW admin login works again (and uses sudo) once the files are back,
    else why not: then the files as they were lock the admin out by themselves (an edit
    on disk that sshd had not loaded before setup-remote's reload)."""
    try:
        result = _sudo_on(new_login(s), ["true"])
    except (SetupError, SudoError) as exc:
        return str(exc)
    return None if result.exited == 0 else f"sudo true failed: {result.stderr.strip()}"


def apply(s: Session, plan: SetupPlan,
          check_login: Callable[[Session, SetupPlan], None] = check_new_login,
          via: Exchange | None = None) -> Outcome:
    """Apply ``plan``: as its own root command, or (``via``) as the answer to the command
    that gathered the facts, on the same SSH session."""
    host = s.host
    steps = dict(plan.steps)
    if not plan.changed:
        if via is not None:
            via.finish(None)
        return Outcome(host.name, steps, warnings=plan.warnings)
    result = via.finish(apply_script(plan)) if via else s.sudo_script(apply_script(plan))
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
            if undo.exited != 0:
                state = f"RESTORE FAILED (exit {undo.exited}): {undo.stderr.strip()}"
            else:
                still = login_after_rollback(s)
                state = "restored and reloaded" if still is None else (
                    f"restored and reloaded, but NEW ADMIN LOGINS STILL FAIL ({still}): the "
                    "files as they were lock the admin out by themselves (an edit sshd had "
                    "not loaded before this reload?); fix it from a console or a session "
                    "that is still open")
            return Outcome(host.name, steps, error=f"{exc}; {state}", warnings=plan.warnings)
    return Outcome(host.name, steps, warnings=plan.warnings, actions=actions)


def read_files_script(paths: list[str], dirs: list[str], clear: list[str]) -> str:
    """Report ``paths`` and ``dirs`` in the fact report's format, then remove ``clear``."""
    return render("scripts/read_files.sh.j2", paths=paths, dirs=dirs, clear=clear)


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
