"""backup and restore: build the pull's argv, run it, keep snapshots, copy paths back out.

The pull is::

    RSYNC -e "ssh -i KEY -p PORT -o StrictHostKeyChecking=yes -o UserKnownHostsFile=KH
              -o BatchMode=yes -o IdentitiesOnly=yes" OPTIONS --stats [--exclude=P ...]
          [-n] [--max-delete=N] [--link-dest=DEST/<newest>] SRC DEST/

with ``SRC`` ``root@ADDR::MODULE/SOURCE/`` in daemon mode (the forced command is an rsync
daemon) and ``root@ADDR:SOURCE/`` in captured mode (the forced command is the gate that
``invoke capture-command`` installed; see ``roles.features.capture``). Before a
captured-mode run the capture record's fingerprint is recomputed (options, excludes,
source, the local rsync's version line; the remote one is the recorded one, as backup has
no admin access) and the run is refused when it differs: the forced command would no
longer match what the client sends.

Layout on the backup host (``DEST`` is ``backup.destination`` with ``{name}``)::

    DEST/                     mode 0700, owned by the running user: the container
    DEST/tree/                mirror mode (snapshots: 0): the copy of SOURCE itself
    DEST/<run>/               snapshot mode: one complete snapshot per successful run
    DEST/<run>.partial/       the run in progress (renamed to <run> on exit 0 or 24)
    DEST/latest -> <run>      the newest complete snapshot (relative link, replaced atomically)
    DEST.pullback/            ours, mode 0700, a SIBLING so a --delete pull never removes it:
        lock                  fcntl.flock'd by the running backup, holds its pid
        logs/<run>.log        rsync's whole output (argv on the first line)
        logs/<run>.json       the summary: exit code, seconds, parsed --stats, snapshot
        layout                mirror mode: "tree", once DEST is known to use DEST/tree
        migration.json        mirror mode: an interrupted move from the old layout

Why a container: the copy keeps the server's modes and owners, setuid-root binaries and
device nodes included, and rsync gives the copy's top folder the mode of the server's
``/`` (0755). Only a 0700 DEST between them and the local users keeps those out of reach;
``roles.local.folders`` refuses a DEST (or a state folder) below a folder that anyone but root
and the running user could change, before anything is written.

Old mirror layout (before DEST/tree: the copy's top level sat directly in DEST): the first
real run, under the lock, makes DEST 0700 and moves every entry into DEST/tree by renames
within DEST (one file system, atomic per entry), through a staging folder that
``migration.json`` names, so an interrupted move is finished by the next run and nothing is
copied or lost. A DEST holding only ``tree`` (or nothing) is the new layout; the ``layout``
mark then keeps a user's stray files in DEST from ever being taken for an old tree (and
deleted by the next ``--delete`` pull).

``<run>`` is the UTC start time, ``2026-11-26T101500Z``; a second run within the same
second gets ``-2``, ``-3``... A ``.partial`` left by a killed run is RESUMED (renamed to the
new run's ``.partial``) when the options contain a ``--delete`` variant, so rsync itself
removes anything stale in it and the data already pulled is not pulled again; without
``--delete`` it is removed first, because stale files would otherwise survive into the
snapshot. Only the run holding the lock touches ``.partial`` folders, so a running job's
folder is never removed.

Empty-source guard: in mirror mode ``backup.max_delete`` becomes rsync's ``--max-delete``
(exit 25, the destination kept). A new snapshot deletes nothing, so there it is checked
after the pull instead: when ``Number of files`` (``--stats``) fell by more than
``max_delete`` below the newest complete snapshot's (its ``logs/<snapshot>.json``; without
one, counted on disk), the ``.partial`` is removed rather than promoted, ``latest`` and
every snapshot stay as they are, nothing is pruned and the run fails naming both counts.
Removed, not kept: kept it would only be resumed by the next run, and left unpromoted it
would hold the disk for nothing; the run's log and summary show what the source sent.

Progress: on a terminal the user's ``--progress`` (or ``--info=progress2``, which needs a
local rsync >= 3.1) is kept and the output is shown live; otherwise those options are
dropped and the output goes only to the log. Nothing here imports Fabric or paramiko:
``backup`` runs unattended with only the backup key, and its start-up stays lean.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from roles.core import rsync_errors
from roles.core.rsync_errors import EXIT_CODES, explain_exit  # noqa: F401 - re-exported
from roles.local import folders

if TYPE_CHECKING:
    from roles.inventory.schema import Host  # pydantic: not imported at run time

STATE_SUFFIX = ".pullback"
PARTIAL = ".partial"
LATEST = "latest"
TREE = "tree"
LAYOUT_MARK = "layout"
MIGRATION_RECORD = "migration.json"
STAGING = ".pullback-migrating"
OK_CODES = (0, 24)
CHUNK = 65536
TAIL_BYTES = 65536

_RUN_RE = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\dT\d{6}Z)(?:-(?P<seq>[1-9]\d*))?$")
_PROGRESS_OPTIONS = ("--progress", "--info=progress2", "--info=progress1", "--info=progress0")


class BackupError(Exception):
    """A backup could not start (lock held, no rsync, unusable destination)."""


class RestoreError(Exception):
    """Bad restore input (path, target, snapshot); the task exits 2."""


# --- argv (pure) ------------------------------------------------------------------------


def ssh_command(host: Host, *, interactive: bool = False) -> str:
    """The ``-e`` value: strict host keys from the inventory, only the backup key.

    Unattended runs never prompt (``BatchMode``: a passphrase key needs an agent); an
    interactive run on a terminal may ask for the key's passphrase, once per host.
    """
    return shlex.join([
        "ssh", "-i", host.backup_key, "-p", str(host.port),
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={host.known_hosts}",
        "-o", f"BatchMode={'no' if interactive else 'yes'}",
        "-o", "IdentitiesOnly=yes",
        # An unattended run must not hang forever on a dead network.
        "-o", "ConnectTimeout=30",
        "-o", "ServerAliveInterval=30",
        "-o", "ServerAliveCountMax=4",
    ])


def source_spec(host: Host) -> str:
    """Daemon mode ``root@ADDR::MODULE/SOURCE/``; captured mode ``root@ADDR:/SOURCE/``.

    Daemon mode needs the double colon: a single colon would make rsync start its own
    ``rsync --server --sender`` over ssh, the daemon forced command would answer with its
    greeting, and the client would fail with "protocol version mismatch -- is your shell
    clean?" (the seed's bug). Captured mode needs the single colon: the gate runs exactly
    the ``rsync --server --sender ... . /SOURCE/`` that such a client sends. The trailing
    slash puts SOURCE's contents (not a folder named after it) into the destination.
    """
    address = f"[{host.address}]" if ":" in host.address else host.address
    path = host.backup.source.strip("/")
    if host.forced_command == "captured":
        return f"root@{address}:/{path + '/' if path else ''}"
    return f"root@{address}::{host.backup.module}/{path + '/' if path else ''}"


def _drop_progress(options: Iterable[str]) -> list[str]:
    out: list[str] = []
    for option in options:
        if option in _PROGRESS_OPTIONS:
            continue
        if option == "-P":  # --partial --progress: keep the partial half
            out.append("--partial")
            continue
        out.append(option)
    return out


def _whole_transfer_progress(options: Iterable[str]) -> list[str]:
    """``--progress`` (per file) becomes ``--info=progress2`` (one line for the whole pull)."""
    out: list[str] = []
    for option in options:
        if option == "--progress":
            out.append("--info=progress2")
        elif option == "-P":
            out += ["--partial", "--info=progress2"]
        else:
            out.append(option)
    return out


def supports_progress2(version: str | None) -> bool:
    """``--info=progress2`` exists from rsync 3.1.0."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return bool(match) and (int(match[1]), int(match[2])) >= (3, 1)


