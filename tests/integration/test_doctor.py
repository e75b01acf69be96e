"""`invoke doctor` against a real lab host: a healthy set-up host, then each failure
signature made by hand on the same host (restored after each test), the clean-shell test,
unknown and changed host keys, and `--explain`.

The host is set up by ``setup_host`` with ``rsync.prefix: /usr`` and ``rsync.version:
3.2.7``: the lab image's Debian rsync IS 3.2.7 at /usr/bin/rsync, so the forced command
runs the rsync the inventory pins, honestly, without a 30 s build in the tests. The local
end is this machine's /usr/bin/rsync (``rsync.local_prefix: /usr``), whatever version it
is: when it is not 3.2.7, the healthy report carries exactly one warning, on that.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.config import rsyncd
from roles.config.rootkey import fingerprint, parse_public_key
from roles.core import hardened
from roles.core.outcome import Level
from roles.core.rsync import client_exposure
from roles.core.spec import HostSpec
from roles.features import capture, doctor
from roles.inventory.schema import load
from roles.remote.facts import AUTHORIZED_KEYS, PULLBACK_RSYNCD_CONF, RSYNCD_CONF
from tests.integration.conftest import Lab, invoke, lab_server

pytestmark = pytest.mark.integration

ADMIN_BASHRC = "/home/admin/.bashrc"
PINNED = {"prefix": "/usr", "local_prefix": "/usr", "version": "3.2.7"}


@dataclass(frozen=True)
class Line:
    level: str
    check: str
    what: str
    why: str = ""
    fix: str = ""


@dataclass
class Target:
    lab: lab.LabHost
    work: Path
    daemon: Path      # inventory, daemon mode (as set up)
    captured: Path    # the same host, forced_command: captured

    def host(self, inventory: Path) -> HostSpec:
        return load(inventory).hosts[self.lab.name]


def sh(host: lab.LabHost, script: str, *args: str, input: bytes | None = None) -> bytes:
    interactive = ["-i"] if input is not None else []
    return lab.engine("exec", *interactive, host.name, "sh", "-c", script, "sh", *args,
                      input=input, timeout=60).stdout


def read(host: lab.LabHost, path: str) -> bytes:
    return sh(host, 'cat "$1"', path)


def write(host: lab.LabHost, path: str, data: bytes) -> None:
    # Rewrite in place: owner and mode stay what they were.
    sh(host, 'cat > "$1"', path, input=data)


@contextmanager
def restored(host: lab.LabHost, *paths: str) -> Iterator[None]:
    """Break the host inside the block; put ``paths`` back byte for byte afterwards."""
    saved = {path: read(host, path) for path in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            write(host, path, data)


def set_forced_command(host: lab.LabHost, command: str) -> None:
    text = read(host, AUTHORIZED_KEYS).decode()
    start = text.index('command="') + len('command="')
    end = text.index('"', start)
    write(host, AUTHORIZED_KEYS, (text[:start] + command + text[end:]).encode())


def run_doctor(inventory: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[Line]]:
    result = invoke("doctor", "--inventory", str(inventory), *extra)
    return result, parse(result.stdout)


def parse(stdout: str) -> list[Line]:
    """The report's findings: `  LEVEL  CHECK  WHAT` lines, then `why:`/`fix:` lines."""
    found: list[Line] = []
    for raw in stdout.splitlines():
        text = raw.strip()
        if raw.startswith("  ") and text.split(" ", 1)[0] in tuple(Level):
            level = text.split(" ", 1)[0]
            check = raw[9:23].strip()
            found.append(Line(level, check, raw[24:]))
        elif text.startswith(("why: ", "fix: ")) and found:
            key = text[:3]
            found[-1] = Line(**{**found[-1].__dict__, key: text[5:]})
    return found


def problems(lines: list[Line]) -> list[Line]:
    return [x for x in lines if x.level != "ok"]


def the(lines: list[Line], level: str, check: str, needle: str) -> Line:
    hits = [x for x in lines if x.level == level and x.check == check and needle in x.what]
    assert len(hits) == 1, f"no single {level} {check!r} with {needle!r} in: {lines}"
    return hits[0]


