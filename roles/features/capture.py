"""capture-command: force exactly the command the client's rsync sends (captured mode).

The original notes' hardest lesson: a forced command must be exactly what the client
sends, and nobody can guess it (``--sender`` was undocumented, the path is ``. /`` not
``.``, and ``-n`` joins the flag cluster). So it is captured, never guessed:

1. Over the admin connection (sudo), the backup key's line in root's ``authorized_keys``
   gets ``command=CAPTURE_SCRIPT``: a root-only script (``templates/capture.sh.j2``) that
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
   (``templates/gate.sh.j2``) that compares ``$SSH_ORIGINAL_COMMAND`` byte for byte with the
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

import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roles.core import pull
from roles.core.rsync import (
    SAFE_WORD,
    CaptureError,
    dry_run_variant,
    fingerprint,
    validate_sent,
    with_binary,
)
from roles.local import runner, store

if TYPE_CHECKING:
    from roles.features.setup_remote import HelperFile, Outcome
    from roles.inventory.schema import Host  # pydantic: not imported at run time
    from roles.remote.facts import HostFacts

LIBEXEC = "/usr/local/libexec/pullback"
CAPTURE_SCRIPT = f"{LIBEXEC}/capture"
GATE = f"{LIBEXEC}/gate"
REMOTE_STATE = "/var/lib/pullback"
CAPTURED_FILE = f"{REMOTE_STATE}/captured-command"
RECORD_NAME = "capture.json"
RECORD_FORMAT = 1
AGAIN = "run `invoke capture-command` again"

# --- the local record -----------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureRecord:
    host: str
    captured_at: str
    source: str
    options: tuple[str, ...]
    exclude: tuple[str, ...]
    sent: str              # what the client sends (argv[0] "rsync"), compared by the gate
    sent_dry_run: str      # the same with -n (computed, checked against a real capture)
    remote_rsync: str      # the full path the gate execs
    remote_version: str    # its `--version` line 1, when captured
    local_rsync: str
    local_version: str
    fingerprint: str

    @property
    def command(self) -> str:
        return " ".join(with_binary(tuple(self.sent.split(" ")), self.remote_rsync))

    @property
    def dry_run_command(self) -> str:
        return " ".join(with_binary(tuple(self.sent_dry_run.split(" ")), self.remote_rsync))

    def to_json(self) -> str:
        data = {"format": RECORD_FORMAT, **asdict(self), "command": self.command,
                "dry_run_command": self.dry_run_command}
        data["options"], data["exclude"] = list(self.options), list(self.exclude)
        return json.dumps(data, indent=2) + "\n"

    def check(self) -> None:
        """Re-validate everything the gate is rendered from (the file could be edited)."""
        words = validate_sent(self.sent, self.source)
        validate_sent(self.sent_dry_run, self.source, dry_run=True)
        if " ".join(dry_run_variant(words)) != self.sent_dry_run:
            raise CaptureError("the dry-run command is not the real one plus 'n'")
        with_binary(words, self.remote_rsync)
        if fingerprint(self.options, self.exclude, self.source, self.local_version,
                       self.remote_version) != self.fingerprint:
            raise CaptureError("the fingerprint does not match the recorded fields")


def parse_record(text: str) -> CaptureRecord:
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("format", None) != RECORD_FORMAT:
            raise CaptureError(f"not a format-{RECORD_FORMAT} capture record")
        data.pop("command", None)
        data.pop("dry_run_command", None)
        data["options"] = tuple(data["options"])
        data["exclude"] = tuple(data["exclude"])
        record = CaptureRecord(**data)
        if not all(isinstance(v, str) for v in asdict(record).values()
                   if not isinstance(v, tuple)):
            raise CaptureError("a field is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise CaptureError(f"unreadable: {exc}") from None
    record.check()
    return record


def record_path(host: Host) -> Path:
    return store.state_dir(host) / RECORD_NAME


def load_record(host: Host) -> CaptureRecord | None:
    """The host's capture record, None when there is none; CaptureError when damaged."""
    path = record_path(host)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptureError(f"cannot read the capture record {path}: {exc}; {AGAIN}") from None
    try:
        record = parse_record(text)
    except CaptureError as exc:
        raise CaptureError(f"the capture record {path} is damaged ({exc}); {AGAIN}") from None
    if record.host != host.name:
        raise CaptureError(f"the capture record {path} is for host {record.host!r}; {AGAIN}")
    return record


