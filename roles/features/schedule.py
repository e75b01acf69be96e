"""schedule: run the backup unattended on the backup host, daily.

Which scheduler (``--kind`` overrides the choice):

- macOS: a launchd job, ``/Library/LaunchDaemons/io.pullback.backup.plist`` (root) or
  ``~/Library/LaunchAgents/io.pullback.backup.plist`` (a user);
- Linux with systemd running (``/run/systemd/system`` exists, what ``sd_booted()`` checks):
  in ``/etc/systemd/system`` (root) or ``~/.config/systemd/user`` (``--user`` or not root),
  the template ``pullback-backup@.service`` and one timer per instance,
  ``pullback-backup@INSTANCE.timer``. An instance is a shard, ``K-N`` (``--shard K/N``;
  ``1-1`` without ``--shard``), or a host: each host given with ``--host``, and each host
  whose inventory entry sets ``backup.own_unit`` (the shard's instance then leaves it
  out). systemd then runs the instances in parallel, each with its own journal and
  failure state. The template runs ``pullback-backup --unit %i`` with systemd's
  sandboxing around it (system units: ``ProtectSystem=strict``, ``ReadWritePaths=`` the
  destinations' roots and the state, a small ``CapabilityBoundingSet``...) and
  ``OnFailure=pullback-failure@%n.service``, which logs an error line to the journal and
  leaves a mark in ``/var/lib/pullback/failed/`` until the unit's next good run. Units of
  the single-unit layout (``pullback-backup.service``/``.timer``) are removed;
- otherwise cron: ``/etc/cron.d/pullback-backup`` (root) or a marked block in the user's
  crontab (``--user`` or not root).

Every file starts with a "managed by pullback" line (the crontab block sits between
``# BEGIN pullback-backup`` and ``# END pullback-backup``); ``--remove`` deletes only what
carries it, and an install never overwrites a file without it. The job runs
``VENV/bin/pullback-backup --inventory ABS_PATH [--host H ...]``: ``invoke backup`` without
invoke's start-up (``roles.cli.unattended``), the same pull, options and exit codes.

Random delay: systemd's timer has ``RandomizedDelaySec=30min`` (a new draw every day) and
``Persistent=true`` (a run missed while the machine was off starts at boot). cron and launchd
have no random delay, and ``sleep $((RANDOM % N))`` is not POSIX sh, so the time is shifted by
a FIXED offset of 0-29 minutes computed at install time from a SHA-256 of this machine's
name and the scheduled host names: backup hosts spread out, each keeps the same time.

Overlap: systemd never starts a second instance of an active oneshot service, launchd never
starts a running job again, and for cron (or a run by hand) the backup's lock refuses the
second run at once.

Layers: ``gather`` reads this machine (files, tools, the user crontab), ``plan_install`` /
``plan_remove`` are pure and compute the files and commands, ``apply_schedule`` writes
(temp file + rename) and runs ``systemctl`` / ``launchctl`` only when that manager runs
here. ``root=`` and ``home=`` let tests aim everything at a temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from roles.core.outcome import State
from roles.core.render import render
from roles.core.sandbox import CAPABILITIES
from roles.core.shards import parse_shard, shard_instance
from roles.local import keys
from roles.local.files import write_atomic

MARKER = "managed by pullback"
UNIT = "pullback-backup"
SERVICE = f"{UNIT}.service"  # the single-unit layout: removed when found
TIMER = f"{UNIT}.timer"
TEMPLATE = f"{UNIT}@.service"
FAILURE = "pullback-failure@.service"
FAILED_DIR = "%S/pullback/failed"  # %S: /var/lib (system), $XDG_STATE_HOME (user)
_INSTANCE_TIMER = re.compile(r"^pullback-backup@[A-Za-z0-9._-]+\.timer$")
# The system unit's ReadWritePaths: the standard roots a destination may lie below
# (roles.core.destinations), plus each scheduled host's DEST parent and allowed root.
WRITABLE_ROOTS = ("/var/backups", "/srv", "/mnt", "/media")
# Syscall groups no backup needs; @mount too when no host uses bubblewrap (it mounts).
DENIED_SYSCALLS = ("@clock", "@cpu-emulation", "@debug", "@module", "@obsolete", "@raw-io",
                   "@reboot", "@swap")
CRON_FILE = "pullback-backup"  # cron.d file names must not contain dots
LABEL = "io.pullback.backup"
PLIST = f"{LABEL}.plist"
BEGIN = f"# BEGIN {UNIT}"
END = f"# END {UNIT}"
KINDS = ("systemd", "cron", "launchd")
DEFAULT_AT = "02:30"
DELAY_MINUTES = 30
CRON_MAX_COMMAND = 900  # Vixie/Debian cron cuts a command at 1000 bytes
# cron and launchd start jobs with a minimal PATH; ssh and a PATH rsync live in these.
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAM = "pullback-backup"  # the console script of roles.cli.unattended (pyproject.toml)
CRON_DAEMONS = frozenset({"cron", "crond", "cronie", "fcron", "busybox"})

_AT = re.compile(r"^(\d{1,2}):(\d{2})$")
_SAFE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class ScheduleError(Exception):
    """Bad input (``--at``, paths, kind); the task exits 2."""


class ApplyError(Exception):
    """Writing a file or running systemctl / launchctl / crontab failed; the task exits 1."""


# --- the job (pure) -----------------------------------------------------------------------


def parse_at(text: str) -> tuple[int, int]:
    """``"02:30"`` -> ``(2, 30)``; anything but a 24-hour HH:MM is a ScheduleError."""
    match = _AT.match(text.strip()) if isinstance(text, str) else None
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ScheduleError(f"--at must be HH:MM on a 24-hour clock (e.g. 02:30), got {text!r}")
    return int(match[1]), int(match[2])


def _checked_path(value: str, what: str) -> str:
    if _UNSAFE_CHARS.search(value):
        raise ScheduleError(f"{what} must not contain control characters or newlines: {value!r}")
    if not value.startswith("/"):
        raise ScheduleError(f"{what} must be an absolute path, got {value!r}")
    return value


@dataclass(frozen=True)
class Job:
    """What the schedule runs, and when (before any random delay or offset)."""

    argv: tuple[str, ...]
    hosts: tuple[str, ...]  # () means every host of the inventory at run time
    inventory: str
    at: tuple[int, int] = (2, 30)
    agent_socket: str | None = None
    # systemd: the template's command (``--unit %i`` follows), its instances, the paths
    # it may write, and whether any host runs its rsync in bubblewrap (backup.sandbox).
    unit_argv: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    bwrap: bool = True

    @property
    def what(self) -> str:
        return ", ".join(self.hosts) if self.hosts else f"every host in {self.inventory}"

    @property
    def at_text(self) -> str:
        return f"{self.at[0]:02d}:{self.at[1]:02d}"


def plan_instances(hosts: Iterable[str], *, shard: tuple[int, int] | None,
                   own_units: Iterable[str] = (), shared: bool = True) -> tuple[str, ...]:
    """The systemd instances: each host named with ``--host``; else the shard's (``K-N``,
    ``1-1`` for the whole inventory) when ``shared`` (some selected host has no unit of
    its own), then each selected host with ``backup.own_unit``."""
    named = tuple(dict.fromkeys(hosts))
    if named:
        return named
    k, n = shard or (1, 1)
    return ((shard_instance(k, n),) if shared else ()) + tuple(dict.fromkeys(own_units))


def build_job(inventory: str | Path, hosts: Iterable[str], *, at: str = DEFAULT_AT,
              agent_socket: str | None = None, program: str | None = None,
              shard: str | None = None, own_units: Iterable[str] = (),
              shared: bool = True, write_paths: Iterable[str] = (),
              bwrap: bool = True) -> Job:
    """The scheduled command: ``PROGRAM --inventory ABS [--host H ...]`` (plus
    ``--shard K/N`` when this backup host runs one shard of the inventory); for systemd,
    ``PROGRAM --inventory ABS --unit %i`` and its instances (``plan_instances``).

    ``program`` defaults to the ``pullback-backup`` beside this Python (the project's venv),
    never resolved through symlinks: the venv's own script must run.
    """
    hour_minute = parse_at(at)
    inventory = os.path.abspath(os.fspath(inventory))
    program = program or str(Path(sys.executable).parent / PROGRAM)
    _checked_path(program, "the pullback-backup program")
    _checked_path(inventory, "--inventory")
    if agent_socket is not None:
        _checked_path(agent_socket, "--agent-socket")
        if not _SAFE.match(agent_socket):
            raise ScheduleError(f"--agent-socket may only contain letters, digits and "
                                f"_@+=:,./- (it goes into units and crontabs): {agent_socket!r}")
    names = tuple(dict.fromkeys(hosts))
    argv = [program, "--inventory", inventory]
    for name in names:
        argv += ["--host", name]
    parsed = parse_shard(shard) if shard is not None else None  # ValueError: one line
    if parsed is not None:
        argv += ["--shard", "{}/{}".format(*parsed)]
    own_units = tuple(own_units)
    instances = plan_instances(names, shard=parsed, own_units=own_units, shared=shared)
    for name in instances:
        if (name in names or name in own_units) and re.fullmatch(r"\d+-\d+", name):
            raise ScheduleError(f"host {name!r} would get its own unit, but its name reads "
                                "as a shard's instance (K-N): rename the host")
    paths = [_checked_path(p, "a destination root") for p in write_paths]
    for path in paths:
        if not _SAFE.match(path):
            raise ScheduleError(f"{path!r}: a destination root in a unit may only contain "
                                "letters, digits and _@+=:,./-")
    return Job(argv=tuple(argv), hosts=names, inventory=inventory, at=hour_minute,
               agent_socket=agent_socket, unit_argv=(program, "--inventory", inventory),
               instances=instances, write_paths=tuple(dict.fromkeys(paths)), bwrap=bwrap)


def destination_roots(hosts: Iterable[Any]) -> list[str]:
    """What the system unit must let a run write: each host's DEST parent (DEST and its
    state folder DEST.pullback), and its ``backup.allow_destination``."""
    roots: list[str] = []
    for host in hosts:
        roots.append(os.path.dirname(host.destination.rstrip("/")) or "/")
        if host.backup.allow_destination:
            roots.append(host.backup.allow_destination)
    return list(dict.fromkeys(roots))


def delay_offset(seed: str, minutes: int = DELAY_MINUTES) -> int:
    """A fixed pseudo-random offset in ``[0, minutes)`` minutes, the same for the same seed."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") % minutes


