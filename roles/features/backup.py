"""backup and restore: build the pull's argv, run it, keep snapshots, copy paths back out.

The pull is::

    RSYNC -e "ssh -F /dev/null -i KEY -p PORT -o StrictHostKeyChecking=yes
              -o UserKnownHostsFile=KH -o GlobalKnownHostsFile=/dev/null -o BatchMode=yes
              -o IdentitiesOnly=yes -o ForwardAgent=no ... (roles.core.pull.ssh_command)"
          OPTIONS --stats [--exclude=P ...] [-n] [--max-delete=N]
          [--link-dest=DEST/<newest>] SRC DEST/

The local rsync (and the ssh it spawns) runs inside the bubblewrap sandbox of
``roles.core.sandbox`` (``backup.sandbox``, default on): it may write only DEST, sees
neither the other hosts' copies nor ``/tmp`` and ``/run``, and keeps six capabilities; a
sandboxed ``-X`` pull leaves out ``trusted.*`` xattrs, which it could not set.

Before anything (key, lock, destination) the local rsync's version is checked: older than
3.4.1 (no fixes for CVE-2024-12084..12088, through which a server attacks its client) is
refused unless ``rsync.allow_vulnerable``. The pinned build's version is its build stamp
(no extra process on the scheduled path); PATH's rsync is asked with ``--version``.

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

Empty-source guard: in mirror mode (with a ``--delete`` option) ``backup.max_delete`` is
checked BEFORE the pull: rsync's ``--max-delete=N`` alone still deletes the first N files
(every version, 2.6.9 to 3.x: it only skips the deletions past N, then exits 25), so a dry
run of the same pull (``-n --max-delete=N``: its deletions are counted, none happen) goes
first, in the same log; when it reports the limit exceeded the run fails and nothing was
deleted or transferred. Only then does the real pull run, still with ``--max-delete=N``
against a source emptied between the two. The cost is one more pass over both file
lists (no data moves). In daemon mode the check's daemon may hold the module's lock for a
moment after its client exits (max connections = 1): the real pull retries that refusal
for up to 10 s. ``max_delete: 0`` (delete nothing) is refused with a local rsync before
3.0.0, which reads it as "no limit". A new snapshot deletes nothing, so there it is checked
after the pull instead: when ``Number of files`` (``--stats``) fell by more than
``max_delete`` below the newest complete snapshot's (its ``logs/<snapshot>.json``; without
one, counted on disk), the ``.partial`` is removed rather than promoted, ``latest`` and
every snapshot stay as they are, nothing is pruned and the run fails naming both counts.
Removed, not kept: kept it would only be resumed by the next run, and left unpromoted it
would hold the disk for nothing; the run's log and summary show what the source sent.

Progress: on a terminal the user's ``--progress`` (or ``--info=progress2``, which needs a
local rsync >= 3.1) is kept and the output is shown live; otherwise those options are
dropped and the output goes only to the log. A fleet view (``pull_all``'s ``watch``:
``invoke backup``'s live lines, ``roles.cli.progress``) keeps them too, without a terminal
for ssh, and reads the output instead of showing it. Nothing here imports Fabric or paramiko:
``backup`` runs unattended with only the backup key, and its start-up stays lean.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from roles.core import fleet
from roles.core.hardened import Mode
from roles.core.pull import (
    CHECK_COMPLETE,
    OK_CODES,
    build_argv,
    deletion_check,
    describe_failure,
    has_delete,
    max_delete_problem,
    not_a_backup,
    parse_stats,
)
from roles.core.rsync import CaptureError
from roles.core.rsync_errors import EXIT_CODES, explain_exit  # noqa: F401 - re-exported
from roles.core.spec import HostSpec
from roles.core.ssh_failures import classify_ssh_failure
from roles.core.table import format_rows
from roles.local import capture_record, folders, keys, metrics
from roles.local.files import write_atomic
from roles.local.ping import send_ping
from roles.local.runner import (
    both_ends_have_progress2,
    find_bwrap,
    find_local_rsync,
    local_rsync_version,
    pull_sandboxed,
    refuse_exposed_client,
    stream,
)
from roles.local.store import (
    PARTIAL,
    TREE,
    BackupError,
    Lock,
    check_layout,
    check_shrink,
    complete_snapshots,
    finish_snapshot,
    human_bytes,
    last_mirror_run,
    mark_new_layout,
    migrate_mirror,
    new_run_id,
    newest_snapshot,
    plan_partials,
    plan_tree_snapshot,
    point_latest,
    prepare_state,
    prune_logs,
    read_mirror_layout,
    retention_of,
    rmtree,
    snapshot_file_count,
)

# A live view's way in: called once the pull's options are known with ``whole`` (the output
# is --info=progress2's), it gives where the pull's output goes besides the log.
Progress = Callable[[bool], BinaryIO]

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


def run_backup(host: HostSpec, *, dry_run: bool, tty: bool,
               echo: BinaryIO | None = None, lock: Lock | None = None,
               progress: Progress | None = None) -> BackupResult:
    """Pull ``host`` once (mirror or snapshot mode); raise BackupError if it cannot start.

    ``lock``: the host's lock, already held by the caller (around backup.pre and post).

    ``tty``: keep the progress options and show rsync's output live (on ``echo``, default
    this process's stdout).

    ``progress`` (a fleet's live view): the progress options are kept without ``tty`` (ssh
    stays in batch mode), and the pull's output goes to ``progress(whole)`` as well as the
    log; ``whole`` says it is ``--info=progress2``'s (``roles.core.progress``).
    """
    rsync, warning = find_local_rsync(host)
    local_version = local_rsync_version(host, rsync)
    refusal = refuse_exposed_client(host, rsync, local_version) \
        or max_delete_problem(host.backup.max_delete, local_version)
    if refusal:  # before the key, the lock or the destination are touched
        raise BackupError(refusal)
    bwrap = find_bwrap(host)
    warnings = [warning] if warning else []
    fingerprint: str | None = None
    if host.forced_command == Mode.CAPTURED:
        try:
            fingerprint = capture_record.require_record(host, rsync).fingerprint
        except CaptureError as exc:
            raise BackupError(str(exc)) from None
    try:
        keys.check_private_key(Path(host.backup_key))
    except keys.KeyFileError as exc:
        raise BackupError(str(exc)) from None
    dest = Path(host.destination.rstrip("/"))
    state = prepare_state(host)
    logs = state / "logs"
    snapshots = host.backup.snapshots
    with contextlib.nullcontext(lock) if lock else Lock(state / "lock", host.name) as lock:
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
            link_dest = None
            first = plan_tree_snapshot(
                entries, tree_is_dir=(dest / TREE).is_dir() and not (dest / TREE).is_symlink(),
                last_mirror=last_mirror_run(logs) if TREE in entries else None,
                fallback=new_run_id(started - timedelta(seconds=1), entries))
            if first is not None and dry_run:
                link_dest = str(dest / TREE)
                warnings.append(f"a real run first turns the mirror {dest / TREE} into the "
                                f"first snapshot {first}")
            elif first is not None:
                os.rename(dest / TREE, dest / first)
                point_latest(dest, first)
                entries = os.listdir(dest)
                warnings.append(f"the mirror {dest / TREE} became the first snapshot {first} "
                                f"(backup.snapshots is {snapshots}); this run hard-links its "
                                "unchanged files")
            newest = newest_snapshot(entries)
            link_dest = str(dest / newest) if newest else link_dest
            target = dest / (run + PARTIAL)
            if not dry_run:
                resume, stale = plan_partials(entries, resume=has_delete(host.backup.options))
                for name in stale:
                    rmtree(dest / name)
                if resume:
                    os.rename(dest / resume, target)
                    warnings.append(f"resumed the interrupted run {resume}")
        shown = tty or progress is not None
        progress2 = shown and both_ends_have_progress2(host, local_version)
        argv = build_argv(host, dry_run=dry_run, tty=tty, local_rsync=rsync,
                          dest=str(target), link_dest=link_dest, progress2=progress2,
                          sandboxed=bwrap is not None, progress=shown)
        # Only DEST is writable for the receiving rsync (and its ssh): roles.core.sandbox.
        run_argv = pull_sandboxed(host, argv, bwrap, interactive=tty)
        max_delete = host.backup.max_delete
        check: dict[str, Any] | None = None
        log_path = logs / f"{run}.log"
        with open(log_path, "wb") as log:
            os.fchmod(log.fileno(), 0o600)
            out = echo if echo is not None else (sys.stdout.buffer if tty else None)
            if progress is not None:
                out = progress(progress2)
            if (not snapshots and not dry_run and max_delete is not None
                    and has_delete(host.backup.options)):
                check, refused_early = _deletion_check(host, rsync, bwrap, target, log,
                                                       lock, max_delete)
                if refused_early is not None:
                    return _finish_refused(host, run, started, t0, dest, logs, log_path,
                                           check, refused_early, warnings, fingerprint)
            log.write(f"# {shlex.join(run_argv)}\n".encode())
            log.flush()
            code, scanner = _stream_retrying(run_argv, log, out, lock,
                                             retry=check is not None)
        seconds = round(time.monotonic() - t0, 3)
        stats = parse_stats(scanner.tail)
        ok = code in OK_CODES
        error = None if ok else describe_failure(code, scanner.errors)
        # rsync's own word: a run that printed (DRY RUN) is never a backup, whatever asked.
        nothing_copied = None if dry_run else not_a_backup(stats)
        if ok and nothing_copied:
            ok, error = False, nothing_copied
        if code == 24:
            warnings.append("some files vanished on the server during the transfer "
                            "(rsync code 24); everything else was copied")
        refused: str | None = None
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
                    rmtree(target)
            except OSError as exc:  # never promoted; the next run resumes or removes it
                warnings.append(f"could not remove the refused {target.name}: {exc}")
        elif ok and snapshots and not dry_run:
            snapshot, pruned = finish_snapshot(dest, target, run, retention_of(host),
                                               warnings)
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
                   "sandbox": run_argv[:run_argv.index("--") + 1] if bwrap else None,
                   "destination": str(dest), "pruned": pruned,
                   "forced_command": host.forced_command, "capture_fingerprint": fingerprint,
                   "deletion_check": check}
        write_atomic(logs / f"{run}.json", (json.dumps(summary, indent=2) + "\n").encode(),
                     0o600)
        prune_logs(logs, protect=complete_snapshots(os.listdir(dest))
                          if snapshots and dest.is_dir() else ())
        return result


# The daemon of the check's connection still holds the module's lock for a moment after
# its client exits (max connections = 1): the real pull retries that refusal, briefly.
BUSY_RETRIES = 20
BUSY_WAIT = 0.5


def _deletion_check(host: HostSpec, rsync: str, bwrap: str | None, target: Path,
                    log: BinaryIO, lock: Lock,
                    max_delete: int) -> tuple[dict[str, Any], str | None]:
    """Mirror mode with ``backup.max_delete``: a dry run of the same pull first, counting
    what it would delete (``roles.core.pull.deletion_check``). ``(record, refusal)``: the
    refusal (one line) when the real pull must not run; nothing has been deleted then."""
    argv = build_argv(host, dry_run=True, tty=False, local_rsync=rsync, dest=str(target),
                      sandboxed=bwrap is not None)
    run_argv = pull_sandboxed(host, argv, bwrap)
    log.write(f"# deletion check (dry run): {shlex.join(run_argv)}\n".encode())
    log.flush()
    t0 = time.monotonic()
    code, scanner = stream(run_argv, log, None, lock)
    stats = parse_stats(scanner.tail)
    over, would = deletion_check(code, scanner.errors, stats, max_delete)
    record = {"argv": argv, "exit_code": code, "seconds": round(time.monotonic() - t0, 3),
              "would_delete": would, "over_limit": over}
    log.write(b"\n")
    if over:
        count = f"at least {would}" if would is not None else f"more than {max_delete}"
        return record, (
            f"refused before any deletion: the pull would delete {count} files from "
            f"{target}, more than backup.max_delete {max_delete} (a dry run found it; "
            "nothing was deleted or transferred). The source may have come back empty or "
            "nearly empty (a missing mount, a failed disk, a wiped server): check the "
            "server, and only if the deletions are intended raise backup.max_delete for "
            "one run")
    if code not in CHECK_COMPLETE:
        return record, ("the deletion check (a dry run before the pull) failed, so the "
                        "pull did not run: " + describe_failure(code, scanner.errors))
    return record, None


def _stream_retrying(argv: list[str], log: BinaryIO, out: BinaryIO | None, lock: Lock, *,
                     retry: bool) -> tuple[int, Any]:
    """``stream``; after a deletion check, a daemon still busy with the check's connection
    (``@ERROR: max connections``, exit 5, nothing done yet) is waited for."""
    for attempt in range(BUSY_RETRIES if retry else 1):
        code, scanner = stream(argv, log, out, lock)
        busy = code == 5 and any("max connections" in e for e in scanner.errors)
        if not (retry and busy) or attempt == BUSY_RETRIES - 1:
            break
        log.write(b"# the module is still busy with the check's connection: again\n")
        time.sleep(BUSY_WAIT)
    return code, scanner


def _finish_refused(host: HostSpec, run: str, started: datetime, t0: float, dest: Path,
                    logs: Path, log_path: Path, check: dict[str, Any], error: str,
                    warnings: list[str], fingerprint: str | None) -> BackupResult:
    """The result and summary of a mirror run the deletion check stopped."""
    result = BackupResult(
        host=host.name, ok=False, exit_code=check["exit_code"],
        seconds=round(time.monotonic() - t0, 3), stats={}, log_path=str(log_path),
        summary_path=str(logs / f"{run}.json"), warning="; ".join(warnings) or None,
        error=error)
    summary = {**asdict(result), "run": run, "started": started.isoformat(), "mode": "mirror",
               "argv": check["argv"], "destination": str(dest), "pruned": [],
               "forced_command": host.forced_command, "capture_fingerprint": fingerprint,
               "deletion_check": check}
    write_atomic(logs / f"{run}.json", (json.dumps(summary, indent=2) + "\n").encode(), 0o600)
    prune_logs(logs)
    return result


def hooks_for(host: HostSpec) -> Any:
    """The host's ``backup.pre`` / ``backup.post`` runner (``roles.remote.hooks.Hooks``:
    ``.run(which)`` gives None or one line), or None when it has neither."""
    if not (getattr(host.backup, "pre", ()) or getattr(host.backup, "post", ())):
        return None
    # Deferred, and the one edge the lean-path contract ignores for it: only a host with
    # hooks loads Fabric and paramiko (pyproject.toml, docs/architecture.md).
    from roles.remote.hooks import Hooks

    return Hooks(host)


def backup_with_hooks(host: HostSpec, *, dry_run: bool, tty: bool,
                      progress: Progress | None = None) -> BackupResult:
    """One host's run: ping ``start``, ``backup.pre``, the pull, ``backup.post``, ping the
    result. A failing pre command stops the pull; post runs whenever the pull was tried
    (after pre succeeded), good or not. A dry run runs no hook and sends no ping. With
    hooks the host's lock is held from before pre to after post: a second run refused by
    the lock runs no hook (its pre would rewrite a dump the first run is pulling)."""
    monitor = getattr(host, "monitor", None)
    url = getattr(monitor, "ping_url", None) if not dry_run else None
    notes: list[str] = []
    if url:
        note = send_ping(url, "start")
        if note:
            notes.append(note)
    if dry_run:
        hooks = [f"backup.{w} `{shlex.join(getattr(host.backup, w))}`"
                 for w in ("pre", "post") if getattr(host.backup, w, ())]
        if hooks:
            notes.append(f"a real run also runs {' and '.join(hooks)} (not in a dry run)")
    t0 = time.monotonic()
    hooked = not dry_run and bool(getattr(host.backup, "pre", ())
                                  or getattr(host.backup, "post", ()))
    try:
        with _hook_lock(host) if hooked else contextlib.nullcontext() as lock:
            result = _pull_between_hooks(host, dry_run=dry_run, tty=tty, lock=lock, t0=t0,
                                         progress=progress)
    except BackupError as exc:  # the lock is held, or the state folder is unusable
        result = BackupResult(host.name, ok=False, exit_code=None,
                              seconds=round(time.monotonic() - t0, 3), error=str(exc))
    if url:
        note = send_ping(url, "success" if result.ok else "fail",
                         "" if result.ok else f"{host.name}: {result.error}")
        if note:
            notes.append(note)
    if notes:
        result.warning = "; ".join([*([result.warning] if result.warning else []), *notes])
    return result


def _hook_lock(host: HostSpec) -> Lock:
    return Lock(prepare_state(host) / "lock", host.name)


def _pull_between_hooks(host: HostSpec, *, dry_run: bool, tty: bool, lock: Lock | None,
                        t0: float, progress: Progress | None = None) -> BackupResult:
    hooks = None if dry_run else hooks_for(host)
    problem = hooks.run("pre") if hooks else None
    if problem:
        return BackupResult(host.name, ok=False, exit_code=None,
                            seconds=round(time.monotonic() - t0, 3),
                            error=f"{problem}; the pull did not run")
    try:
        result = run_backup(host, dry_run=dry_run, tty=tty, lock=lock, progress=progress)
    except Exception as exc:  # noqa: BLE001 - one line per host; post and ping still run
        reason = str(exc) if isinstance(exc, BackupError) else f"{type(exc).__name__}: {exc}"
        result = BackupResult(host.name, ok=False, exit_code=None,
                              seconds=round(time.monotonic() - t0, 3), error=reason)
    after = hooks.run("post") if hooks else None
    if after:
        result.ok = False
        result.error = f"{result.error}; {after}" if result.error else after
    return result


def report_metrics(hosts: list[HostSpec], results: list[BackupResult],
                   started: dict[str, float]) -> list[str]:
    """Write each ``monitor.metrics_file`` with its hosts' results (``started``: each
    host's start, Unix time); one line per file that could not be written (a backup's
    result never depends on it)."""
    by_name = {h.name: h for h in hosts}
    files: dict[str, list[metrics.RunMetrics]] = {}
    now = time.time()
    for r in results:
        path = getattr(getattr(by_name.get(r.host), "monitor", None), "metrics_file", None)
        if not path:
            continue
        files.setdefault(path, []).append(metrics.RunMetrics(
            host=r.host, started=round(started.get(r.host, now - r.seconds), 3),
            seconds=r.seconds, ok=r.ok,
            exit_code=r.exit_code, files=r.stats.get("files"),
            transferred=r.stats.get("transferred_size"),
            received=r.stats.get("bytes_received")))
    problems = []
    for path, runs in files.items():
        try:
            metrics.update_metrics(Path(path), runs)
        except OSError as exc:
            problems.append(f"could not write the metrics file {path}: {exc}")
    return problems


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
    return format_rows(rows)


def failure_line(result: BackupResult, next_step: Callable[[str, str], str] | None) -> str:
    """One line: the host, why it failed, its log, the command to run next."""
    error = result.error or f"rsync exit {result.exit_code}"
    line = f"{result.host}: failed: {error}"
    if result.log_path:
        line += f" (log: {result.log_path})"
    if next_step is not None:
        failure = classify_ssh_failure(error)
        line += f"; next: {next_step(result.host, failure.task if failure else 'doctor')}"
    return line


class Watch(Protocol):
    """What a view of a fleet's run hears (``invoke backup``: ``roles.cli.progress``)."""

    live: bool  # it reads the pulls' progress output (the progress options are kept)

    def started(self, host: str) -> None: ...

    def output(self, host: str, whole: bool) -> BinaryIO: ...

    def finished(self, result: BackupResult) -> None: ...

    def close(self) -> None: ...


