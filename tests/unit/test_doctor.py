"""roles.features.doctor, pure parts: error explanations, forced-command and key-line parsing, every
check as a table of facts in, findings out, the report parsers and the output format.
(The checks against real hosts are in tests/integration/test_doctor.py.)"""

from __future__ import annotations

import base64
import dataclasses
import shutil

import pytest

from roles.config import gate as gate_scripts
from roles.config import rootkey, rsyncd
from roles.core import hardened
from roles.core import rsync as rsync_model
from roles.core.outcome import Level
from roles.core.spec import HostSpec
from roles.features import doctor
from roles.features.doctor import DestinationFacts, check_destination, gather_destination
from roles.inventory.schema import validate_host
from roles.local import capture_record
from roles.local.folders import Mount
from roles.remote.facts import AUTHORIZED_KEYS, FileFact, HostFacts

BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIJ1wZd8Jy0tXnlAhsnFrH1xNGcs9g6UkqBsvS6gb0EYz"
OTHER = "AAAAC3NzaC1lZDI1NTE5AAAAIENDBZxwPdjQ+zud0AkNvwKRzmA4/BM7FeBJ8CJHV8Su"
DAEMON = "/usr/local/bin/rsync --server --daemon --config=/etc/pullback/rsyncd.conf ."
OLD_DAEMON = "/usr/local/bin/rsync --server --daemon ."
SENDER = "/usr/local/bin/rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /"
DRY = "/usr/local/bin/rsync --server --sender -vnlogDtprxze.iLsfxCIvu --numeric-ids . /"
RESTRICTED = "restrict,no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty"
GOOD_RSYNCD = b"""[system]
    path = /
    read only = yes
    list = false
    uid = 0
    gid = 0
    max connections = 1
    lock file = /run/rsyncd-pullback.lock
    refuse options = delete* remove-*
"""


def make_host(**fields) -> HostSpec:
    data = {"name": "web1", "address": "192.0.2.10", "port": 2222, "admin_user": "admin",
            "backup_key": "/keys/backup", "known_hosts": "/keys/known_hosts",
            "backup": {"destination": "/backups/{name}"}, **fields}
    return validate_host(data)


def line(command: str | None = DAEMON, options: str = RESTRICTED, blob: str = BLOB) -> str:
    parts = [f'command="{command}"'] if command is not None else []
    if options:
        parts.append(options)
    prefix = ",".join(parts)
    return f"{prefix + ' ' if prefix else ''}ssh-ed25519 {blob} pullback-backup"


def facts(keys: bytes | None = None, *, effective: dict[str, str] | None = None,
          root_ssh: tuple[int, int, int] | None = (0o700, 0, 0),
          keys_mode: tuple[int, int, int] = (0o600, 0, 0), error: str = "") -> HostFacts:
    files = {}
    if keys is not None:
        files[AUTHORIZED_KEYS] = FileFact(AUTHORIZED_KEYS, keys, *keys_mode)
    return HostFacts(
        files=files, missing=frozenset(), includes={},
        dirs={"/root/.ssh": root_ssh} if root_ssh else {}, client_addr="10.0.0.5",
        openssh=(9, 2), sshd="/usr/sbin/sshd",
        effective=effective if effective is not None else {
            "permitrootlogin": "forced-commands-only", "pubkeyauthentication": "yes",
            "authorizedkeysfile": ".ssh/authorized_keys .ssh/authorized_keys2",
            "strictmodes": "yes"},
        sshd_T_error=error, service=None)


def levels(findings: list[doctor.Finding]) -> list[tuple[str, str]]:
    return [(f.level, f.check) for f in findings]


def errors(findings: list[doctor.Finding]) -> list[doctor.Finding]:
    return [f for f in findings if f.level is Level.ERROR]


# --- explain_rsync_error ----------------------------------------------------------------------

EXPLAIN = {
    "protocol version mismatch -- is your shell clean?": ["host::MODULE", "startup file"],
    "protocol version mismatch - is your shell clean?": ["daemon forced command"],
    "Invalid file index: -1610612736 (count=9406) [sender]": ["dry-run", "capture-command"],
    "rsync: connection unexpectedly closed (195901 bytes received so far) [receiver]":
        ["remote side ended"],
    "rsync error: error in rsync protocol data stream (code 12) at io.c(463)":
        ["code 12", "rsync exit code 12"],
    "@ERROR: Unknown module 'system'": ["setup-remote"],
    "@ERROR: access denied to system from unknown (10.88.0.1)": ["hosts allow"],
    "rsync error: some files/attrs were not transferred (code 23) at main.c(1338)":
        ["rsync exit code 23", "uid 0"],
    "rsync warning: some files vanished before they could be transferred (code 24)":
        ["rsync exit code 24", "vanished"],
    "rsync error: unexplained error (code 255) at io.c(231)": ["rsync exit code 255", "ssh"],
    "2": ["rsync exit code 2", "build-rsync"],
    "exit code 12": ["rsync exit code 12"],
    "Host key verification failed.": ["known_hosts"],
    "root@host: Permission denied (publickey).": ["PermitRootLogin"],
    "sh: 1: /usr/local/bin/rsync: not found": ["build-rsync"],
    "rsync: server sent \"hello\" rather than greeting": ["startup file of root"],
    "pullback gate: refused: rsync --server --daemon .": ["capture-command"],
    "rsync: The server is configured to refuse --remove-source-files":
        ["refuse options", "backup.options"],
    "@ERROR: Unknown module 'full'": ["hosts allow", "/etc/pullback/rsyncd.conf"],
}