def build_argv(host: Host, *, dry_run: bool, tty: bool, local_rsync: str, dest: str,
               link_dest: str | None = None, progress2: bool = False) -> list[str]:
    """The pull of ``host`` into ``dest``, as an argv list (no shell).

    capture-command builds its capture runs with this same function, so what it records is
    what a backup sends (progress options never reach the server's command line).
    On a terminal the user's progress option is kept; with ``progress2`` (both ends are
    rsync >= 3.1) ``--progress`` becomes the whole-transfer ``--info=progress2``.
    """
    if not tty:
        options = _drop_progress(host.backup.options)
    elif progress2:
        options = _whole_transfer_progress(host.backup.options)
    else:
        options = list(host.backup.options)
    argv = [local_rsync, "-e", ssh_command(host, interactive=tty), *options, "--stats"]
    argv += [f"--exclude={pattern}" for pattern in host.backup.exclude]
    if dry_run:
        # Daemon mode: the daemon takes the client's options. Captured mode: the gate runs
        # the recorded dry-run command, which is what a client with -n sends.
        argv.append("-n")
    if host.backup.max_delete is not None:
        argv.append(f"--max-delete={host.backup.max_delete}")
    if link_dest is not None:
        if not link_dest.startswith("/"):
            raise ValueError(f"--link-dest must be absolute (rsync resolves it from DEST): "
                             f"{link_dest!r}")
        argv.append(f"--link-dest={link_dest}")
    argv += [source_spec(host), dest.rstrip("/") + "/"]
    return argv


def both_ends_have_progress2(host: Host, local_rsync: str) -> bool:
    """Both rsyncs >= 3.1: the remote is the pinned build (rsync.version) that the forced
    command runs; the local one is the pinned build too, else whatever PATH gave."""
    if local_rsync == host.rsync.local_binary:
        local_version: str | None = host.rsync.version
    else:
        result = subprocess.run([local_rsync, "--version"], capture_output=True, text=True,
                                check=False)
        match = re.search(r"version\s+v?(\d+\.\d+\.\d+)", result.stdout)
        local_version = match[1] if match else None
    return supports_progress2(local_version) and supports_progress2(host.rsync.version)


def find_local_rsync(host: Host) -> tuple[str, str | None]:
    """``(path, warning)``: the pinned local build, else ``rsync`` on PATH with a warning."""
    pinned = host.rsync.local_binary
    if os.access(pinned, os.X_OK):
        return pinned, None
    fallback = shutil.which("rsync")
    if fallback is None:
        raise BackupError(f"no local rsync: {pinned} is not built and none is on PATH; "
                          "run `invoke build-rsync --local-only`")
    return fallback, (f"{pinned} is not built: using {fallback} from PATH; run "
                      "`invoke build-rsync --local-only` so both ends run the same rsync")


# --- rsync's output (pure) --------------------------------------------------------------

