"""roles.features.capture's pure layer: validating captured commands, the dry-run variant, the
fingerprint and the record, the capture and gate scripts (rendered, then run with ``sh`` in
a temporary folder with stand-in commands), and setup's planning of the scripts."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from roles.config import gate as gate_scripts
from roles.core import hardened
from roles.core import rsync as rsync_model
from roles.core.hardened import HelperFile
from roles.core.outcome import State
from roles.core.render import render
from roles.core.spec import HostSpec
from roles.features import capture as cap
from roles.features.setup_remote import plan_setup
from roles.hostfiles.transaction import apply_script, facts_after, merge_facts, read_files_script
from roles.inventory.schema import validate_host
from roles.local import capture_record
from roles.remote.facts import AUTHORIZED_KEYS, SSHD_CONFIG, FileFact, HostFacts, parse_report

REAL = "rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /srv/data/"
DRY = "rsync --server --sender -vnlogDtprxze.iLsfxCIvu --numeric-ids . /srv/data/"
V31 = "rsync  version 3.2.7  protocol version 31"
V32 = "rsync  version 3.5.0  protocol version 32"


def make_host(tmp: Path | None = None, **backup) -> HostSpec:
    data = {"name": "web1", "address": "192.0.2.10", "admin_user": "admin",
            "backup_key": "/keys/backup", "forced_command": "captured",
            "backup": {"source": "/srv/data", **backup}}
    if "options" in backup:  # options chosen to test the capture, not a full-system copy
        data["backup"].setdefault("allow_inexact", True)
    if tmp is not None:
        data["backup"]["destination"] = str(tmp / "{name}")
    return validate_host(data)


def make_record(for_host: HostSpec, **changes) -> capture_record.CaptureRecord:
    settings = for_host.backup
    record = capture_record.CaptureRecord(
        host=for_host.name, captured_at="2026-11-26T10:15:00Z", source=settings.source,
        options=settings.options, exclude=settings.exclude, sent=REAL, sent_dry_run=DRY,
        remote_rsync="/usr/local/bin/rsync", remote_version=V31,
        local_rsync="/usr/local/bin/rsync", local_version=V32,
        fingerprint=rsync_model.fingerprint(settings.options, settings.exclude, settings.source, V32,
                                    V31))
    return dataclasses.replace(record, **changes)


# --- validating what the client sent ---------------------------------------------------------


@pytest.mark.parametrize(("text", "source", "dry_run"), [
    (REAL, "/srv/data", False),
    (DRY, "/srv/data/", True),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /", "/", False),
    ("rsync --server --sender -vlogDtprxz --numeric-ids . /", "/", False),  # 2.6.9
    ("rsync --server --sender -vnlogDtprxz --numeric-ids . /", "/", True),  # the seed's
    # Capability letters after `e` are not options, whatever they are.
    ("rsync --server --sender -vlogDtprxze.iLnsfxCIvu . /", "/", False),
])
def test_valid_commands(text, source, dry_run):
    assert rsync_model.validate_sent(text, source, dry_run=dry_run) == tuple(text.split(" "))


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    (DRY, "holds the dry-run flag 'n'"),
    ("rsync --server --daemon .", "does not start with 'rsync --server --sender'"),
    ("/usr/bin/rsync --server --sender -vlogDtprxze.iLsfxCIvu . /srv/data/",
     "does not start with"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /etc/", r"'\. /srv/data/'"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /srv/data", "end with"),
    ("rsync --server --sender -s .", "end with"),
    ("rsync --server --sender --numeric-ids . /srv/data/", "no short-option cluster"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu  . /srv/data/", "characters"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu . /srv/data/\n", "characters"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu . /srv/da$(id)ta/", r"'/srv/da\$\(id\)ta/'"),
    ("rsync --server --sender -vlogDtprxze.iLsfxCIvu . /srv/data/;reboot", "'/srv/data/;reboot'"),
])
def test_invalid_commands(text, why):
    with pytest.raises(cap.CaptureError, match=why):
        rsync_model.validate_sent(text, "/srv/data")


# What a client really sends with options that write on the server (this machine's rsync
# 3.5.0 with a stand-in ssh; see test_the_local_client_refuses_what_writes for the live run).
SENT_WITH = "rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids {} . /srv/data/"


@pytest.mark.parametrize(("text", "why"), [
    (SENT_WITH.format("--remove-source-files"), "'--remove-source-files', which deletes"),
    (SENT_WITH.format("--remove-sent-files"), "'--remove-sent-files', which deletes"),
    (SENT_WITH.format("--remove-anything"), "writes or deletes on the server"),
    (SENT_WITH.format("--log-file=/etc/cron.d/x"), "write a log file"),  # from -M
    (SENT_WITH.format("--log-file-format=%i"), "'--log-file-format=%i'"),
    (SENT_WITH.format("--log-filex=/x"), "writes or deletes on the server"),
    (SENT_WITH.format("-essh"), "names a command to run"),  # what -M-essh sends
    (SENT_WITH.format("-e"), "names a command to run"),
    (SENT_WITH.format("--rsh=ssh"), "names a command to run"),
    (SENT_WITH.format("-M--log-file=/x"), "passes options to the server's rsync"),
    (SENT_WITH.format("--remote-option=-x"), "passes options to the server's rsync"),
    (SENT_WITH.format("-T/tmp"), "write into a folder"),
    (SENT_WITH.format("--daemon"), "starts a daemon"),
    (SENT_WITH.format("--config=/etc/x"), "starts a daemon"),
    (SENT_WITH.format("--only-write-batch=/x"), "writes a batch file"),
    # The cluster: flags, then e and the capability string; nothing else takes an argument.
    ("rsync --server --sender -vlogDtprxzessh . /srv/data/", "holds -e with the argument 'ssh'"),
    ("rsync --server --sender -vlogDtprxze/bin/sh . /srv/data/", "holds -e"),
    ("rsync --server --sender -vlogM--log-file=/x . /srv/data/", "holds -M"),
    ("rsync --server --sender -vlogT/tmp . /srv/data/", "holds -T"),
    ("rsync --server --sender -vlogDtprxzB1024 . /srv/data/", "holds -B"),
    # A dry run hidden outside the cluster is still a dry run: refused for a real capture.
    (SENT_WITH.format("--dry-run"), "holds the dry-run flag"),
    (SENT_WITH.format("-0n"), "holds the dry-run flag"),
])
def test_commands_that_write_on_the_server_are_refused(text, why):
    with pytest.raises(cap.CaptureError, match=re.escape(why)):
        rsync_model.validate_sent(text, "/srv/data")


@pytest.mark.parametrize("text", [
    REAL,
    SENT_WITH.format("-B2048"),  # --block-size: sent as a word of its own; the sender reads
    SENT_WITH.format("--iconv=utf8"),
    SENT_WITH.format("--checksum-choice=md5"),
    "rsync --server --sender -vlogDtpRxze.LsfxCIvu --numeric-ids --files-from=- --from0 . "
    "/srv/data/",
    "rsync --server --sender -0vlogDtprxze.iLsfxCIvu . /srv/data/",  # flags before e
    "rsync --server --sender -vlogDtprxze31.2iLsfxCIvu . /srv/data/",  # a pre-release's e
])
def test_sender_options_that_read_pass(text):
    assert rsync_model.validate_sent(text, "/srv/data") == tuple(text.split(" "))


@pytest.mark.parametrize(("word", "parts"), [
    ("-vlogDtprxze.iLsfxCIvu", ("vlogDtprxz", "e", ".iLsfxCIvu")),
    ("-vlogDtprxz", ("vlogDtprxz", "", "")),
    ("-0e.iLs", ("0", "e", ".iLs")),
    ("-0n", ("0n", "", "")),
    ("-B1024n", ("", "B", "1024n")),
    ("-avM--log-file=/x", ("av", "M", "--log-file=/x")),
    ("-@-1", ("", "@", "-1")),
    ("--dry-run", ("", "", "")),
])
def test_split_short_reads_a_word_as_popt_does(word, parts):
    assert rsync_model.split_short(word) == parts


@pytest.mark.parametrize(("option", "sent"), [
    ("--remove-source-files", "--remove-source-files"),
    ("--remove-sent-files", "--remove-sent-files"),
    ("-M--log-file=/tmp/x", "--log-file=/tmp/x"),
    ("--remote-option=--log-file-format=%i", "--log-file-format=%i"),
    ("-M-essh", "-essh"),
])
def test_the_local_client_refuses_what_writes(tmp_path, option, sent):
    """What this machine's rsync really sends for options that write on the server: each is
    refused, so capture-command never installs it as the forced command."""
    rsync = shutil.which("rsync")
    assert rsync, "rsync is needed on PATH"
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    out = tmp_path / "captured"
    subprocess.run([rsync, "-e", str(ssh), "-avzx", "--numeric-ids", option,
                    "root@h:/srv/data/", str(tmp_path / "dest")], capture_output=True,
                   env={**os.environ, "CAPTURED": str(out)}, check=False, timeout=30)
    text = out.read_text()
    assert sent in text.split(" ")
    with pytest.raises(cap.CaptureError, match="runs only sender options that read"):
        rsync_model.validate_sent(text, "/srv/data")


def test_a_dry_run_capture_must_hold_n():
    with pytest.raises(cap.CaptureError, match="has no 'n'"):
        rsync_model.validate_sent(REAL, "/srv/data", dry_run=True)


@pytest.mark.parametrize(("source", "path"), [
    ("/", "/"), ("/srv/data", "/srv/data/"), ("/srv/data/", "/srv/data/"), ("//srv", "/srv/"),
])
def test_remote_path(source, path):
    assert rsync_model.remote_path(source) == path


# --- the dry-run variant ---------------------------------------------------------------------

# Real clusters sent by rsync 3.5.0 here (-e a stand-in ssh), with and without -n, and the
# seed's 2.6.x one.
@pytest.mark.parametrize(("real", "dry"), [
    ("-vlogDtprxze.iLsfxCIvu", "-vnlogDtprxze.iLsfxCIvu"),        # -avzx
    ("-lHogDtpAXrxe.iLsfxCIvu", "-nlHogDtpAXrxe.iLsfxCIvu"),      # -aHAXx: no v
    ("-vvblogDtprxze.iLsfxCIvu", "-vvbnlogDtprxze.iLsfxCIvu"),    # -avvzx -b
    ("-vulogDtprxze.iLsfxCIvu", "-vunlogDtprxze.iLsfxCIvu"),      # -avzxu
    ("-re.iLsfxCIvu", "-nre.iLsfxCIvu"),                          # -r
    ("-vlogDtprxz", "-vnlogDtprxz"),                              # 2.6.x
])
def test_dry_run_variant_puts_n_where_rsync_does(real, dry):
    words = ("rsync", "--server", "--sender", real, "--numeric-ids", ".", "/")
    assert rsync_model.dry_run_variant(words) == (*words[:3], dry, *words[4:])


def test_dry_run_variant_of_a_dry_run_is_refused():
    with pytest.raises(cap.CaptureError, match="already holds"):
        rsync_model.dry_run_variant(tuple(DRY.split(" ")))


FAKE_SSH = """#!/bin/sh
# ssh stand-in: record the remote command (after -l USER HOST) and fail like the capture.
shift 3
printf '%s' "$*" > "$CAPTURED"
exit 1
"""


@pytest.mark.parametrize("options", [
    ["-avzx", "--numeric-ids", "--delete", "--progress", "--stats"],
    ["-aHAXx", "--numeric-ids", "--delete", "--stats", "--exclude=/proc/*"],
    ["-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress", "--stats"],  # the default
    ["-avvzxub", "--numeric-ids", "--max-delete=5", "--link-dest=/x", "--info=progress2"],
])
def test_the_local_client_agrees_with_the_computed_variant(tmp_path, options):
    """What this machine's rsync really sends with -n is the computed variant; and the
    receiver-side options (--stats, --delete, --progress, excludes...) are not sent."""
    rsync = shutil.which("rsync")
    assert rsync, "rsync is needed on PATH"
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    sent = {}
    for dry in (False, True):
        out = tmp_path / f"captured-{dry}"
        subprocess.run([rsync, "-e", str(ssh), *options, *(["-n"] if dry else []),
                        "root@h:/srv/data/", str(tmp_path / "dest")], capture_output=True,
                       env={**os.environ, "CAPTURED": str(out)}, check=False, timeout=30)
        sent[dry] = out.read_text()
    words = rsync_model.validate_sent(sent[False], "/srv/data")
    assert " ".join(rsync_model.dry_run_variant(words)) == sent[True]
    for receiver_side in ("--stats", "--delete", "--progress", "--exclude", "--max-delete",
                          "--link-dest", "--info"):
        assert receiver_side not in sent[False]


def test_with_binary():
    words = tuple(REAL.split(" "))
    assert rsync_model.with_binary(words, "/usr/local/bin/rsync")[0] == "/usr/local/bin/rsync"
    assert rsync_model.with_binary(words, "/usr/local/bin/rsync")[1:] == words[1:]
    for bad in ("rsync", "/opt/my rsync/bin/rsync", "/x;y"):
        with pytest.raises(cap.CaptureError):
            rsync_model.with_binary(words, bad)


# --- fingerprint and record ------------------------------------------------------------------


def test_fingerprint_covers_every_input():
    base = (("-avzx", "--numeric-ids"), ("/proc/*",), "/", V32, V31)
    first = rsync_model.fingerprint(*base)
    assert first == rsync_model.fingerprint(*base) and len(first) == 64
    variants = [
        (("--numeric-ids", "-avzx"), *base[1:]),         # order matters to rsync
        (base[0], (), *base[2:]),
        (*base[:2], "/srv", *base[3:]),
        (*base[:3], V31, V31),
        (*base[:4], V32),
        ((*base[0], "/proc/*"), (), *base[2:]),         # no ambiguity between the lists
    ]
    assert len({first, *(rsync_model.fingerprint(*v) for v in variants)}) == len(variants) + 1


def test_record_round_trips_and_names_the_full_commands(tmp_path):
    host = make_host(tmp_path)
    record = make_record(host)
    data = json.loads(record.to_json())
    assert data["command"] == REAL.replace("rsync", "/usr/local/bin/rsync", 1)
    assert data["dry_run_command"] == DRY.replace("rsync", "/usr/local/bin/rsync", 1)
    assert capture_record.parse_record(record.to_json()) == record
    path = capture_record.save_record(host, record)
    assert path == tmp_path / "web1.pullback" / "capture.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert capture_record.load_record(host) == record


@pytest.mark.parametrize(("edit", "why"), [
    (lambda d: d.update(sent_dry_run=REAL), "has no 'n'"),
    (lambda d: d.update(sent_dry_run=DRY.replace("-vn", "-nv")), "real one plus 'n'"),
    (lambda d: d.update(remote_rsync="/usr/bin/rsync; id"), "remote rsync path"),
    (lambda d: d.update(options=["-avzxH"]), "fingerprint does not match"),
    (lambda d: d.update(local_version=V31), "fingerprint does not match"),
    (lambda d: d.update(sent=REAL + " /etc/"), "does not end with"),
    (lambda d: d.update(format=0), "format-1"),
    (lambda d: d.pop("fingerprint"), "unreadable"),
    (lambda d: d.update(fingerprint=5), "not a string"),
])
def test_a_damaged_record_is_refused(tmp_path, edit, why):
    host = make_host(tmp_path)
    data = json.loads(make_record(host).to_json())
    edit(data)
    with pytest.raises(cap.CaptureError, match=why):
        capture_record.parse_record(json.dumps(data))
    capture_record.save_record(host, make_record(host))
    capture_record.record_path(host).write_text(json.dumps(data))
    with pytest.raises(cap.CaptureError, match=r"is damaged .*run `invoke capture-command`"):
        capture_record.load_record(host)


def test_load_record_missing_and_for_another_host(tmp_path):
    host = make_host(tmp_path)
    assert capture_record.load_record(host) is None
    capture_record.save_record(host, make_record(host, host="db1"))
    with pytest.raises(cap.CaptureError, match="is for host 'db1'"):
        capture_record.load_record(host)


def test_check_drift_names_what_changed(tmp_path):
    host = make_host(tmp_path)
    record = make_record(host)
    assert capture_record.check_drift(host, record, V32) is None
    moved = make_host(tmp_path, options=("-avzx",), exclude=("/tmp/*",))
    problem = capture_record.check_drift(moved, record, V31)
    assert problem.startswith("backup.options and backup.exclude and the local rsync changed "
                              "since the capture of 2026-11-26T10:15:00Z")
    assert problem.endswith("run `invoke capture-command` again")
    # The remote version line is the recorded one: nothing else can tell backup about it.
    assert capture_record.check_drift(host, dataclasses.replace(record, remote_version=V32), V32) \
        == ("the fingerprint changed since the capture of 2026-11-26T10:15:00Z: the forced "
            "command on web1 may no longer match what this pull sends; run `invoke "
            "capture-command` again")


# --- the scripts, rendered and run --------------------------------------------------------------


def run_sh(script: Path, command: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"]}
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          check=False, timeout=30)


def test_capture_script_writes_the_command_root_only_and_fails(tmp_path):
    out = tmp_path / "captured-command"
    script = tmp_path / "capture"
    script.write_text(render("scripts/capture.sh.j2", output=str(out), output_tmp=f"{out}.tmp"))
    result = run_sh(script, REAL)
    assert result.returncode == 1 and result.stdout == ""
    assert "command captured" in result.stderr
    assert out.read_bytes() == REAL.encode()  # byte for byte, no newline added
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture", "captured-command"]
    weird = "rsync 'x' \"y\" $(id) \\ `z`"
    assert run_sh(script, weird).returncode == 1 and out.read_text() == weird


def test_rendered_capture_script_uses_the_root_only_path():
    text = gate_scripts.render_capture_script().decode()
    assert text.startswith("#!/bin/sh\n# managed by pullback")
    assert f"> {hardened.CAPTURED_FILE}.tmp && mv -f {hardened.CAPTURED_FILE}.tmp {hardened.CAPTURED_FILE}" \
        in text
    assert subprocess.run(["sh", "-n"], input=text, text=True, check=False).returncode == 0


STAND_IN = """#!/bin/sh
printf 'RAN %s\\n' "$*"
"""


@pytest.fixture
def gate(tmp_path) -> tuple[Path, Path]:
    """A gate whose two commands exec a stand-in that prints its arguments."""
    fake = tmp_path / "bin" / "rsync"
    fake.parent.mkdir()
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    real_exec = (str(fake), *REAL.split(" ")[1:])
    dry_exec = (str(fake), *DRY.split(" ")[1:])
    script = tmp_path / "gate"
    script.write_bytes(gate_scripts.render_gate(REAL, DRY, real_exec, dry_exec, fingerprint="ab12"))
    return script, fake


def test_gate_runs_exactly_the_two_recorded_commands(gate):
    script, _ = gate
    real = run_sh(script, REAL)
    assert real.returncode == 0, real.stderr
    assert real.stdout == "RAN " + REAL.removeprefix("rsync ") + "\n" and real.stderr == ""
    dry = run_sh(script, DRY)
    assert dry.returncode == 0 and dry.stdout == "RAN " + DRY.removeprefix("rsync ") + "\n"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "Invalid file index" in text and "# fingerprint: ab12" in text


@pytest.mark.parametrize("command", [
    "rsync --server --sender -vlogDtprxzen . /etc/",
    "rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /etc/",
    "rsync --server --daemon .",
    REAL + " ",
    " " + REAL,
    REAL + "\n",
    REAL.replace("-vlog", "-vnnlog"),
    REAL + "; touch /tmp/pwned-by-gate-test",
    f"{REAL} $(touch /tmp/pwned-by-gate-test)",
    "sh",
    "",
    None,
])
def test_gate_refuses_everything_else(gate, command):
    script, _ = gate
    result = run_sh(script, command)
    assert result.returncode == 1
    assert result.stdout == ""  # nothing ran: the stand-in prints to stdout
    assert result.stderr.startswith("pullback gate: refused: ")
    assert "run `invoke capture-command` again" in result.stderr
    assert not Path("/tmp/pwned-by-gate-test").exists()


def test_gate_needs_safe_words():
    words = tuple(REAL.split(" "))
    for bad in ("/srv/a b/", "/srv/$x/", "/srv/'q'/", "/srv/*/"):
        with pytest.raises(cap.CaptureError, match="unsafe word"):
            gate_scripts.render_gate(REAL, DRY, (*words[:-1], bad), words)
    with pytest.raises(cap.CaptureError, match="unsafe fingerprint"):
        gate_scripts.render_gate(REAL, DRY, words, words, fingerprint="x\nrm -rf /")


def test_gate_file_from_a_record():
    record = make_record(make_host())
    helper = gate_scripts.gate_file(record)
    assert helper.path == hardened.GATE == "/usr/local/libexec/pullback/gate"
    text = helper.content.decode()
    assert f"real='{REAL}'\n" in text and f"dry_run='{DRY}'\n" in text
    assert f"exec /usr/local/bin/rsync {REAL.removeprefix('rsync ')}\n" in text
    assert f"exec /usr/local/bin/rsync {DRY.removeprefix('rsync ')}\n" in text


# --- remote facts --------------------------------------------------------------------------------


def host_facts(rsync: dict[str, str], permit: str = "forced-commands-only",
               files: dict[str, bytes] | None = None,
               dirs: dict[str, tuple[int, int, int]] | None = None) -> HostFacts:
    return HostFacts(
        files={p: FileFact(p, c, 0o600 if "authorized" in p else 0o644, 0, 0)
               for p, c in (files or {SSHD_CONFIG: b"PermitRootLogin forced-commands-only\n"})
               .items()},
        missing=frozenset(), includes={}, dirs=dirs if dirs is not None
        else {"/root/.ssh": (0o700, 0, 0)}, client_addr="192.0.2.1", openssh=(9, 2),
        sshd="/usr/sbin/sshd", effective={"permitrootlogin": permit}, sshd_T_error="",
        service=None, rsync=rsync)


def test_remote_rsync_prefers_the_pinned_build_else_says_so():
    host = make_host()
    both = host_facts({"/usr/local/bin/rsync": V32, "/usr/bin/rsync": V31})
    assert cap.remote_rsync(both, host) == ("/usr/local/bin/rsync", V32, [])
    path, version, (warning,) = cap.remote_rsync(host_facts({"/usr/bin/rsync": V31}), host)
    assert (path, version) == ("/usr/bin/rsync", V31)
    assert "/usr/local/bin/rsync is not installed" in warning and "command -v" in warning
    with pytest.raises(cap.CaptureError, match="no rsync on web1"):
        cap.remote_rsync(host_facts({}), host)


def test_check_remote_and_check_ready():
    record = make_record(make_host())
    assert gate_scripts.check_remote(record, host_facts({"/usr/local/bin/rsync": V31})) == []
    (changed,) = gate_scripts.check_remote(record, host_facts({"/usr/local/bin/rsync": V32}))
    assert "is now" in changed and "capture-command` again" in changed
    (gone,) = gate_scripts.check_remote(record, host_facts({"/usr/bin/rsync": V31}))
    assert "is gone" in gone
    cap.check_ready(host_facts({}))
    with pytest.raises(cap.CaptureError, match="PermitRootLogin without-password .* run "
                                               "setup-remote first"):
        cap.check_ready(host_facts({}, permit="without-password"))


# --- setup's planning of the scripts -------------------------------------------------------------


def make_key() -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes([7]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} backup@client"


GATE_FILE = HelperFile("gate", hardened.GATE, b"#!/bin/sh\nexit 1\n")


def test_plan_installs_the_gate_before_the_key_line_and_creates_its_folder():
    facts = host_facts({})
    plan = plan_setup(facts, make_host(), make_key(), hardened.GATE, (GATE_FILE,),
                      (hardened.REMOTE_STATE,))
    assert [c.step for c in plan.changes] == ["gate", "authorized_keys"]
    gate = plan.changes[0]
    assert (gate.old, gate.new, gate.mode, gate.uid, gate.gid, gate.check_sh) == \
        (None, GATE_FILE.content, 0o700, 0, 0, True)
    assert f'command="{hardened.GATE}"' in plan.changes[1].new.decode()
    assert plan.make_dirs == (hardened.LIBEXEC, hardened.REMOTE_STATE)
    assert plan.steps == {"sshd_config": State.OK, "authorized_keys": State.CHANGED,
                          "gate": State.CHANGED, "folders": State.CHANGED}
    script = apply_script(plan)
    assert f"sh -n {hardened.GATE}.pullback-new" in script
    assert f"(umask 022 && mkdir -p /usr/local/libexec) && mkdir {hardened.LIBEXEC}" in script
    assert script.index(f"mv -fT {hardened.GATE}.pullback-new") < \
        script.index(f"mv -fT {AUTHORIZED_KEYS}.pullback-new")

    # Applied: the same plan again changes nothing.
    after = facts_after(facts, plan)
    again = plan_setup(after, make_host(), make_key(), hardened.GATE, (GATE_FILE,),
                       (hardened.REMOTE_STATE,))
    assert not again.changed and again.make_dirs == ()
    assert again.steps == {"sshd_config": State.OK, "authorized_keys": State.OK,
                           "gate": State.OK, "folders": State.OK}


def test_plan_repairs_a_gate_with_the_wrong_mode_or_content():
    facts = host_facts({}, dirs={"/root/.ssh": (0o700, 0, 0), hardened.LIBEXEC: (0o755, 0, 0)})
    facts = merge_facts(facts, host_facts({}, files={hardened.GATE: GATE_FILE.content}, dirs={}))
    plan = plan_setup(facts, make_host(), make_key(), hardened.GATE, (GATE_FILE,))
    assert plan.make_dirs == (hardened.LIBEXEC,)  # 0755 is not ours: set to 0700
    assert plan.steps["gate"] is State.CHANGED  # 0644, not 0700
    gate = next(c for c in plan.changes if c.step == "gate")
    assert gate.old == GATE_FILE.content and gate.mode == 0o700


def test_apply_script_creates_the_folder_and_removes_it_on_failure(tmp_path):
    assert os.geteuid() == 0, "the script chowns to root: run the unit tests as root"
    folder = tmp_path / "libexec" / "pullback"
    helper = HelperFile("gate", str(folder / "gate"), b"#!/bin/sh\nexit 1\n")
    facts = host_facts({})
    plan = plan_setup(facts, make_host(), make_key(), hardened.GATE, (helper,))
    plan = dataclasses.replace(plan, changes=tuple(c for c in plan.changes if c.step == "gate"))
    result = subprocess.run(["sh", "-c", apply_script(plan)], capture_output=True, text=True,
                            check=False)
    assert result.stdout == "PULLBACK_OK\n", result.stdout + result.stderr
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder.parent.stat().st_mode & 0o777) == 0o755
    assert (folder / "gate").read_bytes() == helper.content
    assert (folder / "gate").stat().st_mode & 0o777 == 0o700

    # A script sh -n rejects: nothing stays behind, not even the folder.
    shutil.rmtree(folder)
    broken = HelperFile("gate", str(folder / "gate"), b"#!/bin/sh\nif then fi\n")
    plan = plan_setup(facts, make_host(), make_key(), hardened.GATE, (broken,))
    plan = dataclasses.replace(plan, changes=tuple(c for c in plan.changes if c.step == "gate"))
    result = subprocess.run(["sh", "-c", apply_script(plan)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1
    assert result.stdout.startswith(f"PULLBACK_FAIL sh -n rejects the new {folder}/gate")
    assert not folder.exists()


def test_read_files_script_reports_and_clears(tmp_path):
    one = tmp_path / "one"
    one.write_bytes(b"\x00\xff bytes\r\n")
    one.chmod(0o600)
    gone = tmp_path / "gone"
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    script = read_files_script([str(one), str(gone)], [str(folder), str(tmp_path / "nodir")],
                               [str(one)])
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    facts = parse_report(out.stdout.rstrip("\n"))
    assert facts.files[str(one)].content == b"\x00\xff bytes\r\n"
    assert facts.files[str(one)].mode == 0o600
    assert facts.missing == {str(gone)}
    assert facts.dirs == {str(folder): (0o700, os.getuid(), os.getgid())}
    assert not one.exists()


# --- backup.extra_sources: one command with -R and every path ---------------------------------

EXTRA = ("rsync --server --sender -vlogDtprRxze.iLsfxCIvu --numeric-ids . /srv/data/./ "
         "/srv/data/./home/ /srv/data/./boot/")


def test_validate_sent_with_extra_sources_wants_every_path_in_order():
    extras = ("/srv/data/home", "/srv/data/boot")
    assert rsync_model.validate_sent(EXTRA, "/srv/data", extra_sources=extras) == \
        tuple(EXTRA.split(" "))
    for bad in (EXTRA.replace(" /srv/data/./boot/", ""),           # one missing
                EXTRA.replace("/./home/ /srv/data/./boot/", "/./boot/ /srv/data/./home/"),
                REAL):
        with pytest.raises(cap.CaptureError, match="does not end with '. /srv/data/./ "):
            rsync_model.validate_sent(bad, "/srv/data", extra_sources=extras)
    # Without extra_sources in the settings, such a command is not the recorded pull.
    with pytest.raises(cap.CaptureError, match="does not end with '. /srv/data/'"):
        rsync_model.validate_sent(EXTRA, "/srv/data")


def test_remote_paths():
    assert rsync_model.remote_paths("/") == ["/"]
    assert rsync_model.remote_paths("/srv/data/") == ["/srv/data/"]
    assert rsync_model.remote_paths("/", ("/home", "/var/lib/x")) == ["/./", "/./home/",
                                                                      "/./var/lib/x/"]
    assert rsync_model.remote_paths("/srv", ("/srv/a",)) == ["/srv/./", "/srv/./a/"]


def test_a_record_with_extra_sources_round_trips_and_drifts_without_them(tmp_path):
    host = make_host(tmp_path, extra_sources=("/srv/data/home", "/srv/data/boot"))
    settings = host.backup
    record = make_record(
        host, sent=EXTRA, sent_dry_run=EXTRA.replace("-vl", "-vnl", 1),
        extra_sources=settings.extra_sources,
        fingerprint=rsync_model.fingerprint(settings.options, settings.exclude,
                                            settings.source, V32, V31, settings.extra_sources))
    assert json.loads(record.to_json())["extra_sources"] == ["/srv/data/home", "/srv/data/boot"]
    assert capture_record.parse_record(record.to_json()) == record
    assert capture_record.check_drift(host, record, V32) is None
    plain = make_host(tmp_path)
    assert capture_record.check_drift(plain, record, V32).startswith(
        "backup.extra_sources changed since the capture")
    # A record written before extra_sources existed has no such key, and its fingerprint
    # stays valid.
    old = json.loads(make_record(plain).to_json())
    del old["extra_sources"]
    assert capture_record.parse_record(json.dumps(old)) == make_record(plain)
    assert capture_record.check_drift(host, make_record(plain), V32).startswith(
        "backup.extra_sources changed since the capture")