def shifted(at: tuple[int, int], minutes: int) -> tuple[int, int]:
    """``at`` plus ``minutes``, wrapping at midnight."""
    total = (at[0] * 60 + at[1] + minutes) % (24 * 60)
    return divmod(total, 60)


def seed_for(hostname: str, job: Job) -> str:
    return f"{hostname} {','.join(job.hosts) or '*'}"


# --- quoting (pure) -----------------------------------------------------------------------


def systemd_escape(text: str) -> str:
    """Escape ``%`` (a unit-file specifier) as ``%%``."""
    return text.replace("%", "%%")


def systemd_word(arg: str) -> str:
    """One ExecStart= word: specifiers and ``$`` escaped, double-quoted unless plain."""
    arg = systemd_escape(arg).replace("$", "$$")
    if arg and _SAFE.match(arg.replace("%", "").replace("$", "")):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_exec(argv: Iterable[str]) -> str:
    return " ".join(systemd_word(arg) for arg in argv)


def cron_command(job: Job) -> str:
    """The crontab command field: ``sh`` syntax, ``%`` escaped (cron turns it into a newline).

    Environment goes inline (``PATH=... cmd``) so a user's crontab lines after our block
    are not affected. stdout (the summary table) is dropped; stderr reaches cron's mail.
    """
    env = [f"PATH={PATH_ENV}"]
    if job.agent_socket:
        env.append(f"SSH_AUTH_SOCK={job.agent_socket}")
    line = " ".join([*env, shlex.join(job.argv), ">/dev/null"])
    return line.replace("%", "\\%")


