"""capture-command: force exactly the command the client's rsync sends (captured mode).

The original notes' hardest lesson: a forced command must be exactly what the client
sends, and nobody can guess it (``--sender`` was undocumented, the path is ``. /`` not
``.``, and ``-n`` joins the flag cluster). So it is captured, never guessed:

1. Over the admin connection (sudo), the backup key's line in root's ``authorized_keys``
   gets ``command=CAPTURE_SCRIPT``: a root-only script (``templates/scripts/capture.sh.j2``) that
   writes ``$SSH_ORIGINAL_COMMAND`` to a root-only file and exits 1. Both go through
   setup-remote's planning and atomic apply (``roles.features.setup_remote``), not a
   writer of their own.
   sshd must already allow root by forced command only (``invoke setup-remote``).
2. The LOCAL rsync runs exactly as ``backup`` runs it
   (``roles.features.backup.build_argv``: the same
   options and excludes, ``root@ADDR:SOURCE/``, never ``-n``) into an empty temporary
   folder, fails as expected, and the captured command is read (and removed) over the
   admin connection. Then once more with ``-n``: that capture is only READ, to check that
   the dry-run variant computed from the real command (``dry_run_variant``) is what a real
   ``-n`` client sends. It is never installed on its own.
3. Both are validated (``rsync --server --sender``, no ``n`` in the real flag cluster, ends
   with ``. SOURCE/``, only characters that need no quoting), argv[0] becomes the remote
   rsync's full path (``rsync.prefix``'s build, else the host's ``command -v rsync``, with a
   warning), and the key line gets ``command=GATE``: a root-only allow-list
   (``templates/scripts/gate.sh.j2``) that compares ``$SSH_ORIGINAL_COMMAND`` byte for byte with the
   two recorded commands and ``exec``s the matching one by full path; anything else is
   refused on stderr with exit 1. A single forced command could serve either real runs or
   dry runs, never both: a forced command holding a dry-run flag is how the notes got
   their "Invalid file index" failures, and a real run against one deleted destination
   files before failing.
4. The record is written locally, ``DEST.pullback/capture.json`` (next to ``backup``'s
   lock and logs): both commands, both rsyncs, and a fingerprint (SHA-256 over options,
   excludes, source, the local and the remote ``rsync --version`` line).
5. Proof: a dry-run pull with the backup key through the gate must succeed.

``backup`` recomputes the fingerprint before each captured-mode run and refuses on drift.
It has no admin access, so the remote version line it uses is the recorded one: a new
remote rsync is noticed by ``capture-command`` and ``setup-remote`` (a warning), not by
``backup``.

``--stats``, ``--progress``/``--info``, ``--delete``, ``--max-delete``, ``--link-dest`` and
the excludes are not part of the command a pull sends (they act on the receiving side or
travel inside the protocol); the capture still runs with all of them, exactly as backup.
"""

from __future__ import annotations

import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from roles.config.gate import capture_file, gate_file
from roles.core import hardened, pull
from roles.core.hardened import CAPTURE_SCRIPT, CAPTURED_FILE, GATE, LIBEXEC, REMOTE_STATE, Mode
from roles.core.hardened import PERMIT_ROOT_LOGIN as WANT
from roles.core.outcome import Outcome, State
from roles.core.rsync import (
    CaptureError,
    dry_run_variant,
    fingerprint,
    validate_sent,
)
from roles.core.spec import HostSpec
from roles.hostfiles.plan import plan_setup
from roles.hostfiles.transaction import (
    FileChange,
    SetupError,
    SetupPlan,
    apply,
    facts_after,
    gather_files,
    merge_facts,
)
from roles.local import runner, store
from roles.local.capture_record import CaptureRecord, local_version_line, save_record
from roles.local.keys import KeyFileError, read_public_key
from roles.remote.facts import AUTHORIZED_KEYS, gather
from roles.remote.session import ConnectError, Run, Session

if TYPE_CHECKING:
    from roles.core.outcome import Outcome
    from roles.remote.facts import HostFacts


# --- the local record -----------------------------------------------------------------------


# --- the scripts (pure text) ---------------------------------------------------------------


# --- facts about the remote rsync (pure) -----------------------------------------------------