def local_version() -> str:
    out = subprocess.run(["/usr/bin/rsync", "--version"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[2]


# --- the host ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with lab_server(lab_env, tmp_path_factory, "doctor", name="daemon", backups="backups",
                    defaults={"rsync": PINNED}) as server:
        assert server.outcome is not None
        assert server.outcome.warnings == (), server.outcome.warnings  # /usr/bin/rsync IS pinned
        captured = server.write("captured", forced_command="captured")
        yield Target(server.lab, server.work, server.inventory, captured)


# --- healthy ----------------------------------------------------------------------------------


def test_healthy_host_gives_a_clean_report(target: Target):
    result, lines = run_doctor(target.daemon)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {x.check for x in lines if x.level == "ok"}
    assert checks >= {"host key", "clean shell", "rsync", "sshd", "key files", "key line",
                      "forced command", "rsyncd.conf", "test pull"}
    the(lines, "ok", "test pull", "dry-run pull of root@127.0.0.1::system/etc/hostname")
    the(lines, "ok", "rsync", "remote /usr/bin/rsync: rsync 3.2.7")
    # Another local release: that end is not the pinned one, and the ends differ.
    mine = local_version()
    expected = [] if mine == "3.2.7" else [("warn", "rsync"), ("warn", "rsync")]
    if client_exposure(mine):  # allowed by rsync.allow_vulnerable (the lab's), so a warning
        expected.insert(len(expected) // 2, ("warn", "client rsync"))
    # The local destination: private; its file system may lack nosuid,nodev on a test box.
    (dest,) = [x for x in lines if x.check == "destination"]
    assert (dest.level, "private") == ("ok", dest.what.split(": ")[-1][:7]) or \
        (dest.level == "warn" and "is mounted without" in dest.what), dest
    assert [(x.level, x.check) for x in problems(lines) if x.check != "destination"] == \
        expected, lines
    assert f"{target.lab.name} (127.0.0.1:{target.lab.port})" in result.stdout
    assert "=> 0 errors" in result.stdout


# --- signature: daemon forced command, single-colon (captured-mode) client ---------------------


def test_daemon_forced_command_with_a_captured_mode_inventory(target: Target):
    result, lines = run_doctor(target.captured)
    assert result.returncode == 1
    bad = the(lines, "error", "forced command", "is an rsync daemon (--daemon)")
    assert "protocol version mismatch -- is your shell clean?" in bad.why
    assert "forced_command: daemon" in bad.fix and "capture-command" in bad.fix
    # The test pull, made the way a captured-mode backup makes it, meets the seed's error.
    pull = the(lines, "error", "test pull", "root@127.0.0.1:/etc/hostname")
    assert "protocol version mismatch -- is your shell clean?" in pull.what
    assert "host::MODULE" in pull.fix
    assert "doctor: errors on" in result.stderr


# --- signature: a forced command holding a dry-run flag -------------------------------------------


def test_forced_command_with_a_dry_run_flag(target: Target):
    sent = doctor.simulate_sent_command("/usr/bin/rsync", target.host(target.captured))
    flags = sent[3]
    assert sent[1:3] == ("--server", "--sender") and flags.startswith("-")
    dry = " ".join(("/usr/bin/rsync", *sent[1:3], "-n" + flags[1:], *sent[4:]))
    with restored(target.lab, AUTHORIZED_KEYS):
        set_forced_command(target.lab, dry)
        result, lines = run_doctor(target.captured)
    assert result.returncode == 1
    bad = the(lines, "error", "forced command", "holds a dry-run flag")
    assert "Invalid file index" in bad.why and "capture-command" in bad.fix
    # The same command without the n is what the client sends: no drift is reported on top.
    assert not [x for x in lines if "drifted" in x.what]


# --- signature: the forced command's rsync does not exist ---------------------------------------


def test_forced_command_whose_rsync_is_missing(target: Target):
    with restored(target.lab, AUTHORIZED_KEYS):
        set_forced_command(target.lab, "/usr/local/bin/rsync --server --daemon "
                                       f"--config={PULLBACK_RSYNCD_CONF} .")
        result, lines = run_doctor(target.daemon)
    assert result.returncode == 1
    bad = the(lines, "error", "forced command", "/usr/local/bin/rsync does not exist on the host")
    assert "setup-remote" in bad.fix
    the(lines, "error", "rsync", "remote rsync /usr/local/bin/rsync")
    pull = the(lines, "error", "test pull", "fails")
    # the root shell's own message (bash: "No such file or directory", dash: "not found")
    assert "rsync exit 5" in pull.what
    assert re.search(r"/usr/local/bin/rsync: (No such file or directory|not found)", pull.what)
    assert "build-rsync" in pull.fix


# --- signature: rsyncd.conf without uid = 0, or without the module ---------------------------------


def test_rsyncd_conf_without_uid_0(target: Target):
    conf = read(target.lab, PULLBACK_RSYNCD_CONF)
    assert b"    uid = 0\n" in conf
    with restored(target.lab, PULLBACK_RSYNCD_CONF):
        write(target.lab, PULLBACK_RSYNCD_CONF, conf.replace(b"    uid = 0\n", b""))
        result, lines = run_doctor(target.daemon)
    assert result.returncode == 1
    bad = the(lines, "error", "rsyncd.conf", "uid is not set")
    assert "nobody" in bad.why and "uid = 0" in bad.fix and "setup-remote" in bad.fix


def test_rsyncd_conf_without_the_module(target: Target):
    conf = read(target.lab, PULLBACK_RSYNCD_CONF)
    with restored(target.lab, PULLBACK_RSYNCD_CONF):
        write(target.lab, PULLBACK_RSYNCD_CONF, conf.replace(b"[system]", b"[other]"))
        result, lines = run_doctor(target.daemon)
    assert result.returncode == 1
    bad = the(lines, "error", "rsyncd.conf", "no [system] module")
    assert "setup-remote" in bad.fix
    pull = the(lines, "error", "test pull", "@ERROR: Unknown module 'system'")
    assert "setup-remote" in pull.fix


# --- signature: where the module lives -------------------------------------------------------------


def test_old_module_left_in_the_shared_rsyncd_conf(target: Target):
    # A host an older pullback set up: its module in /etc/rsyncd.conf, the forced command
    # reading that file.
    old = rsyncd.render_legacy_module("system")
    try:
        sh(target.lab, 'cat > "$1"', RSYNCD_CONF, input=old)
        with restored(target.lab, AUTHORIZED_KEYS):
            set_forced_command(target.lab, "/usr/bin/rsync --server --daemon .")
            result, lines = run_doctor(target.daemon)
    finally:
        sh(target.lab, f"rm -f {RSYNCD_CONF}")
    assert result.returncode == 1
    bad = the(lines, "error", "rsyncd.conf", "still holds pullback's old module [system]")
    assert "TCP 873" in bad.why and "setup-remote" in bad.fix
    reads = the(lines, "error", "rsyncd.conf", "reads /etc/rsyncd.conf, not pullback's own")
    assert "every other module" in reads.why


def test_rsyncd_conf_readable_by_others(target: Target):
    try:
        sh(target.lab, f"chmod 0644 {PULLBACK_RSYNCD_CONF}")
        result, lines = run_doctor(target.daemon)
    finally:
        sh(target.lab, f"chmod 0600 {PULLBACK_RSYNCD_CONF}")
    assert result.returncode == 1
    bad = the(lines, "error", "rsyncd.conf", "is mode 0644, owner 0:0, not 0600 root:root")
    assert "setup-remote" in bad.fix


# --- signature: options drifted since capture -------------------------------------------------------


def test_hand_captured_command_then_options_drift(target: Target, lab_env: Lab):
    sent = doctor.simulate_sent_command("/usr/bin/rsync", target.host(target.captured))
    with restored(target.lab, AUTHORIZED_KEYS):
        set_forced_command(target.lab, " ".join(("/usr/bin/rsync", *sent[1:])))
        result, lines = run_doctor(target.captured)
        assert not [x for x in lines if x.level == "error"], result.stdout
        the(lines, "ok", "test pull", "skipped")
        drifted = lab_env.inventory([target.lab], path=target.work / "drifted.yaml", defaults={
            "rsync": PINNED, "forced_command": "captured",
            "backup": {"destination": str(target.work / "backups" / "{name}"),
                       "allow_inexact": True, "options": ["-avzHx", "--numeric-ids", "--delete"]}})
        result, lines = run_doctor(drifted)
    assert result.returncode == 1
    bad = the(lines, "error", "forced command", "drifted since capture")
    assert "-vlHogDtprxz" in bad.what and "capture-command" in bad.fix


def test_capture_gate_then_options_drift(target: Target, lab_env: Lab):
    """The real captured mode: capture-command's gate and record, then changed options."""
    work = target.work / "gate"
    base = {"rsync": PINNED, "forced_command": "captured",
            "backup": {"destination": str(work / "backups" / "{name}")}}
    inventory = lab_env.inventory([target.lab], path=target.work / "gate.yaml", defaults=base)
    with restored(target.lab, AUTHORIZED_KEYS):
        outcome = capture.capture_host(target.host(inventory))
        assert outcome.error is None, outcome
        result, lines = run_doctor(inventory)
        assert result.returncode == 0, result.stdout
        the(lines, "ok", "forced command", hardened.GATE)
        the(lines, "ok", "test pull", "skipped")
        drifted = lab_env.inventory([target.lab], path=target.work / "gate-drifted.yaml",
                                    defaults={**base, "backup": {**base["backup"],
                                              "allow_inexact": True, "options": ["-avzHx", "--numeric-ids"]}})
        result, lines = run_doctor(drifted)
    assert result.returncode == 1
    bad = the(lines, "error", "forced command", "drifted since capture: backup.options")
    assert "the gate allows" in bad.what and "capture-command" in bad.fix


# --- the clean-shell test -------------------------------------------------------------------------


def test_admin_bashrc_that_prints(target: Target):
    with restored(target.lab, ADMIN_BASHRC):
        # At the top: Debian's ~/.bashrc returns early for non-interactive shells, but bash
        # reads it for ssh exec sessions (SSH_CLIENT is set), so the line before that runs.
        write(target.lab, ADMIN_BASHRC, b"echo hello\n" + read(target.lab, ADMIN_BASHRC))
        result, lines = run_doctor(target.daemon)
    assert result.returncode == 1
    bad = the(lines, "error", "clean shell", "an admin login running `true`")
    assert "printed 6 bytes on stdout: b'hello\\n'" in bad.what
    assert f"{ADMIN_BASHRC} (6 bytes)" in bad.what
    assert "is your shell clean?" in bad.why and "[ -t 1 ]" in bad.fix
    # The other checks still ran through the dirty login.
    the(lines, "ok", "key line", "--server --daemon")


def test_root_bashrc_that_prints_breaks_the_pull(target: Target):
    with restored(target.lab, "/root/.bashrc"):
        write(target.lab, "/root/.bashrc", b"echo rootjunk\n" + read(target.lab, "/root/.bashrc"))
        result, lines = run_doctor(target.daemon)
    assert result.returncode == 1
    bad = the(lines, "error", "clean shell", "root's shell when sshd starts the forced command")
    assert "b'rootjunk\\n'" in bad.what and "/root/.bashrc (9 bytes)" in bad.what
    pull = the(lines, "error", "test pull", 'server sent "rootjunk" rather than greeting')
    assert "startup file of root's shell" in pull.fix


# --- host keys -----------------------------------------------------------------------------------


def test_unknown_host_key_shows_its_fingerprint(target: Target, lab_env: Lab):
    inventory = lab_env.inventory([target.lab], path=target.work / "unknown.yaml",
                                  defaults={"rsync": PINNED})
    inventory.with_suffix(".known_hosts").write_text("")
    result, lines = run_doctor(inventory)
    assert result.returncode == 1
    expected = fingerprint(parse_public_key(target.lab.host_key))
    keygen = sh(target.lab, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").decode()
    assert expected in keygen
    bad = the(lines, "error", "host key", f"offers ssh-ed25519 {expected}")
    assert "has no key for it" in bad.what and "ssh-keyscan" in bad.fix
    # Nothing else ran over the admin login (the destination and sandbox checks are
    # local); the backup key's pull fails the same way.
    assert {x.check for x in lines} == {"host key", "test pull", "destination", "sandbox"}
    assert "Host key verification failed" in the(lines, "error", "test pull", "fails").what


def test_changed_host_key_names_both_fingerprints(target: Target, lab_env: Lab, tmp_path: Path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    inventory = lab_env.inventory([target.lab], path=target.work / "changed.yaml",
                                  defaults={"rsync": PINNED})
    key_type, blob = other.with_suffix(".pub").read_text().split()[:2]
    inventory.with_suffix(".known_hosts").write_text(
        f"[127.0.0.1]:{target.lab.port} {key_type} {blob}\n")
    result, lines = run_doctor(inventory)
    assert result.returncode == 1
    bad = the(lines, "error", "host key", "HOST KEY CHANGED")
    assert fingerprint(parse_public_key(target.lab.host_key)) in bad.what
    assert fingerprint(parse_public_key(f"{key_type} {blob}")) in bad.what


# --- --explain ------------------------------------------------------------------------------------


def test_explain_contacts_no_host(tmp_path: Path):
    result, _ = run_doctor(tmp_path / "no-such-inventory.yaml", "--explain",
                           "rsync: protocol version mismatch -- is your shell clean?\n"
                           "rsync error: protocol incompatibility (code 2) at compat.c(625)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("protocol version mismatch -- is your shell clean?:")
    assert "rsync exit code 2:" in result.stdout