@pytest.mark.parametrize("text", list(EXPLAIN))
def test_explain_rsync_error_names_cause_and_fix(text):
    explanation = doctor.explain_rsync_error(text)
    for needle in EXPLAIN[text]:
        assert needle in explanation, (text, explanation)


def test_explain_the_seeds_whole_output_lists_each_signature_once():
    seed = """Invalid file index: -1610612736 (count=9406) [sender]
rsync error: protocol incompatibility (code 2) at sender.c(169) [sender=2.6.8]
rsync: writefd_unbuffered failed to write 4092 bytes [generator]:
Broken pipe (32)rsync: connection unexpectedly closed (195901 bytes received so far) [receiver]
rsync error: error in rsync protocol data stream (code 12) at io.c(463) [receiver=2.6.8]
rsync error: error in rsync protocol data stream (code 12) at io.c(1119) [generator=2.6.8]"""
    text = doctor.explain_rsync_error(seed)
    headers = [ln for ln in text.splitlines() if not ln.startswith(" ")]
    assert headers == ["Invalid file index:", "connection unexpectedly closed:",
                       "error in rsync protocol data stream:", "broken pipe:",
                       "rsync exit code 2:", "rsync exit code 12:"]


def test_explain_unknown_text_points_at_doctor():
    assert "invoke doctor" in doctor.explain_rsync_error("something else entirely")


def test_signature_prefers_the_root_cause():
    text = "Host key verification failed.\nrsync: did not see server greeting\n"
    assert doctor.signature(text) == "Host key verification failed"


# --- forced command and key line parsing ---------------------------------------------------------


@pytest.mark.parametrize(("text", "daemon", "sender", "flags", "dry"), [
    (DAEMON, True, False, "", False),
    (SENDER, False, True, "vlogDtprxz", False),
    (DRY, False, True, "vnlogDtprxz", True),
    # 2.6.9 sends no capability string; with -n the n still joins the cluster
    ("rsync --server --sender -vnlogDtprxz --numeric-ids . /", False, True, "vnlogDtprxz", True),
    # letters after "e" are capabilities, not options: no dry run here
    ("rsync --server --sender -vlogDtprxze.iLsfnxCIvu . /", False, True, "vlogDtprxz", False),
    ("rsync --server --sender --dry-run -vlogDtprxz . /", False, True, "vlogDtprxz", True),
    # an option's argument is not flags either: rsync reads -T's "/tmp/nope" as a folder
    ("rsync --server --sender -logDtprz -T/tmp/nope . /", False, True, "logDtprz", False),
    ("rsync --server --sender -logDtprz -B1024n . /", False, True, "logDtprz", False),
])
def test_parse_forced_command(text, daemon, sender, flags, dry):
    forced = rootkey.parse_forced_command(text)
    assert (forced.daemon, forced.sender, forced.short_flags, forced.dry_run) == \
        (daemon, sender, flags, dry)


def test_without_dry_run_drops_only_the_n():
    forced = rootkey.parse_forced_command(DRY)
    assert " ".join(forced.without_dry_run()) == SENDER


def test_without_dry_run_keeps_an_n_that_is_an_argument_and_drops_a_bare_n():
    forced = rootkey.parse_forced_command("rsync --server --sender -vn -n -T/tmp/n . /")
    assert forced.without_dry_run() == ("rsync", "--server", "--sender", "-v", "-T/tmp/n",
                                        ".", "/")


def test_daemon_config_option():
    assert rootkey.parse_forced_command(OLD_DAEMON).config == "/etc/rsyncd.conf"
    assert rootkey.parse_forced_command(DAEMON).config == "/etc/pullback/rsyncd.conf"
    assert rootkey.parse_forced_command(
        "rsync --server --daemon --config=/etc/pb.conf .").config == "/etc/pb.conf"


def test_find_key_line_takes_the_first_of_several_and_counts():
    content = "\n".join([
        "# a comment with " + BLOB,
        line(command="/bin/false", blob=OTHER),
        line(),
        line(command="/bin/sh"),
    ]).encode() + b"\n"
    key = rootkey.find_key_line(content, BLOB)
    assert key is not None
    assert (key.command, key.count, key.missing_restrictions, key.from_) == (DAEMON, 2, [], None)
    assert key.forced.daemon


@pytest.mark.parametrize(("options", "missing"), [
    (RESTRICTED, []),
    ("restrict", []),
    ("no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty", []),
    ("no-pty", ["no-port-forwarding", "no-agent-forwarding", "no-X11-forwarding"]),
    ("", ["no-port-forwarding", "no-agent-forwarding", "no-X11-forwarding", "no-pty"]),
])
def test_key_line_restrictions(options, missing):
    key = rootkey.find_key_line(line(options=options).encode(), BLOB)
    assert key.missing_restrictions == missing


def test_find_key_line_absent_and_unparseable():
    assert rootkey.find_key_line(None, BLOB) is None
    assert rootkey.find_key_line(line(blob=OTHER).encode(), BLOB) is None
    broken = rootkey.find_key_line(f'command="unbalanced ssh-ed25519 {BLOB} x'.encode(), BLOB)
    assert broken is not None and broken.problem


@pytest.mark.parametrize(("patterns", "addr", "allowed"), [
    ("10.0.0.5", "10.0.0.5", True),
    ("10.0.0.*", "10.0.0.5", True),
    ("10.0.0.0/24", "10.0.0.5", True),
    ("10.0.1.0/24,192.0.2.1", "10.0.0.5", False),
    ("10.0.0.*,!10.0.0.5", "10.0.0.5", False),
    ("backup.example.net", "10.0.0.5", False),
])
def test_from_allows(patterns, addr, allowed):
    assert rootkey.from_allows(patterns, addr) is allowed