def remote_rsync(facts: HostFacts, host: HostSpec) -> tuple[str, str, list[str]]:
    """``(path, version line, warnings)``: the pinned build, else the one on PATH."""
    wanted = host.rsync.remote_binary
    path, _ = hardened.forced_rsync(wanted, facts.rsync)
    if path is None:
        raise CaptureError(f"no rsync on {host.name}: neither {wanted} nor one on PATH; run "
                           "`invoke build-rsync`")
    if path == wanted:
        return wanted, facts.rsync[wanted], []
    return path, facts.rsync[path], [
        f"{wanted} is not installed: the gate runs {path} (from the host's `command -v "
        "rsync`); run `invoke build-rsync`, then capture-command again, so both ends run the "
        "same build"]


def check_ready(facts: HostFacts) -> None:
    """sshd must let root in by forced command only: setup-remote's result."""
    value = facts.effective.get("permitrootlogin", "")
    if value != WANT:
        raise CaptureError(f"sshd applies PermitRootLogin {value or '(unknown)'} to root "
                           f"from {facts.client_addr}, not {WANT}: run setup-remote first")


# --- on the hosts ------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def capture_once(conn: Session, host: HostSpec, rsync: str, bwrap: str | None, *,
                 dry_run: bool) -> str:
    """Run the pull as ``backup`` would (it must fail), then read and remove the capture."""
    with tempfile.TemporaryDirectory(prefix="pullback-capture-") as tmp:
        argv = runner.sandboxed(host, pull.build_argv(host, dry_run=dry_run, tty=False,
                                                      local_rsync=rsync, dest=tmp),
                                bwrap, writable=[Path(tmp)])
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, errors="replace", env=runner.rsync_env(),
                                    check=False, timeout=120)
        except subprocess.TimeoutExpired:
            raise CaptureError("the capture pull did not end within 120 s") from None
    read = gather_files(conn, [CAPTURED_FILE], clear=[CAPTURED_FILE])
    fact = read.files.get(CAPTURED_FILE)
    if fact is None:
        raise CaptureError(f"nothing was captured{' (with -n)' if dry_run else ''}: rsync exit "
                           f"{result.returncode}: {_last_line(result.stderr)}")
    if result.returncode == 0:
        raise CaptureError("the capture pull succeeded although the capture script refuses "
                           "every pull; is another key line in charge?")
    try:
        return fact.content.decode("ascii")
    except UnicodeDecodeError:
        raise CaptureError("the captured command is not ASCII") from None


def prove(host: HostSpec, rsync: str, bwrap: str | None) -> None:
    """A dry-run pull with the backup key through the gate, into an empty folder."""
    with tempfile.TemporaryDirectory(prefix="pullback-proof-") as tmp:
        argv = runner.sandboxed(host, pull.build_argv(host, dry_run=True, tty=False,
                                                      local_rsync=rsync, dest=tmp),
                                bwrap, writable=[Path(tmp)])
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                env=runner.rsync_env(), check=False)
    if result.returncode not in pull.OK_CODES:
        raise CaptureError("the gate is installed and recorded, but a dry-run pull through "
                           f"it failed: {pull.describe_failure(result.returncode, [])}: "
                           f"{_last_line(result.stderr)}")


def _restore_keys(conn: Session, host: HostSpec, facts: HostFacts, old: bytes | None) -> str:
    """Put the key file back as it was before the capture line (the previous gate keeps
    serving backups when a re-capture fails); returns what happened, for the error."""
    current = facts.content(AUTHORIZED_KEYS)
    if old is None or current is None or old == current:
        return "the key line still runs the capture script, which serves nothing"
    plan = SetupPlan(host=host.name, changes=(FileChange("authorized_keys", AUTHORIZED_KEYS,
                                                         current, old, 0o600, 0, 0),),
                     fix_root_ssh=False, reload_sshd=False, client_addr=facts.client_addr,
                     sshd=facts.sshd, service=facts.service, pidfile="", forced_command=None)
    outcome = apply(conn, plan)
    if outcome.error:
        return f"restoring the previous key line failed too: {outcome.error}"
    return "the previous key line is back"