def save_record(host: Host, record: CaptureRecord) -> Path:
    """Write the record atomically, 0600 in the 0700 state folder."""
    path = record_path(host)
    store.mkdir_private(path.parent)
    tmp = path.with_name(f".{RECORD_NAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(record.to_json())
    os.replace(tmp, path)
    return path


def check_drift(host: Host, record: CaptureRecord, local_version: str) -> str | None:
    """Why the recorded command no longer fits this host's settings, or None.

    The remote version line is the recorded one: ``backup`` has no admin access to read it.
    """
    settings = host.backup
    changed = [name for name, now, then in (
        ("backup.options", list(settings.options), list(record.options)),
        ("backup.exclude", list(settings.exclude), list(record.exclude)),
        ("backup.source", settings.source, record.source),
        ("the local rsync", local_version, record.local_version),
    ) if now != then]
    now = fingerprint(settings.options, settings.exclude, settings.source, local_version,
                      record.remote_version)
    if not changed and now == record.fingerprint:
        return None
    what = " and ".join(changed) or "the fingerprint"
    return (f"{what} changed since the capture of {record.captured_at}: the forced command "
            f"on {host.name} may no longer match what this pull sends; {AGAIN}")


def require_record(host: Host, local_rsync: str) -> CaptureRecord:
    """The record a captured-mode backup runs on; CaptureError if missing or drifted."""
    record = load_record(host)
    if record is None:
        raise CaptureError(f"no capture record for {host.name} ({record_path(host)}): run "
                           "`invoke capture-command` first")
    problem = check_drift(host, record, local_version_line(local_rsync))
    if problem:
        raise CaptureError(problem)
    return record


def local_version_line(rsync: str) -> str:
    try:
        result = subprocess.run([rsync, "--version"], capture_output=True, text=True,
                                check=False, timeout=30, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise CaptureError(f"cannot run {rsync} --version: {exc}") from None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or not lines:
        raise CaptureError(f"{rsync} --version failed (exit {result.returncode})")
    return lines[0].strip()


# --- the scripts (pure text) ---------------------------------------------------------------


def render_capture_script() -> bytes:
    from roles.core.render import render

    return render("capture.sh.j2", output=CAPTURED_FILE,
                  output_tmp=CAPTURED_FILE + ".tmp").encode()


def render_gate(real_sent: str, dry_sent: str, real_exec: tuple[str, ...],
                dry_exec: tuple[str, ...], *, fingerprint: str = "") -> bytes:
    """The gate script. Every word must already be validated as safe: the script holds
    them literally (quoting them would change nothing, which is the point). Nothing
    time-dependent goes in: a re-capture with the same result leaves the file as it is."""
    import shlex

    from roles.core.render import render

    for word in (*real_sent.split(" "), *dry_sent.split(" "), *real_exec, *dry_exec):
        if not SAFE_WORD.fullmatch(word):
            raise CaptureError(f"unsafe word {word!r} for the gate")
    if not (fingerprint == "" or SAFE_WORD.fullmatch(fingerprint)):
        raise CaptureError(f"unsafe fingerprint {fingerprint!r} for the gate")
    return render("gate.sh.j2", real_sent=shlex.quote(real_sent),
                  dry_sent=shlex.quote(dry_sent), real_exec=shlex.join(real_exec),
                  dry_exec=shlex.join(dry_exec), fingerprint=fingerprint or "-").encode()


def gate_file(record: CaptureRecord) -> HelperFile:
    from roles.features.setup_remote import HelperFile

    content = render_gate(
        record.sent, record.sent_dry_run, tuple(record.command.split(" ")),
        tuple(record.dry_run_command.split(" ")), fingerprint=record.fingerprint)
    return HelperFile("gate", GATE, content)


def capture_file() -> HelperFile:
    from roles.features.setup_remote import HelperFile

    return HelperFile("capture-script", CAPTURE_SCRIPT, render_capture_script())


# --- facts about the remote rsync (pure) -----------------------------------------------------


def remote_rsync(facts: HostFacts, host: Host) -> tuple[str, str, list[str]]:
    """``(path, version line, warnings)``: the pinned build, else the one on PATH."""
    wanted = host.rsync.remote_binary
    if wanted in facts.rsync:
        return wanted, facts.rsync[wanted], []
    others = [path for path in facts.rsync if path != wanted]
    if not others:
        raise CaptureError(f"no rsync on {host.name}: neither {wanted} nor one on PATH; run "
                           "`invoke build-rsync`")
    return others[0], facts.rsync[others[0]], [
        f"{wanted} is not installed: the gate runs {others[0]} (from the host's `command -v "
        "rsync`); run `invoke build-rsync`, then capture-command again, so both ends run the "
        "same build"]


def check_remote(record: CaptureRecord, facts: HostFacts) -> list[str]:
    """Warnings when the host's rsync is no longer the one the record was captured with."""
    now = facts.rsync.get(record.remote_rsync)
    if now is None:
        return [f"{record.remote_rsync} (the rsync the gate runs) is gone from the host; "
                f"{AGAIN}"]
    if now != record.remote_version:
        return [f"{record.remote_rsync} is now {now!r}, captured with "
                f"{record.remote_version!r}; {AGAIN}"]
    return []


def check_ready(facts: HostFacts) -> None:
    """sshd must let root in by forced command only: setup-remote's result."""
    from roles.features.setup_remote import WANT

    value = facts.effective.get("permitrootlogin", "")
    if value != WANT:
        raise CaptureError(f"sshd applies PermitRootLogin {value or '(unknown)'} to root "
                           f"from {facts.client_addr}, not {WANT}: run setup-remote first")


# --- on the hosts ------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def capture_once(conn: Any, host: Host, rsync: str, *, dry_run: bool) -> str:
    """Run the pull as ``backup`` would (it must fail), then read and remove the capture."""
    from roles.features.setup_remote import gather_files

    with tempfile.TemporaryDirectory(prefix="pullback-capture-") as tmp:
        argv = pull.build_argv(host, dry_run=dry_run, tty=False, local_rsync=rsync,
                                 dest=tmp)
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, errors="replace", env=runner.rsync_env(),
                                    check=False, timeout=120)
        except subprocess.TimeoutExpired:
            raise CaptureError("the capture pull did not end within 120 s") from None
    read = gather_files(conn, host.name, [CAPTURED_FILE], clear=[CAPTURED_FILE])
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


def prove(host: Host, rsync: str) -> None:
    """A dry-run pull with the backup key through the gate, into an empty folder."""
    with tempfile.TemporaryDirectory(prefix="pullback-proof-") as tmp:
        argv = pull.build_argv(host, dry_run=True, tty=False, local_rsync=rsync, dest=tmp)
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                env=runner.rsync_env(), check=False)
    if result.returncode not in pull.OK_CODES:
        raise CaptureError("the gate is installed and recorded, but a dry-run pull through "
                           f"it failed: {pull.describe_failure(result.returncode, [])}: "
                           f"{_last_line(result.stderr)}")