def test_same_command_ignores_program_path_and_trailing_slash():
    sent = ("rsync", "--server", "--sender", "-vlogDtprxze.iLsfxCIvu", ".", "/srv/data/")
    assert doctor.same_command(("/usr/local/bin/rsync", *sent[1:-1], "/srv/data"), sent)
    assert not doctor.same_command(("/x/rsync", "--server", "--sender", "-vlHogDtprxz", ".",
                                    "/srv/data/"), sent)


# --- the remote reports -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_root_report_after_junk_from_a_dirty_login():
    text = "\n".join([
        "hello from .bashrc", "PULLBACK_DOCTOR", "PROGRAM /usr/bin/rsync", "BIN /usr/bin/rsync",
        "BINVERSION rsync  version 3.2.7  protocol version 32", "FILE /etc/pb.conf",
        b64(GOOD_RSYNCD), "MISSING /usr/local/libexec/pullback/gate", "SHELL /bin/bash",
        f"ROOTOUT {b64(b'junk')}", "ROOTERR ", "PROBE 0 /etc/bash.bashrc",
        "PROBE 4 /root/.bashrc", "END"])
    root = doctor.parse_root_report(text)
    assert root.program == root.binary == "/usr/bin/rsync"
    assert root.version_line.endswith("protocol version 32")
    assert root.files == {"/etc/pb.conf": GOOD_RSYNCD}
    assert root.missing == {"/usr/local/libexec/pullback/gate"}
    assert (root.root_stdout, root.root_stderr) == (b"junk", b"")
    assert root.probes == ((0, "/etc/bash.bashrc"), (4, "/root/.bashrc"))


def test_parse_root_report_missing_program_and_incomplete_output():
    root = doctor.parse_root_report("PULLBACK_DOCTOR\nNOPROGRAM\nSHELL /bin/sh\nEND")
    assert root.program is None and root.binary is None
    with pytest.raises(ValueError):
        doctor.parse_root_report("PULLBACK_DOCTOR\nSHELL /bin/sh\n")
    with pytest.raises(ValueError):
        doctor.parse_root_report("no marker\nEND")


def test_root_script_quotes_everything_it_is_given():
    script = doctor.root_script("/opt/my rsync", "/opt/my rsync", ["/etc/a b.conf"], "10.0.0.5")
    assert "'/opt/my rsync'" in script and "'/etc/a b.conf'" in script
    assert "SSH_CLIENT='10.0.0.5 0 22'" in script
    # root's shell must not inherit sudo's environment (SHLVL would stop bash reading
    # ~/.bashrc, hiding exactly the output we look for)
    assert "env -i HOME=/root" in script


# --- clean shell -------------------------------------------------------------------------------


def test_clean_shell_shows_bytes_and_names_the_file():
    findings = doctor.check_clean_shell("admin", "/bin/bash", b"hello\n", b"", [
        (0, "/etc/bash.bashrc"), (6, "/home/admin/.bashrc")], root=False)
    (finding,) = findings
    assert finding.level is Level.ERROR
    assert "6 bytes on stdout: b'hello\\n'" in finding.what
    assert "/home/admin/.bashrc (6 bytes)" in finding.what
    assert "/etc/bash.bashrc" not in finding.what
    assert "is your shell clean?" in finding.why


def test_clean_shell_long_output_is_cut_and_stderr_only_warns():
    findings = doctor.check_clean_shell("root", "/bin/bash", b"x" * 500, b"oops\n", [],
                                        root=True)
    assert levels(findings) == [("error", "clean shell"), ("warn", "clean shell")]
    assert "(first 200 of 500)" in findings[0].what
    assert "not /etc/motd" in findings[0].what
    found = doctor.check_clean_shell("root", "/bin/sh", b"", b"", [], root=True)
    assert found[0].level is Level.OK


# --- sshd and key files -------------------------------------------------------------------------


def test_sshd_all_good():
    assert levels(doctor.check_sshd(facts())) == [("ok", "sshd")] * 3


@pytest.mark.parametrize(("setting", "value", "needle"), [
    ("permitrootlogin", "no", "refuses every root login"),
    ("permitrootlogin", "without-password", "full root shell"),
    ("pubkeyauthentication", "no", "accepts no key"),
    ("authorizedkeysfile", "/etc/ssh/keys/%u", "never reads"),
])
def test_sshd_errors(setting, value, needle):
    f = facts()
    f = dataclasses.replace(f, effective={**f.effective, setting: value})
    (bad,) = errors(doctor.check_sshd(f))
    assert needle in bad.why


@pytest.mark.parametrize("value", [".ssh/authorized_keys", "%h/.ssh/authorized_keys",
                                   "/etc/x /root/.ssh/authorized_keys", "/%u/.ssh/authorized_keys"])
def test_authorized_keys_file_values_that_include_roots_file(value):
    f = facts()
    f = dataclasses.replace(f, effective={**f.effective, "authorizedkeysfile": value})
    assert not errors(doctor.check_sshd(f))


def test_sshd_T_failure_is_one_error():
    (only,) = doctor.check_sshd(facts(error="line 3: Bad configuration option: Foo"))
    assert only.level is Level.ERROR and "Bad configuration option" in only.what


