"""setup-remote: plan (pure) and apply (one root script, then a lockout check).

The gather and the apply share ONE SSH session (without a sudo password): the root
command that reports the facts then reads the script planned from them on its standard
input (``gather_then``; a no-change run sends nothing). Order on the host, in that script:
  for each file that differs: check it is unchanged since it was read -> write a candidate
  next to it (same owner and mode) -> validate the candidate (``sshd -t -f``; the key line
  with ``ssh-keygen -l``) -> keep a ``.pullback-bak`` copy -> atomic ``mv -T`` into place;
  then, when sshd_config changed: ``sshd -t`` on the whole configuration and ``sshd -T -C``
  for the backup host's connection must show the wanted PermitRootLogin (a drop-in or a
  Match block can override the edit) -> reload (``systemctl reload`` or SIGHUP to the pid in
  sshd's pidfile). Any failure restores every file already replaced and exits non-zero
  before sshd is signalled.
Then, from the client: a NEW admin connection (the first one stays open) must log in and
use sudo; if it cannot, the backups are restored over the first connection and sshd is
reloaded again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from roles.config import gate as gate_scripts
from roles.core import hardened
from roles.core.hardened import HelperFile, Mode
from roles.core.outcome import Outcome
from roles.core.rsync import CaptureError
from roles.core.spec import HostSpec
from roles.hostfiles.plan import daemon_command, plan_setup
from roles.hostfiles.transaction import (
    SetupError,
    SetupPlan,
    apply,
    check_new_login,
    gather_files,
    merge_facts,
)
from roles.local import capture_record
from roles.local.keys import KeyFileError, read_public_key
from roles.remote.facts import gather, gather_then
from roles.remote.session import ConnectError, Run, Session

# --- planning (pure) --------------------------------------------------------------------


# --- the root scripts (pure text) ------------------------------------------------------


# --- applying (touches the host) ------------------------------------------------------------


def setup_host(host: HostSpec, *, dry_run: bool = False,
               captured_command: str | None = None,
               check_login: Callable[[Session, SetupPlan], None] = check_new_login,
               sessions: Run | None = None) -> Outcome:
    """Gather, plan and (unless ``dry_run``) apply setup-remote on one host.

    Captured mode: with a local capture record (``invoke capture-command``) the forced
    command is the gate, installed or repaired from the record; without one no key line is
    installed. ``captured_command`` overrides that with a forced command of the caller's.
    """
    record = None
    try:
        public_key = read_public_key(host)
        if host.forced_command == Mode.CAPTURED and captured_command is None:
            record = capture_record.load_record(host)
        conn = (sessions or Run()).open(host)
    except (SetupError, KeyFileError, ConnectError, CaptureError) as exc:
        return Outcome(host.name, {}, error=str(exc))
    exchange = None
    try:
        binaries = [host.rsync.remote_binary]
        if record is not None and record.remote_rsync not in binaries:
            binaries.append(record.remote_rsync)
        # One SSH session for the gather, the plan and the apply: the root command that
        # reports the facts waits for the script planned from them. Not with a sudo
        # password (it shares that input), a dry run, or a capture record (the gate needs a
        # second read first).
        started = None if dry_run or record is not None else gather_then(conn, binaries)
        if started is not None:
            facts, exchange = started
        else:
            facts = gather(conn, binaries)
        warnings: list[str] = []
        helpers: tuple[HelperFile, ...] = ()
        if host.forced_command == Mode.DAEMON:
            forced, warnings = daemon_command(facts, host)
        elif record is not None:
            forced, helpers = hardened.GATE, (gate_scripts.gate_file(record),)
            warnings = gate_scripts.check_remote(record, facts)
            facts = merge_facts(facts, gather_files(conn, [hardened.GATE],
                                                    [hardened.LIBEXEC]))
        else:
            forced = captured_command
        plan = plan_setup(facts, host, public_key, forced, helpers)
        plan = dataclasses.replace(plan, warnings=(*warnings, *plan.warnings))
        if dry_run:
            actions = ("would reload sshd",) if plan.reload_sshd else ()
            steps = {k: v.preview() for k, v in plan.steps.items()}
            return Outcome(host.name, steps, warnings=plan.warnings,
                           diffs=tuple(c.diff() for c in plan.changes), actions=actions)
        return apply(conn, plan, check_login, via=exchange)
    except (SetupError, ValueError, RuntimeError) as exc:
        return Outcome(host.name, {}, error=str(exc))
    finally:
        if exchange is not None:
            exchange.close()
        conn.close()