_NUM = r"([\d,.]+[KMGTP]?)"
_STAT_FIELDS = (
    ("files", rf"^Number of files: {_NUM}"),
    ("files_created", rf"^Number of created files: {_NUM}"),
    ("files_deleted", rf"^Number of deleted files: {_NUM}"),
    ("files_transferred", rf"^Number of (?:regular )?files transferred: {_NUM}"),
    ("total_size", rf"^Total file size: {_NUM}"),
    ("transferred_size", rf"^Total transferred file size: {_NUM}"),
    ("literal_data", rf"^Literal data: {_NUM}"),
    ("matched_data", rf"^Matched data: {_NUM}"),
    ("file_list_size", rf"^File list size: {_NUM}"),
    ("bytes_sent", rf"^Total bytes sent: {_NUM}"),
    ("bytes_received", rf"^Total bytes received: {_NUM}"),
)
_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def _number(text: str) -> int:
    """``1,234`` -> 1234; ``100.24K`` (rsync -h, units of 1000) -> 100240 (approximate)."""
    unit = _UNITS.get(text[-1], 1)
    digits = text.rstrip("KMGTP")
    if unit == 1:
        return int(digits.replace(",", "").replace(".", ""))
    return round(float(digits.replace(",", "")) * unit)


def parse_stats(text: str) -> dict[str, Any]:
    """The numbers of rsync's ``--stats`` block (2.6.9 and 3.x formats); missing ones absent.

    3.x prints ``Number of files: 1,234 (reg: 1,000, dir: 234)`` and ``Number of regular
    files transferred``; 2.6.9 prints ``Number of files: 1234`` and ``Number of files
    transferred``. The per-type breakdown, when there, is kept as ``files_by_type``.
    """
    stats: dict[str, Any] = {}
    for name, pattern in _STAT_FIELDS:
        matches = re.findall(pattern, text, re.MULTILINE)
        if matches:
            stats[name] = _number(matches[-1])
    kinds = re.findall(r"^Number of files: [\d,.]+[KMGTP]? \(([^)]*)\)", text, re.MULTILINE)
    if kinds:
        stats["files_by_type"] = _types(kinds[-1])
    speedups = re.findall(r"speedup is ([\d,.]+)", text)
    if speedups:
        stats["speedup"] = float(speedups[-1].replace(",", ""))
    if "(DRY RUN)" in text:
        stats["dry_run"] = True
    return stats


def _types(text: str) -> dict[str, int]:
    # "reg: 1,000, dir: 234, link: 3": split on ", " only where a "word:" follows.
    return {kind: _number(count)
            for kind, count in re.findall(r"(\w+): ([\d,.]+[KMGTP]?)(?:,|$)", text)}


# Lines worth quoting when rsync fails: rsync's own messages, the daemon's, ssh's, the
# captured-mode gate's.
_ERROR_LINE = re.compile(
    rb"(?:^|\r)((?:rsync(?: error| warning)?: |@ERROR|ERROR: |ssh: |Host key verification "
    rb"failed|Permission denied|Deletions stopped|protocol version mismatch|No \S+ host key "
    rb"is known|Connection closed|Connection reset|kex_exchange_identification|IO error "
    rb"encountered|file has vanished|pullback gate: |@@@@)[^\r\n]*)",
    re.MULTILINE,
)


class OutputScanner:
    """Keeps what we need of rsync's output while it streams by in chunks.

    Only the tail (the ``--stats`` block is at the end) and the last error-looking lines are
    kept, so a verbose listing of millions of files costs no memory and no per-line Python.
    """

    def __init__(self, tail_bytes: int = TAIL_BYTES, keep_errors: int = 20) -> None:
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._carry = b""
        self.errors: collections.deque[str] = collections.deque(maxlen=keep_errors)

    def feed(self, chunk: bytes) -> None:
        self._tail += chunk
        if len(self._tail) > 2 * self._tail_bytes:
            del self._tail[:-self._tail_bytes]
        data = self._carry + chunk
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:
            self._carry = data[-self._tail_bytes:]
            return
        self._scan(data[:cut + 1])
        self._carry = data[cut + 1:][-self._tail_bytes:]

    def close(self) -> None:
        self._scan(self._carry)
        self._carry = b""

    def _scan(self, data: bytes) -> None:
        for match in _ERROR_LINE.finditer(data):
            self.errors.append(match.group(1).decode(errors="replace").strip())

    @property
    def tail(self) -> str:
        return bytes(self._tail[-self._tail_bytes:]).decode(errors="replace")


def last_error(lines: Iterable[str]) -> str:
    """rsync's last error line; with the generic ``rsync error: ... (code N)`` summary, the
    specific message before it too."""
    lines = [line for line in lines if not line.startswith("@@@@")] or list(lines)
    if not lines:
        return ""
    last = lines[-1]
    if last.startswith("rsync error:"):
        specific = [line for line in lines if not line.startswith("rsync error:")]
        if specific:
            return f"{specific[-1]} / {last}"
    return last


def describe_failure(code: int, errors: Iterable[str]) -> str:
    """rsync's last error line and what it means: a known message's explanation when the
    output holds one (it names the cause better than the exit code), else the code's."""
    errors = list(errors)
    line = last_error(errors)
    known = rsync_errors.explanation("\n".join(errors))
    return (f"rsync exit {code}{': ' + line if line else ''} -- "
            f"{known or explain_exit(code)}")


# --- snapshots (pure) -------------------------------------------------------------------


def run_key(name: str) -> tuple[str, int] | None:
    """Sort key of a complete snapshot / run name, or None when ``name`` is not one."""
    match = _RUN_RE.match(name)
    if not match:
        return None
    return match["stamp"], int(match["seq"] or 1)