@pytest.mark.parametrize(("root_ssh", "keys_mode", "expected"), [
    ((0o700, 0, 0), (0o600, 0, 0), ["ok", "ok"]),
    ((0o755, 0, 0), (0o644, 0, 0), ["warn", "warn"]),        # sshd accepts, verify does not
    ((0o777, 0, 0), (0o600, 0, 0), ["error", "ok"]),         # StrictModes refuses
    ((0o700, 0, 0), (0o600, 1000, 0), ["ok", "error"]),
    (None, (0o600, 0, 0), ["error", "ok"]),
])
def test_key_files(root_ssh, keys_mode, expected):
    f = facts(line().encode(), root_ssh=root_ssh, keys_mode=keys_mode)
    assert [x.level for x in doctor.check_key_files(f)] == expected


# --- the key line -----------------------------------------------------------------------------


def test_key_line_ok_names_command_and_options():
    key = rootkey.find_key_line(line().encode(), BLOB)
    (only,) = doctor.check_key_line(key, make_host(**{"from": "any"}), facts())
    assert only.level is Level.OK and DAEMON in only.what and "restrict" in only.what


def test_key_line_from_defaults_to_this_clients_address():
    """No `from` in the inventory: the line must carry from= the address the server sees."""
    good = rootkey.find_key_line(line(options=RESTRICTED + ',from="10.0.0.5"').encode(), BLOB)
    (only,) = doctor.check_key_line(good, make_host(), facts())
    assert only.level is Level.OK and 'from="10.0.0.5"' in only.what
    bare = rootkey.find_key_line(line().encode(), BLOB)
    (finding,) = doctor.check_key_line(bare, make_host(), facts())
    assert finding.level is Level.WARN
    assert finding.what == ("the line has from=None, wanted '10.0.0.5' (the inventory has no "
                            "`from`: the backup host's address 10.0.0.5)")
    assert "from anywhere" in finding.why
    # `from: any` wants no from= at all.
    (extra,) = doctor.check_key_line(good, make_host(**{"from": "any"}), facts())
    assert extra.level is Level.WARN and "wanted None" in extra.what


@pytest.mark.parametrize(("key_text", "host_fields", "needle"), [
    (None, {}, "is not in /root/.ssh/authorized_keys"),
    (line(command=None), {}, "has no command="),
    (line(options="no-pty"), {}, "neither `restrict`"),
    (line(options=RESTRICTED + ',from="192.0.2.0/24"'), {}, "does not match this client"),
])
def test_key_line_errors(key_text, host_fields, needle):
    key = rootkey.find_key_line(key_text.encode(), BLOB) if key_text else None
    bad = errors(doctor.check_key_line(key, make_host(**host_fields), facts()))
    assert any(needle in f.what for f in bad), bad


def test_key_line_from_differs_from_inventory_is_a_warning():
    key = rootkey.find_key_line(line(options=RESTRICTED + ',from="10.0.0.*"').encode(), BLOB)
    findings = doctor.check_key_line(key, make_host(**{"from": "10.0.0.5"}), facts())
    assert levels(findings) == [("warn", "key line")]


# --- the forced command: the signatures ---------------------------------------------------------

OK_ROOT = doctor.RootFacts(program="/usr/local/bin/rsync", binary="/usr/local/bin/rsync",
                           version_line="rsync  version 3.2.7  protocol version 31")
MISSING_ROOT = doctor.RootFacts(program=None, binary=None)


def forced_findings(command: str, *, mode: str = "daemon", root=OK_ROOT,
                    rsyncd_text: bytes | None = GOOD_RSYNCD, cap=None, found=None, **fields):
    host = make_host(forced_command=mode, **fields)
    forced = rootkey.parse_forced_command(command)
    if rsyncd_text is not None and forced.config != "/etc/rsyncd.conf":
        root = dataclasses.replace(root, files={**root.files, forced.config: rsyncd_text})
    return doctor.check_forced_command(host, forced, root, rsyncd_text, cap, found=found)


def test_forced_daemon_mode_healthy():
    assert levels(forced_findings(DAEMON)) == [("ok", "forced command"), ("ok", "rsyncd.conf")]


def test_card_order_the_daemon_runs_another_rsync_than_the_installed_build():
    """setup-remote before build-rsync: the key still runs /usr/bin/rsync once the pinned
    build exists. verify fails that host; doctor must too."""
    old = DAEMON.replace("/usr/local/bin/rsync", "/usr/bin/rsync")
    assert old != DAEMON
    both = {"/usr/local/bin/rsync": "rsync  version 3.2.7", "/usr/bin/rsync": "rsync 3.2.7"}
    (bad,) = errors(forced_findings(old, cap=None, found=both))
    assert bad.what == ("the forced command runs /usr/bin/rsync, not the pinned build "
                        "/usr/local/bin/rsync")
    assert "build-rsync" in bad.fix
    # Before the build exists, the host's rsync is what the key may run (a warning elsewhere).
    assert errors(forced_findings(old, found={"/usr/bin/rsync": "rsync 3.2.7"})) == []
    assert errors(forced_findings(DAEMON, found=both)) == []


def test_signature_daemon_command_with_captured_inventory():
    (bad,) = errors(forced_findings(DAEMON, mode="captured"))
    assert "protocol version mismatch -- is your shell clean?" in bad.why
    assert "forced_command: daemon" in bad.fix and "capture-command" in bad.fix


def test_signature_sender_command_with_daemon_inventory():
    (bad,) = errors(forced_findings(SENDER))
    assert "not a daemon" in bad.what and "setup-remote" in bad.fix


