"""Running this machine's rsync: which binary (the pinned build, else PATH), in which
environment, with its output copied to the run's log as it comes."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING, BinaryIO

from roles.core.pull import OutputScanner, supports_progress2
from roles.core.rsync import parse_version_output
from roles.local.store import BackupError, Lock

if TYPE_CHECKING:
    from roles.inventory.schema import Host  # pydantic: not imported at run time

CHUNK = 65536

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

def both_ends_have_progress2(host: Host, local_rsync: str) -> bool:
    """Both rsyncs >= 3.1: the remote is the pinned build (rsync.version) that the forced
    command runs; the local one is the pinned build too, else whatever PATH gave."""
    if local_rsync == host.rsync.local_binary:
        local_version: str | None = host.rsync.version
    else:
        result = subprocess.run([local_rsync, "--version"], capture_output=True, text=True,
                                check=False)
        try:
            local_version = parse_version_output(result.stdout)[0]
        except ValueError:
            local_version = None
    return supports_progress2(local_version) and supports_progress2(host.rsync.version)
