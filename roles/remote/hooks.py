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
from typing import TYPE_CHECKING

from roles.remote.connection import ConnectError, SudoError, connect, run

if TYPE_CHECKING:
    from roles.inventory.schema import Host

TIMEOUT = 10  # seconds to connect


def run_hook(host: Host, which: str, argv: tuple[str, ...] | list[str]) -> str | None:
    """Run ``backup.<which>`` on ``host``; None when it exited 0, else one line saying why."""
    command = shlex.join(argv)
    label = f"backup.{which} `{command}`"
    if host.sudo_password and not sys.stdin.isatty():
        return (f"{label} did not run: sudo_password is true and there is no terminal to "
                "ask on; allow NOPASSWD sudo for the admin user to run hooks unattended")
    try:
        c = connect(host, timeout=TIMEOUT)
    except ConnectError as exc:
        return f"{label} did not run: {exc}"
    except Exception as exc:  # noqa: BLE001 - paramiko's many errors: one line, no traceback
        return f"{label} did not run: {type(exc).__name__}: {exc}"
    try:
        result = run(c, command, sudo=True, host=host.name)
    except SudoError as exc:
        return f"{label} did not run: {exc}"
    except Exception as exc:  # noqa: BLE001
        return f"{label} failed: {type(exc).__name__}: {exc}"
    finally:
        c.close()
    if result.exited != 0:
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        tail = f": {lines[-1][:300]}" if lines else ""
        return f"{label} exited {result.exited}{tail}"
    return None