# --- rendering (pure) ---------------------------------------------------------------------


def unit_write_paths(job: Job) -> str:
    """ReadWritePaths=: each "-"-prefixed (it may not exist yet), nested ones dropped."""
    roots = sorted(dict.fromkeys([*WRITABLE_ROOTS, *job.write_paths]))
    kept = [r for r in roots if not any(r != o and r.startswith(o.rstrip("/") + "/")
                                        for o in roots)]
    return " ".join(f"-{r}" for r in kept)


def render_service(job: Job, *, system: bool) -> str:
    """The template ``pullback-backup@.service``."""
    agent_env = None
    if job.agent_socket:
        agent_env = systemd_word(f"SSH_AUTH_SOCK={job.agent_socket}").replace("$$", "$")
    capabilities = [*CAPABILITIES, *(["CAP_SYS_ADMIN"] if job.bwrap else [])]
    denied = [*DENIED_SYSCALLS, *([] if job.bwrap else ["@mount"])]
    return render("pullback-backup@.service.j2", marker=MARKER,
                  inventory=systemd_escape(job.inventory),
                  system=system, exec_start=systemd_exec(job.unit_argv) + " --unit %i",
                  agent_env=agent_env, failed_dir=FAILED_DIR, bwrap=job.bwrap,
                  write_paths=unit_write_paths(job), capabilities=" ".join(capabilities),
                  syscall_filter="~" + " ".join(denied))