def test_signature_dry_run_flag():
    bad = errors(forced_findings(DRY, mode="captured"))
    assert [f for f in bad if "dry-run flag" in f.what and "capture-command" in f.fix]


@pytest.mark.parametrize(("command", "fix"), [
    (DAEMON, "build-rsync"),                              # the pinned build is not there yet
    ("/opt/old/rsync --server --daemon .", "setup-remote"),
])
def test_signature_missing_rsync(command, fix):
    bad = errors(forced_findings(command, root=MISSING_ROOT))
    (missing,) = [f for f in bad if "does not exist" in f.what]
    assert fix in missing.fix


@pytest.mark.parametrize(("text", "needle"), [
    (GOOD_RSYNCD.replace(b"    uid = 0\n", b""), "uid is not set"),
    (GOOD_RSYNCD.replace(b"uid = 0", b"uid = nobody"), "uid is 'nobody'"),
    (GOOD_RSYNCD.replace(b"[system]", b"[other]"), "no [system] module"),
    (None, "does not exist"),
])
def test_signature_rsyncd(text, needle):
    bad = errors(forced_findings(DAEMON, rsyncd_text=text))
    assert any(needle in f.what and "setup-remote" in f.fix for f in bad), bad


def test_rsyncd_minor_problems_warn():
    text = GOOD_RSYNCD.replace(b"    list = false\n", b"")
    assert levels(forced_findings(DAEMON, rsyncd_text=text)) == [("warn", "rsyncd.conf")]


def test_rsyncd_config_comes_from_the_root_report():
    root = dataclasses.replace(OK_ROOT, files={"/etc/pullback/rsyncd.conf": GOOD_RSYNCD})
    assert not errors(forced_findings(DAEMON, root=root, rsyncd_text=None))


@pytest.mark.parametrize(("command", "needle"), [
    (OLD_DAEMON, "any rsync daemon on the host"),          # the shared /etc/rsyncd.conf
    ("/usr/local/bin/rsync --server --daemon --config=/etc/pb.conf .", "cannot tell"),
])
def test_signature_daemon_not_on_pullbacks_own_file(command, needle):
    bad = errors(forced_findings(command))
    (found,) = [f for f in bad if "not pullback's own" in f.what]
    assert needle in found.why and "setup-remote" in found.fix


def test_signature_module_without_refusals():
    text = GOOD_RSYNCD.replace(b"    refuse options = delete* remove-*\n", b"")
    (bad,) = errors(forced_findings(DAEMON, rsyncd_text=text))
    assert "refuse options lacks delete* remove-*" in bad.what


LEGACY = rsyncd.render_legacy_module("system")


def files_facts(files: dict[str, tuple[bytes, int, int, int]],
                dirs: dict[str, tuple[int, int, int]]) -> HostFacts:
    return HostFacts(files={path: FileFact(path, *value) for path, value in files.items()},
                     missing=frozenset(), includes={}, dirs=dirs, client_addr="192.0.2.1",
                     openssh=(9, 2), sshd="/usr/sbin/sshd", effective={}, sshd_T_error="",
                     service=None)


OWN = "/etc/pullback/rsyncd.conf"
FOLDER = {"/etc/pullback": (0o700, 0, 0)}


@pytest.mark.parametrize(("mode", "files", "dirs", "expected"), [
    ("daemon", {OWN: (GOOD_RSYNCD, 0o600, 0, 0)}, FOLDER, []),
    ("daemon", {OWN: (GOOD_RSYNCD, 0o600, 0, 0),
                "/etc/rsyncd.conf": (b"[www]\n path = /srv\n", 0o644, 0, 0)}, FOLDER, []),
    ("daemon", {OWN: (GOOD_RSYNCD, 0o644, 0, 0)}, FOLDER, [("error", "not 0600 root:root")]),
    ("daemon", {OWN: (GOOD_RSYNCD, 0o600, 1000, 0)}, FOLDER, [("error", "owner 1000:0")]),
    ("daemon", {OWN: (GOOD_RSYNCD, 0o600, 0, 0)}, {"/etc/pullback": (0o777, 0, 0)},
     [("error", "/etc/pullback is mode 0777")]),
    ("daemon", {OWN: (GOOD_RSYNCD, 0o600, 0, 0)}, {"/etc/pullback": (0o755, 0, 0)}, []),
    ("daemon", {"/etc/rsyncd.conf": (b"uid = 0\n\n" + LEGACY, 0o644, 0, 0)}, {},
     [("error", "still holds pullback's old module [system]")]),
    ("captured", {"/etc/rsyncd.conf": (LEGACY, 0o644, 0, 0)}, {},
     [("error", "not migrated")]),
    ("captured", {OWN: (GOOD_RSYNCD, 0o600, 0, 0)}, FOLDER, [("warn", "left from daemon mode")]),
])
def test_check_rsyncd_files(mode, files, dirs, expected):
    found = doctor.check_rsyncd_files(make_host(forced_command=mode), files_facts(files, dirs))
    assert [f.level for f in found] == [level for level, _ in expected]
    for finding, (_, needle) in zip(found, expected, strict=True):
        assert needle in finding.what and "setup-remote" in finding.fix
        assert finding.check == "rsyncd.conf"