def _restore_keys(conn: Any, host: Host, facts: HostFacts, old: bytes | None) -> str:
    """Put the key file back as it was before the capture line (the previous gate keeps
    serving backups when a re-capture fails); returns what happened, for the error."""
    from roles.features.setup_remote import FileChange, SetupPlan, apply
    from roles.remote.facts import AUTHORIZED_KEYS

    current = facts.content(AUTHORIZED_KEYS)
    if old is None or current is None or old == current:
        return "the key line still runs the capture script, which serves nothing"
    plan = SetupPlan(host=host.name, changes=(FileChange("authorized_keys", AUTHORIZED_KEYS,
                                                         current, old, 0o600, 0, 0),),
                     fix_root_ssh=False, reload_sshd=False, client_addr=facts.client_addr,
                     sshd=facts.sshd, service=facts.service, pidfile="", forced_command=None)
    outcome = apply(conn, host, plan)
    if outcome.error:
        return f"restoring the previous key line failed too: {outcome.error}"
    return "the previous key line is back"


def capture_host(host: Host) -> Outcome:
    """capture-command on one host: capture, validate, install the gate, record, prove."""
    from roles.features.setup_remote import (
        Outcome,
        SetupError,
        apply,
        facts_after,
        gather_files,
        merge_facts,
        plan_setup,
        read_public_key,
    )
    from roles.remote.connection import ConnectError, connect
    from roles.remote.facts import AUTHORIZED_KEYS, gather

    if host.forced_command != "captured":
        return Outcome(host.name, {"capture": "skipped"},
                       warnings=("forced_command is daemon: there is nothing to capture",))
    steps: dict[str, str] = {}
    warnings: list[str] = []
    try:
        public_key = read_public_key(host)
        rsync, warning = runner.find_local_rsync(host)
        warnings += [warning] if warning else []
        refusal = runner.refuse_exposed_client(host, rsync,
                                               runner.local_rsync_version(host, rsync))
        if refusal:  # the capture runs are pulls from the server like any backup
            raise CaptureError(refusal)
        local_version = local_version_line(rsync)
        state = store.prepare_state(host)
        conn = connect(host)
    except (SetupError, store.BackupError, CaptureError, ConnectError, OSError) as exc:
        return Outcome(host.name, steps, error=str(exc), warnings=tuple(warnings))
    try:
        # A scheduled backup of this host must not run into the capture script.
        with store.Lock(state / "lock", host.name):
            facts = gather(conn, host.name, [host.rsync.remote_binary])
            check_ready(facts)
            remote, remote_version, more = remote_rsync(facts, host)
            warnings += more
            facts = merge_facts(facts, gather_files(
                conn, host.name, [CAPTURE_SCRIPT, GATE], [LIBEXEC, REMOTE_STATE],
                clear=[CAPTURED_FILE]))
            old_keys, old_gate = facts.content(AUTHORIZED_KEYS), facts.content(GATE)

            plan = plan_setup(facts, host, public_key, CAPTURE_SCRIPT, (capture_file(),),
                              (REMOTE_STATE,))
            if plan.reload_sshd:
                raise CaptureError("sshd_config does not yet say PermitRootLogin "
                                   "forced-commands-only where sshd reads it: run setup-remote "
                                   "first")
            warnings += plan.warnings
            outcome = apply(conn, host, plan)
            if outcome.error:
                raise CaptureError(f"installing the capture script failed: {outcome.error}")
            steps["capture-script"] = plan.steps["capture-script"]
            facts = facts_after(facts, plan)
            try:
                words = validate_sent(capture_once(conn, host, rsync, dry_run=False),
                                      host.backup.source)
                steps["capture"] = "ok"
                dry = dry_run_variant(words)
                sent_dry = capture_once(conn, host, rsync, dry_run=True)
                validate_sent(sent_dry, host.backup.source, dry_run=True)
                if sent_dry != " ".join(dry):
                    raise CaptureError(f"with -n the client sends {sent_dry!r}, not the "
                                       f"computed {' '.join(dry)!r}")
                steps["capture-dry-run"] = "ok"
                options, exclude = host.backup.options, host.backup.exclude
                record = CaptureRecord(
                    host=host.name,
                    captured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    source=host.backup.source, options=options, exclude=exclude,
                    sent=" ".join(words), sent_dry_run=sent_dry, remote_rsync=remote,
                    remote_version=remote_version, local_rsync=rsync,
                    local_version=local_version,
                    fingerprint=fingerprint(options, exclude, host.backup.source,
                                            local_version, remote_version))
                record.check()
                gate_plan = plan_setup(facts, host, public_key, GATE, (gate_file(record),))
                outcome = apply(conn, host, gate_plan)
                if outcome.error:
                    raise CaptureError(f"installing the gate failed: {outcome.error}")
            except (CaptureError, RuntimeError, ValueError, OSError) as exc:
                raise CaptureError(f"{exc}; {_restore_keys(conn, host, facts, old_keys)}") \
                    from None
            facts = facts_after(facts, gate_plan)
            steps["gate"] = "ok" if facts.content(GATE) == old_gate else "changed"
            steps["authorized_keys"] = "ok" if facts.content(AUTHORIZED_KEYS) == old_keys \
                else "changed"
            path = save_record(host, record)
            steps["record"] = "written"
        prove(host, rsync)
        steps["proof-dry-run"] = "ok"
        actions = (f"forced command: {GATE}", f"runs: {record.command}",
                   f"   or: {record.dry_run_command}", f"record: {path}")
        return Outcome(host.name, steps, warnings=tuple(warnings), actions=actions)
    except (CaptureError, SetupError, store.BackupError, RuntimeError, ValueError,
            OSError) as exc:
        return Outcome(host.name, steps, error=str(exc), warnings=tuple(warnings))
    finally:
        conn.close()