def render_failure(*, system: bool) -> str:
    """``pullback-failure@.service``: what OnFailure= starts."""
    return render("pullback-failure@.service.j2", marker=MARKER, system=system,
                  failed_dir=FAILED_DIR)


def timer_name(instance: str) -> str:
    return f"{UNIT}@{instance}.timer"


def render_timer(job: Job, instance: str) -> str:
    return render("pullback-backup@.timer.j2", marker=MARKER, instance=instance,
                  at=job.at_text, delay_minutes=DELAY_MINUTES)


def render_cron(job: Job, *, system: bool, hostname: str) -> str:
    seed = seed_for(hostname, job)
    offset = delay_offset(seed)
    hour, minute = shifted(job.at, offset)
    return render("pullback-backup.cron.j2", marker=MARKER, what=job.what, at=job.at_text,
                  time=f"{hour:02d}:{minute:02d}", offset=offset, seed=seed, hour=hour,
                  minute=minute, system=system, command=cron_command(job), begin=BEGIN,
                  end=END)


def render_plist(job: Job, *, hostname: str, error_log: str) -> str:
    seed = seed_for(hostname, job)
    offset = delay_offset(seed)
    hour, minute = shifted(job.at, offset)
    # "--" may not appear inside an XML comment.
    return render("io.pullback.backup.plist.j2", marker=MARKER, at=job.at_text,
                  what_comment=job.what.replace("--", "- -"),
                  seed_comment=seed.replace("--", "- -"),
                  time=f"{hour:02d}:{minute:02d}", offset=offset, seed=seed, hour=hour,
                  minute=minute, label=LABEL, argv=job.argv, path_env=PATH_ENV,
                  agent_socket=job.agent_socket, error_log=error_log)


# --- facts (read-only) --------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    root: Path
    home: Path
    config_home: Path
    system: str  # platform.system(): "Linux", "Darwin", ...
    euid: int
    hostname: str
    systemd_running: bool
    cron_running: bool
    tools: dict[str, str | None]  # systemctl, crontab, launchctl -> path or None
    files: dict[Path, str | None]  # every path a schedule may live at -> its text
    crontab: str | None = None  # the user's crontab ("" when empty), None when not read
    enabled_timers: tuple[str, ...] = ()  # our timers enabled in the scope asked for
    launchd_loaded: bool = False
    timers: dict[bool, tuple[str, ...]] = field(default_factory=dict)  # user? -> found


def is_managed(text: str) -> bool:
    """A file of ours: the marker on one of its first lines."""
    return any(MARKER in line for line in text.splitlines()[:6])


def unit_dir(root: Path, config_home: Path, *, user: bool) -> Path:
    return config_home / "systemd" / "user" if user else root / "etc" / "systemd" / "system"


def locations(root: Path, home: Path, config_home: Path, *, user: bool,
              timers: Iterable[str] = ()) -> dict[str, list[Path]]:
    """Where each kind of schedule lives for the system (root) or for one user; ``timers``:
    the instance timers found there (``gather``) or wanted."""
    units = unit_dir(root, config_home, user=user)
    systemd = [units / name for name in (TEMPLATE, FAILURE, *timers, SERVICE, TIMER)]
    if user:
        return {"systemd": systemd, "cron": [],
                "launchd": [home / "Library" / "LaunchAgents" / PLIST]}
    return {"systemd": systemd, "cron": [root / "etc" / "cron.d" / CRON_FILE],
            "launchd": [root / "Library" / "LaunchDaemons" / PLIST]}


