"""The capture record on the backup host: ``DEST.pullback/capture.json``, written by
capture-command, read by backup (which refuses on drift), doctor and setup-remote.

It holds both captured commands, both rsyncs and a fingerprint (SHA-256 over options,
excludes, source, extra sources, the local and the remote ``rsync --version`` line)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from roles.core.rsync import CaptureError, dry_run_variant, fingerprint, validate_sent, with_binary
from roles.core.spec import HostSpec
from roles.local import store

RECORD_NAME = "capture.json"
RECORD_FORMAT = 1
AGAIN = "run `invoke capture-command` again"


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
    extra_sources: tuple[str, ...] = ()  # backup.extra_sources when captured

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
        data["extra_sources"] = list(self.extra_sources)
        return json.dumps(data, indent=2) + "\n"

    def check(self) -> None:
        """Re-validate everything the gate is rendered from (the file could be edited)."""
        words = validate_sent(self.sent, self.source, extra_sources=self.extra_sources)
        validate_sent(self.sent_dry_run, self.source, dry_run=True,
                      extra_sources=self.extra_sources)
        if " ".join(dry_run_variant(words)) != self.sent_dry_run:
            raise CaptureError("the dry-run command is not the real one plus 'n'")
        with_binary(words, self.remote_rsync)
        if fingerprint(self.options, self.exclude, self.source, self.local_version,
                       self.remote_version, self.extra_sources) != self.fingerprint:
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
        data["extra_sources"] = tuple(data.get("extra_sources", ()))
        record = CaptureRecord(**data)
        if not all(isinstance(v, str) for v in asdict(record).values()
                   if not isinstance(v, tuple)):
            raise CaptureError("a field is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise CaptureError(f"unreadable: {exc}") from None
    record.check()
    return record


def record_path(host: HostSpec) -> Path:
    return store.state_dir(host) / RECORD_NAME


def load_record(host: HostSpec) -> CaptureRecord | None:
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


def save_record(host: HostSpec, record: CaptureRecord) -> Path:
    """Write the record atomically, 0600 in the 0700 state folder."""
    path = record_path(host)
    store.mkdir_private(path.parent)
    tmp = path.with_name(f".{RECORD_NAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(record.to_json())
    os.replace(tmp, path)
    return path


def check_drift(host: HostSpec, record: CaptureRecord, local_version: str) -> str | None:
    """Why the recorded command no longer fits this host's settings, or None.

    The remote version line is the recorded one: ``backup`` has no admin access to read it.
    """
    settings = host.backup
    changed = [name for name, now, then in (
        ("backup.options", list(settings.options), list(record.options)),
        ("backup.exclude", list(settings.exclude), list(record.exclude)),
        ("backup.source", settings.source, record.source),
        ("backup.extra_sources", list(getattr(settings, "extra_sources", ())),
         list(record.extra_sources)),
        ("the local rsync", local_version, record.local_version),
    ) if now != then]
    now = fingerprint(settings.options, settings.exclude, settings.source, local_version,
                      record.remote_version, tuple(getattr(settings, "extra_sources", ())))
    if not changed and now == record.fingerprint:
        return None
    what = " and ".join(changed) or "the fingerprint"
    return (f"{what} changed since the capture of {record.captured_at}: the forced command "
            f"on {host.name} may no longer match what this pull sends; {AGAIN}")


def require_record(host: HostSpec, local_rsync: str) -> CaptureRecord:
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
