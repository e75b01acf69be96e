"""The pull as rsync sees it, pure: the client's argv (ssh, source, options, progress) and
what its output says (``--stats``, error lines, exit codes)."""

from __future__ import annotations

import collections
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from roles.core import rsync_errors
from roles.core.hardened import Mode
from roles.core.rsync import remote_paths
from roles.core.rsync_errors import explain_exit
from roles.core.sandbox import XATTR_FILTERS
from roles.core.spec import HostSpec
from roles.core.ssh_failures import classify_ssh_failure

OK_CODES = (0, 24)
TAIL_BYTES = 65536

_PROGRESS_OPTIONS = ("--progress", "--info=progress2", "--info=progress1", "--info=progress0")

def ssh_command(host: HostSpec, *, interactive: bool = False) -> str:
    """The ``-e`` value: no ssh_config, strict host keys from the inventory only, only the
    backup key, nothing forwarded.

    The backup host connects as root to every server, so the session must not depend on
    (or be changed by) any ssh_config: ``-F /dev/null`` skips ``~/.ssh/config`` and
    ``/etc/ssh/ssh_config`` (a ``ProxyCommand``, ``LocalCommand``, ``RemoteForward``,
    ``ForwardAgent yes`` or ``ControlPath`` there would run, tunnel or lend the agent to a
    server that may be compromised). The ``-o`` options then state what matters even
    where ssh's defaults already agree: no agent, X11 or port forwarding, no local
    command, no connection sharing, host keys only from the inventory's ``known_hosts``
    (never the global file, never updated by what a server offers).
    Unattended runs never prompt (``BatchMode``: a passphrase key needs an agent, which is
    used for authentication only, never forwarded); an interactive run on a terminal may
    ask for the key's passphrase, once per host.
    """
    return shlex.join([
        "ssh", "-F", "/dev/null", "-i", host.backup_key, "-p", str(host.port),
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={host.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", f"BatchMode={'no' if interactive else 'yes'}",
        "-o", "IdentitiesOnly=yes",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "PermitLocalCommand=no",
        "-o", "ControlPath=none",
        # An unattended run must not hang forever on a dead network.
        "-o", "ConnectTimeout=30",
        "-o", "ServerAliveInterval=30",
        "-o", "ServerAliveCountMax=4",
    ])


def source_spec(host: HostSpec) -> str:
    """Daemon mode ``root@ADDR::MODULE/SOURCE/``; captured mode ``root@ADDR:/SOURCE/``.

    Daemon mode needs the double colon: a single colon would make rsync start its own
    ``rsync --server --sender`` over ssh, the daemon forced command would answer with its
    greeting, and the client would fail with "protocol version mismatch -- is your shell
    clean?" (the seed's bug). Captured mode needs the single colon: the gate runs exactly
    the ``rsync --server --sender ... . /SOURCE/`` that such a client sends. The trailing
    slash puts SOURCE's contents (not a folder named after it) into the destination.
    """
    return source_specs(host)[0]


def relative_paths(host: HostSpec) -> bool:
    """A pull with ``backup.extra_sources`` runs with ``-R`` (source_specs)."""
    return bool(getattr(host.backup, "extra_sources", ()))


def source_specs(host: HostSpec) -> list[str]:
    """Every source of the pull: ``source_spec``'s one, or with ``backup.extra_sources``
    each path as ``.../SOURCE/./REL/``, for one rsync with ``-R``.

    ``-R`` with ``/./`` names each path from the marker on (``home/...``), so an extra
    source lands in DEST at its place below SOURCE, and ``-x`` holds per source: each stays
    on its own file system. One rsync, not one per source: one file list, one ``--stats``,
    one ``--max-delete``, one ``--link-dest``, one command for captured mode's gate. The
    pull of SOURCE sends a skipped mount point as a folder without contents, which
    ``--delete`` never empties, so the extra source's files are deleted only by its own
    file list (what the server removed), never because the pull of SOURCE skipped them.
    """
    address = f"[{host.address}]" if ":" in host.address else host.address
    if host.forced_command == Mode.CAPTURED:
        prefix = f"root@{address}:"
    else:
        prefix = f"root@{address}::{host.backup.module}"
    extras = tuple(getattr(host.backup, "extra_sources", ()))
    return [prefix + path for path in remote_paths(host.backup.source, extras)]


def drop_progress(options: Iterable[str]) -> list[str]:
    out: list[str] = []
    for option in options:
        if option in _PROGRESS_OPTIONS:
            continue
        if option == "-P":  # --partial --progress: keep the partial half
            out.append("--partial")
            continue
        out.append(option)
    return out


def whole_transfer_progress(options: Iterable[str]) -> list[str]:
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


def build_argv(host: HostSpec, *, dry_run: bool, tty: bool, local_rsync: str, dest: str,
               link_dest: str | None = None, progress2: bool = False,
               sandboxed: bool = False, progress: bool | None = None) -> list[str]:
    """The pull of ``host`` into ``dest``, as an argv list (no shell).

    capture-command builds its capture runs with this same function, so what it records is
    what a backup sends (progress options never reach the server's command line).
    ``sandboxed`` (the receiver runs in ``roles.core.sandbox``): with ``-X``, the xattrs it
    cannot set are filtered out (rules travel in the protocol, never on the server's
    command line, so a captured command still matches). On a terminal the user's progress
    option is kept; with ``progress2`` (both ends are rsync >= 3.1) ``--progress`` becomes
    the whole-transfer ``--info=progress2``. ``progress`` (default: ``tty``) keeps the
    progress option without a terminal for ssh (a fleet's live view reads the output).
    """
    if not (tty if progress is None else progress):
        options = drop_progress(host.backup.options)
    elif progress2:
        options = whole_transfer_progress(host.backup.options)
    else:
        options = list(host.backup.options)
    argv = [local_rsync, "-e", ssh_command(host, interactive=tty), *options, "--stats"]
    if relative_paths(host):
        argv.append("--relative")
    argv += [f"--exclude={pattern}" for pattern in host.backup.pull_exclude]
    if sandboxed and has_flag(host.backup.options, "X", "--xattrs"):
        argv += XATTR_FILTERS
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
    argv += [*source_specs(host), dest.rstrip("/") + "/"]
    return argv


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


def rsync_number(text: str) -> int:
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
            stats[name] = rsync_number(matches[-1])
    kinds = re.findall(r"^Number of files: [\d,.]+[KMGTP]? \(([^)]*)\)", text, re.MULTILINE)
    if kinds:
        stats["files_by_type"] = _types(kinds[-1])
    speedups = re.findall(r"speedup is ([\d,.]+)", text)
    if speedups:
        stats["speedup"] = float(speedups[-1].replace(",", ""))
    marker = no_transfer_marker(text)
    if marker == DRY_RUN_MARK:
        stats["dry_run"] = True
    elif marker == BATCH_ONLY_MARK:
        stats["batch_only"] = True
    return stats


# rsync ends its summary line ``total size is N  speedup is X`` with `` (DRY RUN)`` after a
# run that copied nothing (-n, --dry-run, however it got in) and `` (BATCH ONLY)`` after
# --only-write-batch (2.6.9 to 3.5.x, main.c). Only the LAST such line counts: rsync prints
# it last, and a file listed earlier (-v) may carry any name, this text included.
DRY_RUN_MARK = "(DRY RUN)"
BATCH_ONLY_MARK = "(BATCH ONLY)"
_SUMMARY_LINE = re.compile(r"^total size is .*  speedup is [\d,.]+(?: (\([A-Z ]+\)))?[ \t]*$",
                           re.MULTILINE)


def no_transfer_marker(text: str) -> str | None:
    """``(DRY RUN)`` or ``(BATCH ONLY)`` when rsync's own summary line in ``text`` says it
    copied nothing, else None (also when there is no summary line)."""
    lines = _SUMMARY_LINE.findall(text)
    if lines and lines[-1] in (DRY_RUN_MARK, BATCH_ONLY_MARK):
        return lines[-1]
    return None


def not_a_backup(stats: dict[str, Any]) -> str | None:
    """Why parsed ``stats`` of a run asked to be real are no backup, or None."""
    if stats.get("dry_run"):
        marker = DRY_RUN_MARK
    elif stats.get("batch_only"):
        marker = BATCH_ONLY_MARK
    else:
        return None
    return (f"rsync's output ends with {marker}: it copied nothing, so this run is no "
            "backup (a dry-run or batch option got into the pull: check backup.options); "
            "nothing was promoted")


def _types(text: str) -> dict[str, int]:
    # "reg: 1,000, dir: 234, link: 3": split on ", " only where a "word:" follows.
    return {kind: rsync_number(count)
            for kind, count in re.findall(r"(\w+): ([\d,.]+[KMGTP]?)(?:,|$)", text)}


# Lines worth quoting when rsync fails: rsync's own messages, the daemon's, ssh's, the
# captured-mode gate's.
_ERROR_LINE = re.compile(
    rb"(?:^|\r)((?:rsync(?: error| warning)?: |@ERROR|ERROR: |ssh: |Host key verification "
    rb"failed|Permission denied|Deletions stopped|protocol version mismatch|No \S+ host key "
    rb"is known|Connection closed|Connection reset|Connection timed out|banner exchange|"
    rb"kex_exchange_identification|ssh_exchange_identification|IO error "
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
    # ssh's failure first: rsync's words after it ("did not see server greeting") blame
    # the daemon for a connection that never reached sshd.
    ssh = [e for e in errors if not e.startswith(("rsync", "@ERROR"))]
    failure = classify_ssh_failure("\n".join(ssh))
    if failure is not None:
        line = next((e for e in ssh if classify_ssh_failure(e)), ssh[0])
        return f"ssh failed (rsync exit {code}): {line} -- {failure.meaning}"
    line = last_error(errors)
    known = rsync_errors.explanation("\n".join(errors))
    return (f"rsync exit {code}{': ' + line if line else ''} -- "
            f"{known or explain_exit(code)}")


_DELETIONS_STOPPED = re.compile(
    r"Deletions stopped due to --max-delete limit \((\d[\d,]*) skipped\)")
# The dry run's exit codes after which its deletion count holds: complete (0), files
# vanished (24), some files not transferred (23: the generator still ran to its end, and
# rsync deletes nothing on an I/O error anyway). 25 is the limit itself.
CHECK_COMPLETE = (0, 23, 24)


def max_delete_problem(max_delete: int | None, local_version: str | None) -> str | None:
    """Why ``--max-delete=max_delete`` would not limit this local rsync, or None.

    rsync before 3.0.0 reads ``--max-delete=0`` as "no limit" (2.6.9: ``if (max_delete &&
    ...)``); from 3.0.0 it means "delete nothing". A version that cannot be told is taken
    as new enough: every build pullback makes is stamped.
    """
    if max_delete != 0 or local_version is None:
        return None
    match = re.match(r"(\d+)\.", local_version)
    if match is None or int(match[1]) >= 3:
        return None
    return (f"backup.max_delete 0 means 'no limit' to the local rsync {local_version} "
            "(before 3.0.0 only a positive --max-delete limits): set it to 1 or more")


def deletion_check(code: int, errors: Iterable[str], stats: dict[str, Any],
                   max_delete: int) -> tuple[bool, int | None]:
    """Read the dry run that precedes a mirror pull with ``--max-delete=N``:
    ``(over_limit, would_delete)``.

    ``--max-delete`` alone does not refuse a run: every rsync (2.6.9 and 3.x alike)
    deletes the first N extraneous files, skips the rest, prints "Deletions stopped due to
    --max-delete limit (K skipped)" and exits 25. A dry run (``-n``) counts deletions the
    same way (its unlink is a no-op) and deletes nothing, so the limit is read from it:
    the message (or exit 25) means more than N; ``would_delete`` is then N + K (at least:
    the skipped entries of a folder are counted as rsync met them), else the dry run's
    ``Number of deleted files`` (rsync >= 3.1 on both ends), else None.
    """
    skipped = None
    for line in errors:
        match = _DELETIONS_STOPPED.search(line)
        if match:
            skipped = int(match[1].replace(",", ""))
    if skipped is not None:
        return True, max_delete + skipped
    if code == 25:
        return True, None
    deleted = stats.get("files_deleted")
    return False, deleted if isinstance(deleted, int) else None


def has_delete(options: Iterable[str]) -> bool:
    return any(option == "--delete" or option.startswith("--delete-") or option == "--del"
               for option in options)


def has_flag(options: Iterable[str], short: str, long: str) -> bool:
    for option in options:
        if option == long:
            return True
        if re.match(r"^-[A-Za-z]+$", option) and short in option[1:]:
            return True
    return False


def build_restore_argv(local_rsync: str, options: Iterable[str], source: Path, *,
                       is_dir: bool, to: str) -> list[str]:
    """``rsync -a --numeric-ids -H [-A] [-X] [-S] SRC[/] TO/``: a folder's contents land in TO.

    The copy carries back what the pull kept: ACLs, xattrs and holes when the backup's
    options had them (not otherwise: the backup holds none, and a 2.6.9 rsync lacks -A/-X).
    """
    options = list(options)
    argv = [local_rsync, "-a", "--numeric-ids", "-H"]
    if has_flag(options, "A", "--acls"):
        argv.append("-A")
    if has_flag(options, "X", "--xattrs"):
        argv.append("-X")
    if has_flag(options, "S", "--sparse"):
        argv.append("-S")
    argv += [str(source) + ("/" if is_dir else ""), to.rstrip("/") + "/"]
    return argv