def instance_timers(folder: Path) -> list[str]:
    """The ``pullback-backup@*.timer`` files in ``folder`` (ours or not: read decides)."""
    try:
        return sorted(p.name for p in folder.iterdir() if _INSTANCE_TIMER.match(p.name))
    except OSError:
        return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _cron_running(root: Path) -> bool:
    proc = root / "proc"
    try:
        entries = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return False
    for entry in entries:
        try:
            if (entry / "comm").read_text().strip() in CRON_DAEMONS:
                return True
        except OSError:
            continue
    return False


def _hostname() -> str:
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "localhost"


def _quiet(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def user_scope(euid: int, user: bool) -> bool:
    """Not root means a user schedule whatever was asked: system files need root."""
    return user or euid != 0


def gather(*, user: bool = False, root: Path = Path("/"), home: Path | None = None,
           tools: dict[str, str | None] | None = None, euid: int | None = None,
           hostname: str | None = None, system: str | None = None) -> Facts:
    """Read what decides the plan: the scheduler running here, our files, the crontab."""
    home = home or Path.home()
    euid = os.geteuid() if euid is None else euid
    xdg = os.environ.get("XDG_CONFIG_HOME") if root == Path("/") else None
    config_home = Path(xdg) if xdg and xdg.startswith("/") else home / ".config"
    if tools is None:
        tools = {name: shutil.which(name) for name in ("systemctl", "crontab", "launchctl")}
    scope_user = user_scope(euid, user)
    timers = {scope: tuple(instance_timers(unit_dir(root, config_home, user=scope)))
              for scope in (False, True)}
    paths = [p for scope in (False, True)
             for group in locations(root, home, config_home, user=scope,
                                    timers=timers[scope]).values() for p in group]
    files = {p: _read(p) for p in paths}
    systemd_running = (root / "run" / "systemd" / "system").is_dir()
    system = system or platform.system()
    crontab = None
    crontab_bin, launchctl = (tools.get(name) for name in ("crontab", "launchctl"))
    if scope_user and crontab_bin:
        result = _quiet(crontab_bin, "-l")
        # "no crontab for USER" is exit 1 with nothing on stdout: an empty crontab.
        crontab = result.stdout if result.returncode == 0 else ""
    # Enabled: a link in timers.target.wants (what `systemctl enable` makes); a file read.
    wants = unit_dir(root, config_home, user=scope_user) / "timers.target.wants"
    enabled = tuple(name for name in instance_timers(wants) if name in timers[scope_user])
    launchd_loaded = False
    if system == "Darwin" and launchctl:
        target = f"{launchd_domain(euid, scope_user)}/{LABEL}"
        launchd_loaded = _quiet(launchctl, "print", target).returncode == 0
    return Facts(root=root, home=home, config_home=config_home, system=system, euid=euid,
                 hostname=hostname or _hostname(), systemd_running=systemd_running,
                 cron_running=_cron_running(root), tools=dict(tools), files=files,
                 crontab=crontab, enabled_timers=enabled, launchd_loaded=launchd_loaded,
                 timers=timers)


def launchd_domain(euid: int, user: bool) -> str:
    return f"gui/{euid}" if user else "system"


# --- the plan (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class FileStep:
    path: Path
    old: str | None
    new: str | None  # None: remove the file

    @property
    def state(self) -> State:
        if self.new is None:
            return State.REMOVED
        if self.old is None:
            return State.CREATED
        return State.UNCHANGED if self.old == self.new else State.UPDATED


@dataclass(frozen=True)
class Plan:
    kind: str  # "systemd", "cron", "launchd"; "remove" for plan_remove
    user: bool
    files: tuple[FileStep, ...] = ()
    crontab: tuple[str, str] | None = None  # (old, new) user crontab text
    crontab_bin: str | None = None
    before: tuple[tuple[str, ...], ...] = ()  # stop / unload, failures ignored
    after: tuple[tuple[str, ...], ...] = ()  # reload / enable / load, failures reported
    manual: tuple[str, ...] = ()  # what the user must run: the manager is not running here
    down: str | None = None  # why the manager commands are not run ("systemd is not running")
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # refuse to apply
    missing: tuple[str, ...] = ()  # a tool this machine lacks: a dry run still shows the plan

    @property
    def changed(self) -> bool:
        return (any(step.state is not State.UNCHANGED for step in self.files)
                or (self.crontab is not None and self.crontab[0] != self.crontab[1])
                or bool(self.after))


def resolve_kind(facts: Facts, requested: str | None) -> str:
    if requested:
        if requested not in KINDS:
            raise ScheduleError(f"--kind must be one of {', '.join(KINDS)}, got {requested!r}")
        return requested
    if facts.system == "Darwin":
        return "launchd"
    if facts.systemd_running:
        return "systemd"
    return "cron"


def strip_block(text: str) -> str:
    """``text`` without our ``# BEGIN``/``# END`` block; every other line byte for byte."""
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped == BEGIN:
            inside = True
            continue
        if inside and stripped == END:
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ScheduleError(f"the crontab has '{BEGIN}' without '{END}': fix it by hand "
                            "(crontab -e)")
    return "".join(out)


def merge_crontab(old: str, block: str) -> str:
    rest = strip_block(old)
    if rest and not rest.endswith("\n"):
        rest += "\n"
    return rest + block


def _stopped_timers(files: Iterable[FileStep]) -> list[str]:
    """Timers (instances, or the single-unit layout's) whose files go: stopped first."""
    return [step.path.name for step in files if step.new is None
            and (step.path.name == TIMER or _INSTANCE_TIMER.match(step.path.name))]


def _systemctl(facts: Facts, user: bool, *args: str) -> tuple[str, ...]:
    return (facts.tools.get("systemctl") or "systemctl", *(["--user"] if user else []), *args)


def _error_log(facts: Facts, user: bool) -> str:
    base = facts.home if user else Path("/")
    return str(base / "Library" / "Logs" / "pullback-backup.log")


def _desired(facts: Facts, job: Job, kind: str, user: bool) -> dict[Path, str]:
    where = locations(facts.root, facts.home, facts.config_home, user=user)[kind]
    if kind == "systemd":
        units = unit_dir(facts.root, facts.config_home, user=user)
        return {units / TEMPLATE: render_service(job, system=not user),
                units / FAILURE: render_failure(system=not user),
                **{units / timer_name(i): render_timer(job, i) for i in job.instances}}
    if kind == "launchd":
        return {where[0]: render_plist(job, hostname=facts.hostname,
                                       error_log=_error_log(facts, user))}
    if user:
        return {}  # the user's crontab, not a file
    return {where[0]: render_cron(job, system=True, hostname=facts.hostname)}


def _removals(facts: Facts, user: bool, keep: Iterable[Path] = ()) -> tuple[
        list[FileStep], list[str]]:
    """Our files in this scope (except ``keep``) to delete; notes for foreign ones."""
    steps: list[FileStep] = []
    notes: list[str] = []
    kept = set(keep)
    for paths in locations(facts.root, facts.home, facts.config_home, user=user,
                           timers=facts.timers.get(user, ())).values():
        for path in paths:
            text = facts.files.get(path)
            if path in kept or text is None:
                continue
            if is_managed(text):
                steps.append(FileStep(path, text, None))
            else:
                notes.append(f"left alone: {path} is not {MARKER}")
    return steps, notes


def plan_install(facts: Facts, job: Job, *, kind: str | None = None,
                 user: bool = False) -> Plan:
    """Files and commands for a schedule of ``job``; our other schedules in scope go."""
    kind = resolve_kind(facts, kind)
    user = user_scope(facts.euid, user)
    notes: list[str] = []
    problems: list[str] = []
    if user and facts.euid != 0:
        notes.append("not root: installing a schedule for this user")
    desired = _desired(facts, job, kind, user)
    files: list[FileStep] = []
    for path, text in desired.items():
        old = facts.files.get(path)
        if old is not None and not is_managed(old):
            problems.append(f"{path} exists and is not {MARKER}: move it away first")
        files.append(FileStep(path, old, text))
    removals, foreign = _removals(facts, user, keep=desired)
    files += removals
    notes += foreign
    crontab: tuple[str, str] | None = None
    missing: list[str] = []
    if user and kind == "cron" and not facts.tools.get("crontab"):
        missing.append("crontab not found: install cron (e.g. apt-get install cron), or use "
                       "--kind systemd")
        facts = replace(facts, crontab="")  # the preview: a new, empty crontab
    if user and facts.crontab is not None and (kind == "cron" or BEGIN in facts.crontab):
        block = render_cron(job, system=False, hostname=facts.hostname) if kind == "cron" \
            else ""
        try:
            crontab = (facts.crontab, merge_crontab(facts.crontab, block))
        except ScheduleError as exc:
            problems.append(str(exc))
    if kind == "cron" and len(cron_command(job)) > CRON_MAX_COMMAND:
        problems.append(f"the cron command is longer than {CRON_MAX_COMMAND} characters "
                        "(cron truncates it): schedule fewer --host names, or none (every "
                        "host of the inventory)")

    before: list[tuple[str, ...]] = []
    after: list[tuple[str, ...]] = []
    manual: list[str] = []
    down: str | None = None
    changed = any(step.state is not State.UNCHANGED for step in files)
    stopping = _stopped_timers(files)
    wanted = [timer_name(i) for i in job.instances] if kind == "systemd" else []
    if kind == "systemd" or stopping:
        if facts.systemd_running and facts.tools.get("systemctl"):
            if stopping:
                before.append(_systemctl(facts, user, "disable", "--now", *stopping))
            if changed:
                after.append(_systemctl(facts, user, "daemon-reload"))
            starting = [t for t in wanted if changed or t not in facts.enabled_timers]
            if starting:
                after.append(_systemctl(facts, user, "enable", "--now", *starting))
        elif kind == "systemd":
            down = "systemctl not found" if facts.systemd_running else "systemd is not running"
            flag = " --user" if user else ""
            manual.append(f"systemctl{flag} daemon-reload && systemctl{flag} enable --now "
                          f"{' '.join(wanted)}")
    if kind == "systemd" and user:
        notes.append("user units run only while you are logged in unless lingering is on: "
                     "loginctl enable-linger \"$USER\"")
    if kind == "launchd":
        plist = next(iter(desired))
        domain = launchd_domain(facts.euid, user)
        if facts.system == "Darwin" and facts.tools.get("launchctl"):
            launchctl = facts.tools["launchctl"] or "launchctl"
            if changed and facts.launchd_loaded:
                before.append((launchctl, "bootout", f"{domain}/{LABEL}"))
            if changed or not facts.launchd_loaded:
                after.append((launchctl, "bootstrap", domain, str(plist)))
        else:
            down = "launchd is not running (not macOS)"
            manual.append(f"launchctl bootstrap {domain} {shlex.quote(str(plist))}")
    if kind == "cron" and not user and not facts.cron_running:
        notes.append("no cron daemon is running here: the entry runs once cron does "
                     "(e.g. apt-get install cron)")
    if kind == "cron":
        notes.append("cron does not catch up a run missed while the machine was off; "
                     "`invoke status` flags a backup that is too old")
    return Plan(kind=kind, user=user, files=tuple(files), crontab=crontab,
                crontab_bin=facts.tools.get("crontab"), before=tuple(before),
                after=tuple(after), manual=tuple(manual), down=down, notes=tuple(notes),
                problems=tuple(problems), missing=tuple(missing))


def plan_remove(facts: Facts, *, user: bool = False) -> Plan:
    """Delete every schedule of ours in this scope; leave foreign files alone."""
    user = user_scope(facts.euid, user)
    files, notes = _removals(facts, user)
    problems: list[str] = []
    crontab: tuple[str, str] | None = None
    if user and facts.crontab and BEGIN in facts.crontab:
        try:
            crontab = (facts.crontab, strip_block(facts.crontab))
        except ScheduleError as exc:
            problems.append(str(exc))
    before: list[tuple[str, ...]] = []
    after: list[tuple[str, ...]] = []
    stopping = _stopped_timers(files)
    if any(step.path.parent == unit_dir(facts.root, facts.config_home, user=user)
           for step in files) and facts.systemd_running and facts.tools.get("systemctl"):
        if stopping:
            before.append(_systemctl(facts, user, "disable", "--now", *stopping))
        after.append(_systemctl(facts, user, "daemon-reload"))
    if any(step.path.name == PLIST for step in files) and facts.launchd_loaded:
        before.append((facts.tools.get("launchctl") or "launchctl", "bootout",
                       f"{launchd_domain(facts.euid, user)}/{LABEL}"))
    if not files and crontab is None:
        notes.append("no pullback schedule found" + (" for this user" if user else ""))
    return Plan(kind="remove", user=user, files=tuple(files), crontab=crontab,
                crontab_bin=facts.tools.get("crontab"), before=tuple(before),
                after=tuple(after), notes=tuple(notes), problems=tuple(problems))


# --- output -------------------------------------------------------------------------------


def describe(plan: Plan, *, dry_run: bool) -> list[str]:
    """What was (or, with ``dry_run``, would be) done, as lines; dry runs show the text."""
    lines: list[str] = []
    would = "would " if dry_run else ""
    for argv in plan.before:
        lines.append(f"{would}run: {shlex.join(argv)}")
    for step in plan.files:
        state = f"would be {step.state}" if dry_run and step.state is not State.UNCHANGED \
            else step.state
        if dry_run and step.new is not None:
            lines.append(f"# {step.path} ({state})")
            lines += step.new.splitlines()
        else:
            lines.append(f"{step.path}: {state}")
    if plan.crontab is not None:
        old, new = plan.crontab
        state = State.UNCHANGED if old == new else \
            (f"would be {State.UPDATED}" if dry_run else State.UPDATED)
        lines.append(f"# crontab of this user ({state})")
        if dry_run:
            lines += new.splitlines()
    for argv in plan.after:
        lines.append(f"{would}run: {shlex.join(argv)}")
    if plan.down:
        done = "would write" if dry_run else "wrote"
        what = "the plist" if plan.kind == "launchd" else "units"
        lines.append(f"{plan.down}: {done} {what}; enable them with: {'; '.join(plan.manual)}")
    lines += [f"note: {note}" for note in plan.notes]
    lines += [f"note: a real run stops here: {need}" for need in plan.missing]
    if not plan.changed and plan.kind != "remove" and not plan.problems:
        lines.append("schedule already as wanted")
    return lines


# --- applying -----------------------------------------------------------------------------


Runner = Callable[..., subprocess.CompletedProcess]


def apply_schedule(plan: Plan, *, run: Runner = subprocess.run) -> list[str]:
    """Stop, write / remove, reload; return the outcome lines. Raise ApplyError on failure."""
    if plan.problems or plan.missing:
        raise ApplyError("; ".join((*plan.problems, *plan.missing)))
    for argv in plan.before:  # unloading something not loaded is fine
        run(list(argv), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    for step in plan.files:
        try:
            if step.new is None:
                current = _read(step.path)
                if current is not None and is_managed(current):
                    step.path.unlink()
            elif step.state is not State.UNCHANGED:
                write_atomic(step.path, step.new.encode())
        except OSError as exc:
            raise ApplyError(f"{step.path}: {exc.strerror or exc}") from None
    if plan.crontab is not None and plan.crontab[0] != plan.crontab[1]:
        crontab = plan.crontab_bin or "crontab"
        now = run([crontab, "-l"], capture_output=True, text=True, check=False,
                  stdin=subprocess.DEVNULL)
        if (now.stdout if now.returncode == 0 else "") != plan.crontab[0]:
            raise ApplyError("the crontab changed since it was read; run again")
        result = run([crontab, "-"], input=plan.crontab[1], capture_output=True, text=True,
                     check=False)
        if result.returncode != 0:
            raise ApplyError(f"crontab - failed: {(result.stderr or '').strip()}")
    for argv in plan.after:
        result = run(list(argv), capture_output=True, text=True, check=False,
                     stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ApplyError(f"{shlex.join(argv)} failed (exit {result.returncode}): "
                             f"{(result.stderr or result.stdout or '').strip()}")
    return describe(plan, dry_run=False)


@dataclass
class KeyReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_keys(paths: Iterable[str], *, agent_socket: str | None) -> KeyReport:
    """A schedule whose key others can read (or that is missing) would fail every night."""
    report = KeyReport()
    for path in dict.fromkeys(paths):
        try:
            keys.check_private_key(Path(path))
        except keys.KeyFileError as exc:
            report.problems.append(str(exc))
            continue
        if keys.key_has_passphrase(Path(path)) and not agent_socket:
            report.warnings.append(
                f"{path} has a passphrase: unattended runs need an ssh-agent holding it; "
                "load it once after boot and pass --agent-socket (see docs/tasks.md)")
    return report