def capture_host(host: HostSpec, sessions: Run | None = None) -> Outcome:
    """capture-command on one host: capture, validate, install the gate, record, prove."""
    if host.forced_command != Mode.CAPTURED:
        return Outcome(host.name, {"capture": State.SKIPPED},
                       warnings=("forced_command is daemon: there is nothing to capture",))
    steps: dict[str, State] = {}
    warnings: list[str] = []
    try:
        public_key = read_public_key(host)
        rsync, warning = runner.find_local_rsync(host)
        warnings += [warning] if warning else []
        refusal = runner.refuse_exposed_client(host, rsync,
                                               runner.local_rsync_version(host, rsync))
        if refusal:  # the capture runs are pulls from the server like any backup
            raise CaptureError(refusal)
        bwrap = runner.find_bwrap(host)  # ...and run in the same sandbox (store.BackupError)
        local_version = local_version_line(rsync)
        state = store.prepare_state(host)
        conn = (sessions or Run()).open(host)
    except (SetupError, KeyFileError, store.BackupError, CaptureError, ConnectError,
            OSError) as exc:
        return Outcome(host.name, steps, error=str(exc), warnings=tuple(warnings))
    try:
        # A scheduled backup of this host must not run into the capture script.
        with store.Lock(state / "lock", host.name, "capture-command"):
            facts = gather(conn, [host.rsync.remote_binary])
            check_ready(facts)
            remote, remote_version, more = remote_rsync(facts, host)
            warnings += more
            facts = merge_facts(facts, gather_files(
                conn, [CAPTURE_SCRIPT, GATE], [LIBEXEC, REMOTE_STATE],
                clear=[CAPTURED_FILE]))
            old_keys, old_gate = facts.content(AUTHORIZED_KEYS), facts.content(GATE)

            plan = plan_setup(facts, host, public_key, CAPTURE_SCRIPT, (capture_file(),),
                              (REMOTE_STATE,))
            if plan.reload_sshd:
                raise CaptureError("sshd_config does not yet say PermitRootLogin "
                                   "forced-commands-only where sshd reads it: run setup-remote "
                                   "first")
            warnings += plan.warnings
            outcome = apply(conn, plan)
            if outcome.error:
                raise CaptureError(f"installing the capture script failed: {outcome.error}")
            steps["capture-script"] = plan.steps["capture-script"]
            facts = facts_after(facts, plan)
            try:
                extras = host.backup.extra_sources
                words = validate_sent(capture_once(conn, host, rsync, bwrap, dry_run=False),
                                      host.backup.source, extra_sources=extras)
                steps["capture"] = State.OK
                dry = dry_run_variant(words)
                sent_dry = capture_once(conn, host, rsync, bwrap, dry_run=True)
                validate_sent(sent_dry, host.backup.source, dry_run=True,
                              extra_sources=extras)
                if sent_dry != " ".join(dry):
                    raise CaptureError(f"with -n the client sends {sent_dry!r}, not the "
                                       f"computed {' '.join(dry)!r}")
                steps["capture-dry-run"] = State.OK
                options, exclude = host.backup.options, host.backup.exclude
                record = CaptureRecord(
                    host=host.name,
                    captured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    source=host.backup.source, options=options, exclude=exclude,
                    sent=" ".join(words), sent_dry_run=sent_dry, remote_rsync=remote,
                    remote_version=remote_version, local_rsync=rsync,
                    local_version=local_version,
                    fingerprint=fingerprint(options, exclude, host.backup.source,
                                            local_version, remote_version, extras),
                    extra_sources=extras)
                record.check()
                gate_plan = plan_setup(facts, host, public_key, GATE, (gate_file(record),))
                outcome = apply(conn, gate_plan)
                if outcome.error:
                    raise CaptureError(f"installing the gate failed: {outcome.error}")
            except (CaptureError, RuntimeError, ValueError, OSError) as exc:
                raise CaptureError(f"{exc}; {_restore_keys(conn, host, facts, old_keys)}") \
                    from None
            facts = facts_after(facts, gate_plan)
            steps["gate"] = State.OK if facts.content(GATE) == old_gate else State.CHANGED
            steps["authorized_keys"] = State.OK if facts.content(AUTHORIZED_KEYS) == old_keys \
                else State.CHANGED
            path = save_record(host, record)
            steps["record"] = State.WRITTEN
        prove(host, rsync, bwrap)
        steps["proof-dry-run"] = State.OK
        actions = (f"forced command: {GATE}", f"runs: {record.command}",
                   f"   or: {record.dry_run_command}", f"record: {path}")
        return Outcome(host.name, steps, warnings=tuple(warnings), actions=actions)
    except (CaptureError, SetupError, store.BackupError, RuntimeError, ValueError,
            OSError) as exc:
        return Outcome(host.name, steps, error=str(exc), warnings=tuple(warnings))
    finally:
        conn.close()