def new_run_id(now: datetime, taken: Iterable[str]) -> str:
    """``2026-11-26T101500Z``; ``-2``, ``-3``... when a run of that second already exists."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    used = {name.removesuffix(PARTIAL) for name in taken}
    name, seq = stamp, 1
    while name in used:
        seq += 1
        name = f"{stamp}-{seq}"
    return name


def complete_snapshots(names: Iterable[str]) -> list[str]:
    """Complete snapshot folders, oldest first (``.partial``, ``latest``, others ignored)."""
    found = [(key, name) for name in names if (key := run_key(name)) is not None]
    return [name for _, name in sorted(found)]


def partial_snapshots(names: Iterable[str]) -> list[str]:
    """``.partial`` folders of earlier runs, oldest first."""
    found = [(key, name) for name in names
             if name.endswith(PARTIAL) and (key := run_key(name.removesuffix(PARTIAL)))]
    return [name for _, name in sorted(found)]


def newest_snapshot(names: Iterable[str]) -> str | None:
    snapshots = complete_snapshots(names)
    return snapshots[-1] if snapshots else None


def plan_prune(names: Iterable[str], keep: int) -> list[str]:
    """Complete snapshots to delete so that the newest ``keep`` remain (never a partial)."""
    snapshots = complete_snapshots(names)
    return snapshots[:-keep] if keep > 0 else []


def plan_partials(names: Iterable[str], *, resume: bool) -> tuple[str | None, list[str]]:
    """``(resume_from, delete)`` for the stale ``.partial`` folders of killed runs.

    Called only while holding the lock, so no running job owns any of them.
    """
    partials = partial_snapshots(names)
    if resume and partials:
        return partials[-1], partials[:-1]
    return None, partials


def check_layout(dest: Path, names: list[str], snapshots: int) -> str | None:
    """Refuse a mirror pull into a folder of snapshots: ``--delete`` would erase them all."""
    if snapshots or LATEST not in names or not complete_snapshots(names):
        return None
    if not os.path.islink(dest / LATEST):
        return None
    return (f"{dest} holds snapshots (a `latest` link and timestamped folders) but "
            "backup.snapshots is 0: a mirror pull with --delete would erase them; set "
            "backup.snapshots again or choose another backup.destination")


@dataclass(frozen=True)
class MirrorLayout:
    """What a mirror-mode DEST holds and what to do before pulling into ``DEST/tree``.

    ``state``: ``new`` (DEST/tree or nothing), ``old`` (the tree's top level sits in DEST),
    ``migrating`` (a move into ``staging`` was interrupted). ``move``: DEST's entries that
    go into ``staging`` before ``staging`` becomes ``tree``. ``strays``: entries of a
    marked new-layout DEST besides ``tree``; never touched.
    """
    state: str
    staging: str | None = None
    move: tuple[str, ...] = ()
    strays: tuple[str, ...] = ()


def free_staging_name(names: Iterable[str]) -> str:
    """``.pullback-migrating``, or ``-2``, ``-3``... when the old tree holds that name."""
    taken = set(names)
    name, seq = STAGING, 1
    while name in taken:
        seq += 1
        name = f"{STAGING}-{seq}"
    return name


def plan_mirror_layout(names: Iterable[str], *, marked: bool,
                       staging: str | None) -> MirrorLayout:
    """Pure: read DEST's entry ``names``, the ``layout`` mark, the recorded staging name.

    Without the mark, DEST holding exactly ``tree`` is taken as the new layout: an old
    tree whose source held nothing but a folder named ``tree`` would be misread, and the
    next pull would copy that folder again (from the server) one level down.
    """
    names = sorted(names)
    if staging is not None:
        if staging not in names and names == [TREE]:
            return MirrorLayout("new")  # the last rename happened; only the record is left
        return MirrorLayout("migrating", staging,
                            tuple(n for n in names if n != staging))
    if marked or names in ([], [TREE]):
        return MirrorLayout("new", strays=tuple(n for n in names if n != TREE))
    return MirrorLayout("old", free_staging_name(names), tuple(names))


def read_mirror_layout(dest: Path, state: Path) -> MirrorLayout:
    """``plan_mirror_layout`` over DEST as it is on disk."""
    names = os.listdir(dest) if dest.is_dir() else []
    staging: str | None = None
    try:
        staging = json.loads((state / MIGRATION_RECORD).read_text())["staging"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{state / MIGRATION_RECORD} is unreadable ({exc}); it names the "
                          f"staging folder of an interrupted move into {dest / TREE}: "
                          "finish the move by hand, then remove it") from None
    if staging is not None and (not isinstance(staging, str) or "/" in staging
                                or staging in ("", ".", "..", TREE)):
        raise BackupError(f"{state / MIGRATION_RECORD} names no valid staging folder")
    marked = (state / LAYOUT_MARK).is_file()
    return plan_mirror_layout(names, marked=marked, staging=staging)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def migrate_mirror(dest: Path, state: Path, layout: MirrorLayout) -> int:
    """Move an old-layout mirror into ``DEST/tree``; return the number of entries moved.

    Call it with the lock held and DEST already 0700. Renames inside DEST only: one file
    system, each entry moved whole and at once. The staging folder is created before it is
    recorded, so a crash leaves either an unrecorded empty folder (moved along as part of
    the old tree by the next run, then removed by its ``--delete`` pull) or a record
    the next run resumes from.
    """
    assert layout.staging is not None
    staging = dest / layout.staging
    if not staging.is_dir():
        os.mkdir(staging, 0o700)
    _write_atomic(state / MIGRATION_RECORD, json.dumps({"staging": layout.staging}) + "\n")
    for name in layout.move:
        if os.path.lexists(staging / name):
            raise BackupError(f"both {dest / name} and {staging / name} exist: an earlier "
                              f"move into {dest / TREE} was disturbed; keep the right one, "
                              "remove the other, and run again")
        os.rename(dest / name, staging / name)
    os.rename(staging, dest / TREE)  # TREE was among the moved entries if the old tree had it
    mark_new_layout(state)
    (state / MIGRATION_RECORD).unlink(missing_ok=True)
    return len(layout.move)


def mark_new_layout(state: Path) -> None:
    if not (state / LAYOUT_MARK).is_file():
        _write_atomic(state / LAYOUT_MARK, TREE + "\n")


def has_delete(options: Iterable[str]) -> bool:
    return any(option == "--delete" or option.startswith("--delete-") or option == "--del"
               for option in options)


# --- running a backup -------------------------------------------------------------------


@dataclass
class BackupResult:
    host: str
    ok: bool
    exit_code: int | None
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    log_path: str | None = None
    summary_path: str | None = None
    snapshot: str | None = None
    warning: str | None = None
    error: str | None = None
    dry_run: bool = False


def state_dir(host: Host) -> Path:
    """``DEST.pullback``: the lock and the logs, beside (never inside) the backup."""
    return Path(host.destination.rstrip("/") + STATE_SUFFIX)


class Lock:
    """A non-blocking ``fcntl.flock`` on ``DEST.pullback/lock``; the file holds the pid.

    rsync inherits the locked descriptor (``pass_fds``), so when this process is killed
    and rsync lives on, the lock stays held until rsync exits too: no new run touches the
    ``.partial`` folder an orphaned rsync still writes into.
    """

    def __init__(self, path: Path, host: str) -> None:
        self.path, self.host = path, host
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def __enter__(self) -> Lock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            also = f", rsync pid {holder[2]}" if len(holder) > 2 else ""
            raise BackupError(f"another backup of {self.host} is running (pid {pid}{also}); "
                              f"lock {self.path}") from None
        self._fd = fd
        self.record()
        return self

    def record(self, rsync_pid: int | None = None) -> None:
        text = f"{os.getpid()}" + (f" rsync {rsync_pid}" if rsync_pid else "") + "\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)


def prepare_state(host: Host) -> Path:
    """``DEST.pullback`` and its ``logs``, 0700, after checking that DEST and the state
    folder sit where nobody else can swap them; BackupError (one line, the fix) if not."""
    state = state_dir(host)
    try:
        folders.check_folder(host.destination.rstrip("/"))
        folders.make_private(state)
        _mkdir_private(state / "logs")
    except folders.FolderError as exc:
        raise BackupError(f"refused: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot create {state}: {exc.strerror}") from None
    return state


def _rmtree(path: Path) -> None:
    def retry(func: Any, failed: str, _exc: Any) -> None:
        # A read-only folder copied from the server (0555) blocks unlinking inside it.
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        func(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _rsync_env() -> dict[str, str]:
    """rsync prints ``1,234`` only when the decimal point is '.': pin LC_NUMERIC."""
    env = dict(os.environ)
    lc_all = env.pop("LC_ALL", None)
    if lc_all:
        for key in [k for k in env if k.startswith("LC_")]:
            del env[key]
        env["LANG"] = lc_all
    env["LC_NUMERIC"] = "C"
    return env


def stream(argv: list[str], log: BinaryIO, echo: BinaryIO | None,
           lock: Lock | None = None) -> tuple[int, OutputScanner]:
    """Run ``argv``; copy its output in chunks to ``log`` (and ``echo``); return the exit code."""
    scanner = OutputScanner()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_rsync_env(),
                            pass_fds=(lock.fd,) if lock else ())
    if lock:
        lock.record(proc.pid)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while chunk := os.read(fd, CHUNK):
            log.write(chunk)
            scanner.feed(chunk)
            if echo is not None:
                echo.write(chunk)
                echo.flush()
    except BaseException:
        # Interrupted (Ctrl-C, a full disk for the log): never leave rsync running unowned.
        proc.terminate()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    code = proc.wait()
    scanner.close()
    return code, scanner


def count_entries(root: Path) -> int:
    """What rsync's ``Number of files`` counts for a copy of ``root``: every entry (files,
    folders, links, devices...), ``root`` itself included; links are not followed.

    A walk in Python, per file: only the fallback for a snapshot whose summary is gone
    (removed by hand: log pruning keeps the summaries of complete snapshots)."""
    total = 1
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                total += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return total


def snapshot_file_count(dest: Path, logs: Path, snapshot: str) -> tuple[int, str]:
    """``(count, where)``: ``Number of files`` of the run that made ``snapshot`` (its summary
    in ``logs``), else counted on disk (a summary pruned away or written before the count
    was recorded)."""
    try:
        data = json.loads((logs / f"{snapshot}.json").read_text())
        files = data["stats"]["files"]
        if isinstance(files, int) and not isinstance(files, bool) and data.get("ok"):
            return files, f"{logs / snapshot}.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return count_entries(dest / snapshot), f"counted in {dest / snapshot}"


def check_shrink(files: int | None, previous: int, snapshot: str, where: str,
                 max_delete: int) -> str | None:
    """Why a snapshot run must not be promoted (its source shrank too much), or None."""
    if files is None:
        return (f"rsync printed no 'Number of files', so the empty-source guard "
                f"(backup.max_delete {max_delete}) cannot compare the run with snapshot "
                f"{snapshot}")
    dropped = previous - files
    if dropped <= max_delete:
        return None
    return (f"the source has {files} files, the newest snapshot {snapshot} has {previous} "
            f"({where}): {dropped} fewer, more than backup.max_delete {max_delete}; the "
            "source may have come back empty or nearly empty (a missing mount, a failed "
            "disk)")


def _finish_snapshot(dest: Path, partial: Path, run: str, keep: int,
                     warnings: list[str]) -> tuple[str, list[str]]:
    """Rename the partial into place, point ``latest`` at it (atomically), prune."""
    final = dest / run
    os.rename(partial, final)
    tmp = dest / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run, tmp)
    os.replace(tmp, dest / LATEST)
    pruned: list[str] = []
    for name in plan_prune(os.listdir(dest), keep):
        try:
            _rmtree(dest / name)
            pruned.append(name)
        except OSError as exc:  # the new snapshot is complete; pruning is retried next run
            warnings.append(f"could not remove old snapshot {name}: {exc}")
    return str(final), pruned


def run_backup(host: Host, *, dry_run: bool, tty: bool,
               echo: BinaryIO | None = None) -> BackupResult:
    """Pull ``host`` once (mirror or snapshot mode); raise BackupError if it cannot start.

    ``tty``: keep the progress options and show rsync's output live (on ``echo``, default
    this process's stdout).
    """
    from roles.local import keys

    rsync, warning = find_local_rsync(host)
    warnings = [warning] if warning else []
    fingerprint: str | None = None
    if host.forced_command == "captured":
        from roles.features import capture

        try:
            fingerprint = capture.require_record(host, rsync).fingerprint
        except capture.CaptureError as exc:
            raise BackupError(str(exc)) from None
    try:
        keys.check_private_key(Path(host.backup_key))
    except keys.KeyFileError as exc:
        raise BackupError(str(exc)) from None
    dest = Path(host.destination.rstrip("/"))
    state = prepare_state(host)
    logs = state / "logs"
    snapshots = host.backup.snapshots
    with Lock(state / "lock", host.name) as lock:
        started = datetime.now(UTC)
        t0 = time.monotonic()
        if not dry_run:
            try:
                note = folders.make_private(dest)
            except folders.FolderError as exc:
                raise BackupError(f"refused: {exc}") from None
            if note:
                warnings.append(f"{note} (it holds copies of root's files)")
        entries = os.listdir(dest) if dest.is_dir() else []
        problem = check_layout(dest, entries, snapshots)
        if problem:
            raise BackupError(problem)
        run = new_run_id(started, [*entries, *(p.stem for p in logs.iterdir())])
        link_dest: str | None = None
        target = dest / TREE
        newest: str | None = None
        if not snapshots:
            layout = read_mirror_layout(dest, state)
            if layout.state != "new" and dry_run:
                target = dest  # the old tree, where it is until a real run moves it
                warnings.append(f"{dest} holds the old layout: a real run first moves it "
                                f"into {target / TREE} (mode 0700 around it)")
            elif layout.state != "new":
                try:
                    moved = migrate_mirror(dest, state, layout)
                except OSError as exc:
                    raise BackupError(f"moving the old layout into {dest / TREE} stopped: "
                                      f"{exc}; nothing is lost, the next run goes on "
                                      "from here") from None
                warnings.append(f"moved the old layout's {moved} entries into {target}")
            elif not dry_run:
                mark_new_layout(state)
            if layout.strays:
                warnings.append(f"{dest} holds {', '.join(layout.strays)} besides {TREE}: "
                                "not part of the backup, left alone")
        else:
            newest = newest_snapshot(entries)
            link_dest = str(dest / newest) if newest else None
            target = dest / (run + PARTIAL)
            if not dry_run:
                resume, stale = plan_partials(entries, resume=has_delete(host.backup.options))
                for name in stale:
                    _rmtree(dest / name)
                if resume:
                    os.rename(dest / resume, target)
                    warnings.append(f"resumed the interrupted run {resume}")
        argv = build_argv(host, dry_run=dry_run, tty=tty, local_rsync=rsync,
                          dest=str(target), link_dest=link_dest,
                          progress2=tty and both_ends_have_progress2(host, rsync))
        log_path = logs / f"{run}.log"
        with open(log_path, "wb") as log:
            os.fchmod(log.fileno(), 0o600)
            log.write(f"# {shlex.join(argv)}\n".encode())
            log.flush()
            out = echo if echo is not None else (sys.stdout.buffer if tty else None)
            code, scanner = stream(argv, log, out, lock)
        seconds = round(time.monotonic() - t0, 3)
        stats = parse_stats(scanner.tail)
        ok = code in OK_CODES
        error = None if ok else describe_failure(code, scanner.errors)
        if code == 24:
            warnings.append("some files vanished on the server during the transfer "
                            "(rsync code 24); everything else was copied")
        refused: str | None = None
        max_delete = host.backup.max_delete
        if ok and snapshots and newest is not None and max_delete is not None:
            previous, where = snapshot_file_count(dest, logs, newest)
            shrunk = check_shrink(stats.get("files"), previous, newest, where, max_delete)
            if shrunk and dry_run:
                warnings.append(f"a real run would be refused: {shrunk}")
            elif shrunk:
                refused = (f"refused to promote the run: {shrunk}. The run was removed, "
                           "`latest` and every snapshot are unchanged, nothing was pruned; "
                           "check the server, and only if the drop is intended raise "
                           "backup.max_delete for one run")
        snapshot: str | None = None
        pruned: list[str] = []
        if refused:
            ok, error = False, refused
            try:
                if target.exists():
                    _rmtree(target)
            except OSError as exc:  # never promoted; the next run resumes or removes it
                warnings.append(f"could not remove the refused {target.name}: {exc}")
        elif ok and snapshots and not dry_run:
            snapshot, pruned = _finish_snapshot(dest, target, run, snapshots, warnings)
        elif not ok and snapshots and not dry_run and target.exists():
            warnings.append(f"{target.name} kept for the next run; earlier snapshots are "
                            "intact")
        result = BackupResult(
            host=host.name, ok=ok, exit_code=code, seconds=seconds, stats=stats,
            log_path=str(log_path), summary_path=str(logs / f"{run}.json"),
            snapshot=snapshot, warning="; ".join(warnings) or None, error=error,
            dry_run=dry_run,
        )
        summary = {**asdict(result), "run": run, "started": started.isoformat(),
                   "mode": "snapshot" if snapshots else "mirror", "argv": argv,
                   "destination": str(dest), "pruned": pruned,
                   "forced_command": host.forced_command, "capture_fingerprint": fingerprint}
        tmp = logs / f".{run}.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, logs / f"{run}.json")
        from roles.features import status  # status reads these summaries; it imports this module

        status.prune_logs(logs, protect=complete_snapshots(os.listdir(dest))
                          if snapshots and dest.is_dir() else ())
        return result


def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{value} B"  # pragma: no cover


def result_label(result: BackupResult) -> str:
    if not result.ok:
        return "failed"
    label = "dry-run" if result.dry_run else "ok"
    return f"{label} (24)" if result.exit_code == 24 else label


def format_table(results: Iterable[BackupResult]) -> str:
    """The end-of-run summary: one row per host."""
    rows = [("host", "result", "seconds", "files", "transferred", "received", "snapshot")]
    for r in results:
        files = r.stats.get("files_transferred")
        total = r.stats.get("files")
        rows.append((
            r.host, result_label(r), f"{r.seconds:.1f}",
            "-" if files is None else f"{files}/{total if total is not None else '?'}",
            human_bytes(r.stats.get("transferred_size")),
            human_bytes(r.stats.get("bytes_received")),
            Path(r.snapshot).name if r.snapshot else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows) + "\n"


def pull_all(hosts: list[Host], *, dry_run: bool, out: Any = None, err: Any = None) -> list[str]:
    """``backup`` for a fleet (``invoke backup`` and ``pullback-backup``): pull every host,
    ``backup.parallel`` at a time; print warnings and failures (``err``) and the table
    (``out``); return the hosts that failed. Live output only for one host on a terminal:
    several interleaved streams are noise."""
    from roles.core import fleet

    out = out or sys.stdout
    err = err or sys.stderr
    tty = len(hosts) == 1 and out.isatty()

    def failed(h: Host, exc: Exception) -> BackupResult:
        reason = str(exc) if isinstance(exc, BackupError) else f"{type(exc).__name__}: {exc}"
        return BackupResult(h.name, ok=False, exit_code=None, seconds=0.0, error=reason)

    results = fleet.for_each(
        hosts, lambda h: run_backup(h, dry_run=dry_run, tty=tty), failed,
        parallel=max(h.backup.parallel for h in hosts),
    )
    for r in results:
        if r.warning:
            print(f"{r.host}: warning: {r.warning}", file=err)
        if r.error:
            print(f"{r.host}: failed: {r.error}", file=err)
        if r.log_path and not r.ok:
            print(f"{r.host}: log: {r.log_path}", file=err)
    out.write(format_table(results))
    out.flush()
    return [r.host for r in results if not r.ok]


# --- restore ----------------------------------------------------------------------------


def _has_flag(options: Iterable[str], short: str, long: str) -> bool:
    for option in options:
        if option == long:
            return True
        if re.match(r"^-[A-Za-z]+$", option) and short in option[1:]:
            return True
    return False


def backup_root(host: Host, snapshot: str | None) -> Path:
    """The folder holding the copy of ``backup.source``: the mirror or a snapshot.

    The mirror is ``DEST/tree``; a DEST still in the old layout (no backup has run since
    the upgrade) is read where it is: reading moves nothing.
    """
    dest = Path(host.destination.rstrip("/"))
    if not host.backup.snapshots:
        if snapshot:
            raise RestoreError(f"{host.name} keeps one mirror (backup.snapshots: 0); "
                               "--snapshot does not apply")
        try:
            layout = read_mirror_layout(dest, state_dir(host))
        except BackupError as exc:
            raise RestoreError(str(exc)) from None
        if layout.state == "migrating":
            raise RestoreError(f"the move of {dest} into {dest / TREE} was interrupted; "
                               f"run `invoke backup --host {host.name}` to finish it")
        root = dest if layout.state == "old" else dest / TREE
        if not root.is_dir():
            raise RestoreError(f"no backup of {host.name} at {root}")
        return root
    names = os.listdir(dest) if dest.is_dir() else []
    available = complete_snapshots(names)
    if not snapshot or snapshot == LATEST:
        if not available:
            raise RestoreError(f"no complete snapshot of {host.name} in {dest}")
        return dest / available[-1]
    if snapshot not in available:
        shown = ", ".join(available[-5:]) or "none"
        raise RestoreError(f"no snapshot {snapshot!r} of {host.name} (newest: {shown})")
    return dest / snapshot


def restore_relpath(host: Host, path: str) -> PurePosixPath:
    """Server path ``path`` relative to ``backup.source``; refuse ``..`` and outside paths."""
    wanted = PurePosixPath(path)
    if not wanted.is_absolute():
        raise RestoreError(f"--path must be the absolute path on the server, got {path!r}")
    if ".." in wanted.parts:
        raise RestoreError(f"--path must not contain '..' (it would leave the backup): {path!r}")
    source = PurePosixPath(host.backup.source)
    try:
        return wanted.relative_to(source)
    except ValueError:
        raise RestoreError(f"{path} is not inside backup.source {source}") from None


def resolve_restore_path(host: Host, root: Path, path: str) -> Path:
    """The backup's copy of server path ``path``; refuse ``..``, symlinked folders, others."""
    relative = restore_relpath(host, path)
    source = PurePosixPath(host.backup.source)
    current = root
    for index, part in enumerate(relative.parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise RestoreError(f"{path} is not in the backup ({current} is missing)") from None
        if stat.S_ISLNK(info.st_mode) and index < len(relative.parts) - 1:
            # Following it would read the backup host's own files (an absolute link) or
            # another part of the backup: name the real path instead.
            target = os.readlink(current)
            raise RestoreError(f"{source / PurePosixPath(*relative.parts[:index + 1])} is a "
                               f"symlink to {target} in the backup; give the path it points to")
    return current


def build_restore_argv(local_rsync: str, options: Iterable[str], source: Path, *,
                       is_dir: bool, to: str) -> list[str]:
    """``rsync -a --numeric-ids -H [-A] [-X] SRC[/] TO/``: a folder's contents land in TO."""
    options = list(options)
    argv = [local_rsync, "-a", "--numeric-ids", "-H"]
    if _has_flag(options, "A", "--acls"):
        argv.append("-A")
    if _has_flag(options, "X", "--xattrs"):
        argv.append("-X")
    argv += [str(source) + ("/" if is_dir else ""), to.rstrip("/") + "/"]
    return argv


@dataclass
class RestoreResult:
    ok: bool
    exit_code: int
    argv: list[str]
    source: str
    output: str
    error: str | None = None
    warning: str | None = None
    target: str = ""  # TO/tree: where the copy landed


def check_restore_container(to: Path, names: list[str], mode: int | None, *,
                            force: bool) -> str | None:
    """Pure: why ``to`` cannot take a restore into ``to/tree``, or None.

    ``to`` is the 0700 container: a missing or empty folder becomes one. A non-empty
    folder that others can enter is refused rather than closed behind their back (its
    other contents may be meant for them); a non-empty ``tree`` needs ``--force``.
    """
    if mode is None:
        return None
    if not stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return f"{to} exists and is not a folder"
    if names and stat.S_IMODE(mode) & 0o077:
        return (f"{to} has mode {stat.S_IMODE(mode):04o} and is not empty: the restored "
                "files (setuid ones included) would be within other users' reach; "
                f"chmod 700 {to}, or give a new folder")
    if TREE in names and not force:
        return (f"{to / TREE} exists; use --force to copy over it (files there that are not "
                "in the backup are kept)")
    return None


def run_restore(host: Host, *, path: str, to: str, snapshot: str | None = None,
                force: bool = False) -> RestoreResult:
    """Copy ``path`` (a server path) out of the local backup into ``to``."""
    restore_relpath(host, path)
    root = backup_root(host, snapshot)
    source = resolve_restore_path(host, root, path)
    target = Path(os.path.normpath(Path(to).absolute()))
    dest = Path(host.destination.rstrip("/")).resolve()
    if target.resolve() == dest or target.resolve().is_relative_to(dest):
        raise RestoreError(f"{to} is inside the backup {dest}; restore somewhere else")
    try:
        folders.check_folder(target)
    except folders.FolderError as exc:
        raise RestoreError(f"refused: {exc}") from None
    try:
        info = os.lstat(target)
        names = os.listdir(target) if stat.S_ISDIR(info.st_mode) else []
        mode: int | None = info.st_mode
    except FileNotFoundError:
        names, mode = [], None
    problem = check_restore_container(target, names, mode, force=force)
    if problem:
        raise RestoreError(problem)
    if (target / TREE).is_symlink() or ((target / TREE).exists()
                                        and not (target / TREE).is_dir()):
        raise RestoreError(f"{target / TREE} exists and is not a folder")
    rsync, warning = find_local_rsync(host)
    is_dir = stat.S_ISDIR(os.lstat(source).st_mode)
    try:
        note = folders.make_private(target)  # rsync creates the last level, TO/tree
    except folders.FolderError as exc:
        raise RestoreError(f"refused: {exc}") from None
    if note:
        warning = "; ".join(filter(None, [warning, note]))
    argv = build_restore_argv(rsync, host.backup.options, source, is_dir=is_dir,
                              to=str(target / TREE))
    result = subprocess.run(argv, capture_output=True, env=_rsync_env(), check=False,
                            stdin=subprocess.DEVNULL)
    output = (result.stdout + result.stderr).decode(errors="replace")
    error = None
    if result.returncode != 0:
        scanner = OutputScanner()
        scanner.feed(result.stdout + result.stderr + b"\n")
        scanner.close()
        error = describe_failure(result.returncode, scanner.errors)
    return RestoreResult(ok=result.returncode == 0, exit_code=result.returncode, argv=argv,
                         source=str(source), output=output, error=error, warning=warning,
                         target=str(target / TREE))