def test_signature_hand_captured_command_drifted():
    sent = ("rsync", "--server", "--sender", "-vlHogDtprxze.iLsfxCIvu", "--numeric-ids", ".", "/")
    cap = doctor.Capture(sent=sent)
    (bad,) = errors(forced_findings(SENDER, mode="captured", cap=cap))
    assert "drifted since capture" in bad.what and "-vlHogDtprxz" in bad.what
    same = doctor.Capture(sent=tuple(["rsync", *SENDER.split()[1:]]))
    assert not errors(forced_findings(SENDER, mode="captured", cap=same))
    # a dry-run command is reported as such, not as drift too
    assert len(errors(forced_findings(DRY, mode="captured", cap=same))) == 1


# --- captured mode through capture-command's gate ------------------------------------------------

LOCAL = "rsync  version 3.5.0  protocol version 32"
REMOTE = "rsync  version 3.2.7  protocol version 32"
SENT = "rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /"


def record_for(host: HostSpec) -> capture_record.CaptureRecord:
    words = tuple(SENT.split())
    dry = rsync_model.dry_run_variant(words)
    return capture_record.CaptureRecord(
        host=host.name, captured_at="2026-01-01T00:00:00Z", source=host.backup.source,
        options=host.backup.options, exclude=host.backup.exclude, sent=SENT,
        sent_dry_run=" ".join(dry), remote_rsync="/usr/bin/rsync", remote_version=REMOTE,
        local_rsync="/usr/bin/rsync", local_version=LOCAL,
        fingerprint=rsync_model.fingerprint(host.backup.options, host.backup.exclude,
                                        host.backup.source, LOCAL, REMOTE))


def gate_findings(host: HostSpec, record, *, gate: bytes | None = None, version: str = REMOTE,
                  local: str = LOCAL, sent: str = SENT, problem: str = ""):
    content = gate if gate is not None else (gate_scripts.gate_file(record).content if record
                                             else b"")
    root = doctor.RootFacts(program=hardened.GATE, binary="/usr/bin/rsync", version_line=version,
                            files={hardened.GATE: content})
    cap = doctor.Capture(record=record, problem=problem, sent=tuple(sent.split()),
                         local_version=local)
    return doctor.check_forced_command(host, rootkey.parse_forced_command(hardened.GATE), root,
                                       None, cap)


def test_gate_healthy():
    host = make_host(forced_command="captured")
    assert levels(gate_findings(host, record_for(host))) == [("ok", "forced command")]


def test_gate_options_drifted_since_capture():
    host = make_host(forced_command="captured")
    record = record_for(host)
    changed = make_host(forced_command="captured",
                        backup={"destination": "/backups/{name}",
                                "options": ("-avzHx", "--numeric-ids"),
                                "allow_inexact": True})
    (bad,) = errors(gate_findings(changed, record,
                                  sent=SENT.replace("-vlogD", "-vlHogD")))
    assert "drifted since capture: backup.options" in bad.what
    assert "-vlHogD" in bad.what and "capture-command" in bad.fix


def test_gate_local_rsync_changed_is_drift():
    host = make_host(forced_command="captured")
    bad = errors(gate_findings(host, record_for(host), local="rsync  version 3.4.1  "
                                                           "protocol version 32"))
    assert any("the local rsync" in f.what for f in bad)


def test_gate_edited_by_hand_and_holding_a_dry_run():
    host = make_host(forced_command="captured")
    record = record_for(host)
    edited = gate_scripts.gate_file(record).content.replace(b"exec /usr/bin/rsync --server "
                                                       b"--sender -vlogD", b"exec /usr/bin/rsync "
                                                       b"--server --sender -vnlogD", 1)
    whats = [f.what for f in errors(gate_findings(host, record, gate=edited))]
    assert any("real command holds a dry-run flag" in w for w in whats)
    assert any("is not the gate of the local capture record" in w for w in whats)


def test_gate_remote_rsync_changed_and_no_record():
    host = make_host(forced_command="captured")
    record = record_for(host)
    (bad,) = errors(gate_findings(host, record, version="rsync  version 3.4.1  protocol 32"))
    assert "captured with" in bad.what
    (bad,) = errors(gate_findings(host, None))
    assert "no capture record" in bad.what
    (bad,) = errors(gate_findings(host, None, problem="the capture record X is damaged"))
    assert "damaged" in bad.what


def test_gate_with_daemon_inventory():
    bad = errors(gate_findings(make_host(), None))
    assert any("not a daemon" in f.what for f in bad)


# --- rsync on both ends -------------------------------------------------------------------------


def end(version: str | None, protocol: int | None, note: str = "", path: str = "/usr/bin/rsync"):
    return doctor.RsyncEnd(path, version, protocol, note)


# The lab's pin: 3.2.7, which a client may run only with rsync.allow_vulnerable (a warning).
LAB_PIN = {"version": "3.2.7", "allow_vulnerable": True}


@pytest.mark.parametrize(("local", "remote", "expected"), [
    (end("3.2.7", 31), end("3.2.7", 31), ["ok", "ok", "warn", "ok"]),
    (end("3.5.0", 32), end("3.2.7", 32), ["warn", "ok", "warn", "ok"]),
    (end("3.2.7", 31), end("2.6.9", 29), ["ok", "warn", "warn", "warn", "warn", "warn"]),
    (end("3.2.7", 31), end("2.5.7", 19), ["ok", "warn", "warn", "warn", "error"]),
    (end("3.2.7", 31), end(None, None, "does not exist on the host"), ["ok", "error", "warn"]),
])
def test_check_rsync(local, remote, expected):
    findings = doctor.check_rsync(make_host(rsync=LAB_PIN), local, remote)
    assert [f.level for f in findings] == expected


