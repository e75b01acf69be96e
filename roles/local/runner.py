"""Running this machine's rsync: which binary (the pinned build, else PATH), in which
environment, in which sandbox (``roles.core.sandbox``, unless ``backup.sandbox: false``),
with its output copied to the run's log as it comes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from roles.core.pull import OutputScanner, supports_progress2
from roles.core.rsync import STAMP_RELPATH, client_refusal, parse_version_output
from roles.core.sandbox import build_sandbox
from roles.core.spec import HostSpec
from roles.local.keys import key_has_passphrase
from roles.local.store import BackupError, Lock

CHUNK = 65536

def find_local_rsync(host: HostSpec) -> tuple[str, str | None]:
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


def find_bwrap(host: HostSpec) -> str | None:
    """bubblewrap's path when ``backup.sandbox`` is on (BackupError when it is missing),
    None when the inventory turned the sandbox off."""
    if not host.backup.sandbox:
        return None
    found = shutil.which("bwrap")
    if found is None:
        raise BackupError("backup.sandbox is on but bwrap is not installed: install the "
                          "package bubblewrap (`./dev setup` does), or set "
                          "backup.sandbox: false to run rsync without the sandbox")
    return found


def sandboxed(host: HostSpec, argv: list[str], bwrap: str | None, *, writable: list[Path],
              readable: Sequence[Path] = (), hide_beside: Path | None = None,
              interactive: bool = False) -> list[str]:
    """``argv`` (this machine's rsync) inside the sandbox, or as it is when ``bwrap`` is
    None (``find_bwrap``: the sandbox is off).

    ``writable``: the only folders the run may change (those that exist: a dry run's DEST
    may not yet). ``hide_beside``: a DEST whose parent folder is emptied, so the other
    hosts' copies and state are out of sight. Read back over what is hidden: the key,
    known_hosts, the rsync binary, the agent's socket and ``/etc/resolv.conf``'s target.
    On a terminal, a key with a passphrase and no agent keeps the terminal (ssh asks).
    """
    if bwrap is None:
        return argv
    hidden = []
    if hide_beside is not None and hide_beside.parent != Path("/") \
            and hide_beside.parent.is_dir():
        hidden.append(str(hide_beside.parent))
    agent = os.environ.get("SSH_AUTH_SOCK")
    wanted = [host.backup_key, host.known_hosts, argv[0], agent or "",
              os.path.realpath("/etc/resolv.conf"), *map(str, readable)]
    keep_terminal = interactive and not agent and key_has_passphrase(Path(host.backup_key))
    return build_sandbox(argv, bwrap=bwrap, hidden=hidden,
                         readable=[p for p in wanted if p.startswith("/") and os.path.exists(p)],
                         writable=[str(p) for p in writable if p.is_dir()],
                         new_session=not keep_terminal)


def pull_sandboxed(host: HostSpec, argv: list[str], bwrap: str | None, *,
                   interactive: bool = False) -> list[str]:
    """A pull's ``argv`` in the sandbox a backup uses: only the host's DEST is writable
    and the folder around it (the other hosts' copies, every state folder) is hidden."""
    dest = Path(host.destination.rstrip("/"))
    return sandboxed(host, argv, bwrap, writable=[dest], hide_beside=dest,
                     interactive=interactive)


def rsync_env() -> dict[str, str]:
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
                            stderr=subprocess.STDOUT, env=rsync_env(),
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

def stamped_version(prefix: str) -> str | None:
    """The version build-rsync recorded for ``prefix`` (its stamp), or None."""
    try:
        data = json.loads(Path(prefix, STAMP_RELPATH).read_bytes())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def local_rsync_version(host: HostSpec, local_rsync: str) -> str | None:
    """The version of the local rsync the backup runs, None when it cannot be told.

    The pinned build's is its stamp (a file read: a scheduled run starts no extra process;
    the stamp, not rsync.version, so a version raised in the inventory but not yet built
    is not taken for built). Anything else (PATH's rsync, a build without a stamp) is
    asked with ``--version``.
    """
    if local_rsync == host.rsync.local_binary:
        stamped = stamped_version(host.rsync.local_prefix)
        if stamped is not None:
            return stamped
    try:
        result = subprocess.run([local_rsync, "--version"], capture_output=True, text=True,
                                check=False, timeout=30, stdin=subprocess.DEVNULL)
        return parse_version_output(result.stdout)[0]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def refuse_exposed_client(host: HostSpec, local_rsync: str, version: str | None) -> str | None:
    """The refusal (one line) for a local rsync older than 3.4.1, unless the inventory sets
    rsync.allow_vulnerable; None when the run may go on."""
    if host.rsync.allow_vulnerable:
        return None
    return client_refusal(version, f"the local rsync {local_rsync}")


def both_ends_have_progress2(host: HostSpec, local_version: str | None) -> bool:
    """Both rsyncs >= 3.1: the remote is the pinned build (rsync.version) that the forced
    command runs; the local one is ``local_version`` (``local_rsync_version``)."""
    return supports_progress2(local_version) and supports_progress2(host.rsync.version)