def pull_all(hosts: list[HostSpec], *, dry_run: bool, out: Any = None, err: Any = None,
             next_step: Callable[[str, str], str] | None = None,
             watch: Watch | None = None) -> list[str]:
    """``backup`` for a fleet (``invoke backup`` and ``pullback-backup``): pull every host,
    ``backup.parallel`` at a time; print warnings and one line per failed host (``err``)
    and the table (``out``); return the hosts that failed. Without ``watch``, rsync's own
    output is shown only for one host on a terminal: several interleaved streams are noise.

    ``watch``: told of each host's start, output (when ``watch.live``) and result, and
    closed before the warnings and the table are printed.

    ``next_step(host, task)``: the command line of ``task`` for ``host``, added to its
    failure line (``trust-host`` for a host key that is not pinned, else ``doctor``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    tty = watch is None and len(hosts) == 1 and out.isatty()

    def failed(h: HostSpec, exc: Exception) -> BackupResult:
        reason = str(exc) if isinstance(exc, BackupError) else f"{type(exc).__name__}: {exc}"
        result = BackupResult(h.name, ok=False, exit_code=None, seconds=0.0, error=reason)
        if watch is not None:
            watch.finished(result)
        return result

    started: dict[str, float] = {}

    def one(h: HostSpec) -> BackupResult:
        started[h.name] = time.time()
        if watch is None:
            return backup_with_hooks(h, dry_run=dry_run, tty=tty)
        watch.started(h.name)
        live: Progress | None = None
        if watch.live:
            def live(whole: bool, name: str = h.name) -> BinaryIO:
                return watch.output(name, whole)
        result = backup_with_hooks(h, dry_run=dry_run, tty=False, progress=live)
        watch.finished(result)
        return result

    try:
        results = fleet.for_each(hosts, one, failed,
                                 parallel=max(h.backup.parallel for h in hosts))
    finally:
        if watch is not None:
            watch.close()
    if not dry_run:
        for problem in report_metrics(hosts, results, started):
            print(f"backup: warning: {problem}", file=err)
    for r in results:
        if r.warning:
            print(f"{r.host}: warning: {r.warning}", file=err)
    err.flush()
    out.write(format_table(results))
    out.flush()
    for r in results:  # right below the table that says "failed"
        if not r.ok:
            print(failure_line(r, next_step), file=err)
    return [r.host for r in results if not r.ok]


# --- restore ----------------------------------------------------------------------------