@pytest.mark.parametrize(("version", "allowed", "level"), [
    ("3.2.7", False, "error"), ("2.6.9", False, "error"), ("3.4.0", False, "error"),
    ("3.2.7", True, "warn"), ("2.6.9", True, "warn"),
    ("3.4.1", False, None), ("3.5.1", False, None), ("3.5.1", True, None),
])
def test_the_clients_exposure(version, allowed, level):
    """An error when backup refuses the local rsync, a warning when the switch allows it."""
    host = make_host(rsync={"version": version, "allow_vulnerable": allowed})
    found = [f for f in doctor.check_rsync(host, end(version, 31), end(version, 31))
             if f.check == "client rsync"]
    assert [f.level for f in found] == ([level] if level else [])
    if level:
        (finding,) = found
        assert finding.what.startswith(f"the local rsync /usr/bin/rsync is rsync {version}, "
                                       "older than 3.4.1: it lacks the fixes for "
                                       "CVE-2024-12084..12088")
        assert "build-rsync" in finding.fix
        assert ("allow_vulnerable: true knowingly" in finding.fix) == (level == "error")
        assert doctor.client_refused(host, end(version, 31)) == (level == "error")


def test_different_releases_on_the_two_ends_are_named():
    findings = doctor.check_rsync(make_host(rsync={"version": "2.6.9"}), end("2.6.9", 29),
                                  end("3.2.7", 31))
    assert [f.what for f in findings if f.level is Level.WARN] == [
        "remote /usr/bin/rsync: rsync 3.2.7, protocol 31; not the inventory's rsync.version "
        "2.6.9",
        "the ends run different rsync releases: local 2.6.9, remote 3.2.7",
        "protocol 29 (rsync 2.6.9 on an end): the copy has no ACLs and no xattrs (file "
        "capabilities such as ping's cap_net_raw, SELinux labels) and whole-second mtimes",
        "protocols 29 and 31: the pull speaks protocol 29",
    ]


def test_old_protocol_mentions_the_seeds_fallback():
    findings = doctor.check_rsync(make_host(), end("3.2.7", 31), end("2.6.9", 29))
    assert "--protocol=29" in findings[-1].why


def test_version_end_parses_or_explains():
    assert doctor.version_end("/x", "rsync  version 3.2.7  protocol version 32\nCopyright") == \
        doctor.RsyncEnd("/x", "3.2.7", 32, "", "rsync  version 3.2.7  protocol version 32")
    assert doctor.version_end("/x", "sh: rsync: not found").version is None


# --- local helpers (no network) ------------------------------------------------------------------


def test_pull_argv_uses_the_backups_options_and_a_small_path():
    host = make_host(backup={"destination": "/backups/{name}", "max_delete": 5})
    argv = doctor.pull_argv(host, "/usr/bin/rsync", "/tmp/x", single_colon=False)
    assert argv[0] == "/usr/bin/rsync" and argv[1] == "-e"
    assert "-n" in argv and "--max-delete=5" in argv and "--progress" not in argv
    assert argv[-2:] == ["root@192.0.2.10::system/etc/hostname", "/tmp/x/"]
    single = doctor.pull_argv(host, "/usr/bin/rsync", "/tmp/x", single_colon=True)
    assert single[-2] == "root@192.0.2.10:/etc/hostname"


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs a local rsync")
def test_simulate_sent_command_is_what_rsync_sends():
    rsync = shutil.which("rsync")
    sent = doctor.simulate_sent_command(rsync, make_host())
    assert sent[:3] == ("rsync", "--server", "--sender")
    assert sent[-2:] == (".", "/") and "--numeric-ids" in sent
    with_h = doctor.simulate_sent_command(rsync, make_host(), ["-avzHx", "--numeric-ids"])
    assert "H" in rootkey.parse_forced_command(" ".join(with_h)).short_flags
    extra = make_host(backup={"destination": "/backups/{name}", "extra_sources": ("/home",)})
    sent = doctor.simulate_sent_command(rsync, extra)
    assert sent[-3:] == (".", "/./", "/./home/")
    assert "R" in rootkey.parse_forced_command(" ".join(sent)).short_flags


def test_known_host_label():
    from roles.remote.hostkeys import known_hosts_name

    for host, label in ((make_host(), "[192.0.2.10]:2222"), (make_host(port=22), "192.0.2.10")):
        assert known_hosts_name(host.address, host.port) == label


# --- output ---------------------------------------------------------------------------------------


def test_format_report_three_lines_per_problem():
    report = doctor.Report("web1", "192.0.2.10:2222", [
        doctor.ok("host key", "fine"),
        doctor.error("clean shell", "printed b'hello\\n'", "breaks rsync", "remove it"),
        doctor.warn("rsync", "old", "why", "build"),
    ], seconds=0.5)
    text = doctor.format_report(report)
    lines = text.splitlines()
    assert lines[0] == "web1 (192.0.2.10:2222)"
    assert lines[1].split() == ["ok", "host", "key", "fine"]
    assert lines[2].startswith("  error  clean shell")
    assert lines[3].strip() == "why: breaks rsync" and lines[4].strip() == "fix: remove it"
    assert lines[3].index("why") == lines[2].index("printed")
    assert lines[-1] == "  => 1 error, 1 warning (0.5 s)"


# --- the local destination ---------------------------------------------------------------------

