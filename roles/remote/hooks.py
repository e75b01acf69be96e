"""``backup.pre`` and ``backup.post``: a command on the server, as root, over the ADMIN
connection (the backup key only ever runs the forced rsync).

The command is an argv list from the inventory, quoted with ``shlex.join`` and run through
``sudo -n`` (or sudo with the password ``sudo_password: true`` asked for on a terminal).
A run without a terminal cannot ask for a password, so a host with hooks and
``sudo_password: true`` fails its hook at once instead of waiting for one.
"""

from __future__ import annotations

import shlex
import sys

from roles.core.spec import HostSpec
from roles.remote.session import ConnectError, Run, SudoError

TIMEOUT = 10  # seconds to connect


class Hooks:
    """One host's hooks in one backup run: a new admin login for each (a pull may take
    hours, longer than an idle connection lives), one sudo password asked at most once."""

    def __init__(self, host: HostSpec) -> None:
        self.host = host
        self.shared = Run()

    def run(self, which: str) -> str | None:
        """Run ``backup.<which>``; None when there is none or it exited 0, else one line."""
        argv = getattr(self.host.backup, which, ())
        return run_hook(self.host, which, argv, self.shared) if argv else None


def run_hook(host: HostSpec, which: str, argv: tuple[str, ...] | list[str],
             shared: Run | None = None) -> str | None:
    """Run ``backup.<which>`` on ``host``; None when it exited 0, else one line saying why."""
    command = shlex.join(argv)
    label = f"backup.{which} `{command}`"
    if host.sudo_password and not sys.stdin.isatty():
        return (f"{label} did not run: sudo_password is true and there is no terminal to "
                "ask on; allow NOPASSWD sudo for the admin user to run hooks unattended")
    try:
        session = (shared or Run()).open(host, timeout=TIMEOUT)
    except ConnectError as exc:
        return f"{label} did not run: {exc}"
    except Exception as exc:  # noqa: BLE001 - paramiko's many errors: one line, no traceback
        return f"{label} did not run: {type(exc).__name__}: {exc}"
    try:
        with session:
            result = session.run(command, sudo=True)
    except SudoError as exc:
        return f"{label} did not run: {exc}"
    except Exception as exc:  # noqa: BLE001
        return f"{label} failed: {type(exc).__name__}: {exc}"
    if result.exited != 0:
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        tail = f": {lines[-1][:300]}" if lines else ""
        return f"{label} exited {result.exited}{tail}"
    return None
