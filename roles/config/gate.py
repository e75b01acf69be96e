"""Captured mode's root-only scripts on a host, rendered (pure): the capture script that
records ``$SSH_ORIGINAL_COMMAND`` once, and the gate that compares it byte for byte with
the two recorded commands and execs the matching one by full path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from roles.core.hardened import CAPTURE_SCRIPT, CAPTURED_FILE, GATE, HelperFile
from roles.core.render import render
from roles.core.rsync import SAFE_WORD, CaptureError
from roles.local.capture_record import AGAIN, CaptureRecord

if TYPE_CHECKING:
    from roles.remote.facts import HostFacts


def render_capture_script() -> bytes:
    return render("scripts/capture.sh.j2", output=CAPTURED_FILE,
                  output_tmp=CAPTURED_FILE + ".tmp").encode()


def render_gate(real_sent: str, dry_sent: str, real_exec: tuple[str, ...],
                dry_exec: tuple[str, ...], *, fingerprint: str = "") -> bytes:
    """The gate script. Every word must already be validated as safe: the script holds
    them literally (quoting them would change nothing, which is the point). Nothing
    time-dependent goes in: a re-capture with the same result leaves the file as it is."""
    for word in (*real_sent.split(" "), *dry_sent.split(" "), *real_exec, *dry_exec):
        if not SAFE_WORD.fullmatch(word):
            raise CaptureError(f"unsafe word {word!r} for the gate")
    if not (fingerprint == "" or SAFE_WORD.fullmatch(fingerprint)):
        raise CaptureError(f"unsafe fingerprint {fingerprint!r} for the gate")
    return render("scripts/gate.sh.j2", real_sent=real_sent, dry_sent=dry_sent,
                  real_exec=real_exec, dry_exec=dry_exec,
                  fingerprint=fingerprint or "-").encode()


def gate_file(record: CaptureRecord) -> HelperFile:
    content = render_gate(
        record.sent, record.sent_dry_run, tuple(record.command.split(" ")),
        tuple(record.dry_run_command.split(" ")), fingerprint=record.fingerprint)
    return HelperFile("gate", GATE, content)


def capture_file() -> HelperFile:
    return HelperFile("capture-script", CAPTURE_SCRIPT, render_capture_script())


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