SAFE = Mount("/srv/backups", frozenset({"rw", "nosuid", "nodev"}), "ext4")
DEST_CASES = {
    "private, nosuid,nodev": (
        DestinationFacts("/srv/backups/web1", None, 0o700, "new", SAFE),
        [("ok", "/srv/backups/web1: private, on /srv/backups (nosuid,nodev)")]),
    "an unsafe folder on the way is an error": (
        DestinationFacts("/srv/x/web1", "/srv/x is writable by others (mode 0777): ...",
                         None, None, SAFE),
        [("error", "/srv/x is writable by others (mode 0777): ...")]),
    "0755 and the old layout": (
        DestinationFacts("/srv/backups/web1", None, 0o755, "old", SAFE),
        [("warn", "/srv/backups/web1 has mode 0755"),
         ("warn", "/srv/backups/web1 is in the old mirror layout (the copy's top level "
                  "directly in it)")]),
    "no nosuid, no nodev": (
        DestinationFacts("/var/backups/web1", None, 0o700, "new",
                         Mount("/", frozenset({"rw"}), "ext4")),
        [("warn", "/ (holding /var/backups/web1) is mounted without nosuid and nodev")]),
    "nodev only missing": (
        DestinationFacts("/b/web1", None, None, None,
                         Mount("/b", frozenset({"rw", "nosuid"}), "xfs")),
        [("warn", "/b (holding /b/web1) is mounted without nodev")]),
}


@pytest.mark.parametrize("facts,expected", DEST_CASES.values(), ids=DEST_CASES.keys())
def test_check_destination(facts, expected):
    findings = check_destination(facts)
    assert [(f.level, f.what) for f in findings] == expected
    assert all(f.fix for f in findings if f.level is not Level.OK)


def test_gather_destination_reads_the_layout_and_the_mount(tmp_path):
    host = make_host(backup={"destination": str(tmp_path / "{name}"), "snapshots": 0})
    (tmp_path / "web1" / "etc").mkdir(parents=True)
    (tmp_path / "web1").chmod(0o755)
    mountinfo = f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:2 / {tmp_path} rw,nosuid - ext4 x rw\n"
    facts = gather_destination(host, mountinfo)
    assert facts == DestinationFacts(str(tmp_path / "web1"), None, 0o755, "old",
                                     Mount(str(tmp_path), frozenset({"rw", "nosuid"}), "ext4"))


# --- mounts a -x pull skips -----------------------------------------------------------------

SERVER_MOUNTS = r"""22 1 8:1 / / rw - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw - proc proc rw
29 22 0:26 / /run rw - tmpfs tmpfs rw
31 22 8:2 / /home rw - ext4 /dev/sda2 rw
33 22 8:4 / /boot rw - ext4 /dev/sda4 rw
37 22 8:1 /etc/hosts /etc/hosts rw - ext4 /dev/sda1 rw
39 22 8:6 / /srv/my\040data rw - xfs /dev/sda6 rw
"""


def test_parse_root_report_reads_the_mount_table():
    text = "\n".join(["PULLBACK_DOCTOR", f"MOUNTINFO {b64(SERVER_MOUNTS.encode())}",
                      "NOTDIR /etc/hosts", r"NOTDIR /srv/a\040b", "SHELL /bin/sh", "END"])
    root = doctor.parse_root_report(text)
    assert root.mountinfo == SERVER_MOUNTS
    assert root.not_directories == {"/etc/hosts", "/srv/a b"}
    none = doctor.parse_root_report("PULLBACK_DOCTOR\nNOMOUNTINFO\nSHELL /bin/sh\nEND")
    assert none.mountinfo is None


def mount_findings(backup: dict, mountinfo: str | None = SERVER_MOUNTS):
    root = doctor.RootFacts(mountinfo=mountinfo, not_directories=frozenset({"/etc/hosts"}))
    host = make_host(backup={"destination": "/backups/{name}", **backup})
    return [(f.level, f.what, f.fix) for f in doctor.check_mounts(host, root)]


def test_check_mounts_warns_about_each_skipped_file_system_naming_the_field():
    found = mount_findings({})
    assert [(level, what) for level, what, _ in found] == [
        ("warn", "/boot (ext4) is a file system of its own: the backup skips it"),
        ("warn", "/home (ext4) is a file system of its own: the backup skips it"),
        ("warn", "/srv/my data (xfs) is a file system of its own: the backup skips it")]
    assert found[1][2] == ("pull it as well with backup.extra_sources: [/home] in the "
                           "inventory, or leave it out on purpose with backup.exclude: "
                           "[/home/*]")


def test_check_mounts_silenced_by_exclude_or_no_x():
    assert mount_findings({"exclude": ("/home/*", "/boot", "/srv/*")}) == [
        ("ok", "every file system below / with files is in the backup", "")]
    no_x = mount_findings({"options": ("-a", "--numeric-ids", "-H", "-A", "-X", "-S",
                                       "--delete"), "allow_inexact": True})
    assert no_x == [("ok", "the pull crosses file systems (no -x in backup.options)", "")]
    assert mount_findings({}, None) == [
        ("ok", "not checked: the host has no /proc/self/mountinfo", "")]


@pytest.mark.parametrize(("pasted", "kind", "task"), [
    ("Connection timed out during banner exchange\nConnection to 127.0.0.1 port 2222 timed out",
     "not-sshd", "doctor"),
    ("ssh: connect to host 192.0.2.1 port 22: Connection refused", "refused", "doctor"),
    ("Host key verification failed.", "host-key", "trust-host"),
])
def test_explain_names_the_ssh_failure_first(pasted, kind, task):
    text = doctor.explain_rsync_error(pasted)
    assert text.startswith(f"ssh failed ({kind}):"), text
    assert f"next: `invoke {task} --host H`" in text
    assert "network:" not in text  # not the general line that blamed address, port or firewall
