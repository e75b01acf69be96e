"""Tables for setup-remote's pure layer: the fact report parser, the plan, the root scripts.

The scripts are text; besides reading them, two tests run the apply script with ``sh`` on
files under a temporary folder (no root needed), so its guard / stage / replace / restore
logic is exercised here too, not only against containers.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import shlex
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from roles.config import rootkey, rsyncd
from roles.core import hardened
from roles.core.outcome import State
from roles.features.setup_remote import daemon_command, plan_setup
from roles.hostfiles.transaction import (
    FileChange,
    SetupError,
    SetupPlan,
    apply_script,
    check_new_login,
    facts_after,
    retry_delays,
    rollback_script,
)
from roles.inventory.schema import validate_host
from roles.remote.facts import (
    AUTHORIZED_KEYS,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    SSHD_CONFIG,
    FileFact,
    HostFacts,
    parse_report,
)
from roles.remote.session import ConnectError, Run, Session

WANT = "forced-commands-only"
DROPINS = "/etc/ssh/sshd_config.d/*.conf"
CLOUD = "/etc/ssh/sshd_config.d/50-cloud.conf"
FORCED = "/usr/local/bin/rsync --server --daemon --config=/etc/pullback/rsyncd.conf ."
STOCK = (b"Include /etc/ssh/sshd_config.d/*.conf\n\n#LoginGraceTime 2m\n"
         b"#PermitRootLogin prohibit-password\n#StrictModes yes\n")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_key(seed: int = 1) -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes([seed]) * 32
    return f"ssh-ed25519 {b64(blob)} backup@client"


PUBLIC_KEY = make_key()
# from=: no `from` in HOST, so the backup host's address as make_facts' server sees it.
KEY_LINE = ('restrict,command="/usr/local/bin/rsync --server --daemon '
            '--config=/etc/pullback/rsyncd.conf .",from="192.0.2.1",no-port-forwarding,'
            "no-agent-forwarding,no-X11-forwarding,no-pty " + " ".join(PUBLIC_KEY.split()[:2])
            + " pullback-backup")
# make_facts' client address: the module admits it alone.
MODULE = rsyncd.render_module(rsyncd.RsyncdSettings(hosts_allow=("192.0.2.1",))).encode()
LEGACY = rsyncd.render_legacy_module("system")
PRIVATE = (0o700, 0, 0)
HOST = validate_host({"name": "web1", "address": "192.0.2.10", "admin_user": "admin",
                            "backup_key": "/srv/keys/backup"})


# --- parse_report -----------------------------------------------------------------------------

MAIN_CRLF = b"Include /etc/ssh/sshd_config.d/*.conf\r\n#PermitRootLogin prohibit-password\r\n"
BINARY = bytes(range(256)) + b"\r\n\r"

REPORT = f"""\
CLIENT 10.88.0.1
OS debian bookworm
OPENSSH OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.11 19 Sep 2023
SSHD /usr/sbin/sshd
FILE 644 0 0 {SSHD_CONFIG}
{b64(MAIN_CRLF)}
INCLUDE {DROPINS} /etc/ssh/sshd_config.d/90-z.conf
FILE 600 0 4 /etc/ssh/sshd_config.d/90-z.conf
{b64(BINARY)}
INCLUDE {DROPINS} {CLOUD}
FILE 640 0 0 {CLOUD}
{b64(b"PermitRootLogin yes")}
DIR 755 0 0 /root/.ssh
MISSING {AUTHORIZED_KEYS}
FILE 644 0 0 {RSYNCD_CONF}

T port 22
T permitrootlogin yes
T PermitRootLogin no
T pidfile /run/sshd.pid
T banner none
RSYNC /usr/local/bin/rsync rsync  version 3.2.7  protocol version 31
RSYNC /usr/bin/rsync rsync  version 3.2.7  protocol version 31
END"""


def test_parse_report_reads_every_fact():
    facts = parse_report(REPORT)
    assert facts.client_addr == "10.88.0.1"
    assert (facts.os_id, facts.os_codename) == ("debian", "bookworm")
    assert facts.openssh == (9, 2)
    assert facts.sshd == "/usr/sbin/sshd"
    assert facts.files[SSHD_CONFIG] == FileFact(SSHD_CONFIG, MAIN_CRLF, 0o644, 0, 0)
    assert facts.content("/etc/ssh/sshd_config.d/90-z.conf") == BINARY  # every byte survives
    assert facts.files["/etc/ssh/sshd_config.d/90-z.conf"].mode == 0o600
    assert facts.files["/etc/ssh/sshd_config.d/90-z.conf"].gid == 4
    assert facts.content(CLOUD) == b"PermitRootLogin yes"
    assert facts.content(RSYNCD_CONF) == b""  # an empty file is not a missing one
    assert facts.content(AUTHORIZED_KEYS) is None
    assert facts.missing == frozenset({AUTHORIZED_KEYS})
    # Include matches re-sorted in byte order whatever order the shell printed them in.
    assert facts.includes == {DROPINS: [CLOUD, "/etc/ssh/sshd_config.d/90-z.conf"]}
    assert facts.dirs == {"/root/.ssh": (0o755, 0, 0)}
    assert facts.effective == {"port": "22", "permitrootlogin": "yes",  # the first value wins
                               "pidfile": "/run/sshd.pid", "banner": "none"}
    assert facts.sshd_T_error == ""
    assert facts.service is None
    assert list(facts.rsync) == ["/usr/local/bin/rsync", "/usr/bin/rsync"]
    assert facts.rsync["/usr/bin/rsync"] == "rsync  version 3.2.7  protocol version 31"


def test_parse_report_sshd_T_error_and_service():
    report = (f"CLIENT 192.0.2.1\nOPENSSH garbage\nFILE 644 0 0 {SSHD_CONFIG}\n{b64(STOCK)}\n"
              "TERR /etc/ssh/sshd_config: line 9: Bad configuration option: NoSuch\n"
              "SERVICE ssh\nEND")
    facts = parse_report(report)
    assert facts.sshd_T_error == "/etc/ssh/sshd_config: line 9: Bad configuration option: NoSuch"
    assert facts.effective == {}
    assert facts.service == "ssh"
    assert facts.openssh is None
    assert facts.includes == {} and facts.dirs == {} and facts.rsync == {}


@pytest.mark.parametrize("text", [
    "",
    "CLIENT 10.0.0.1",
    REPORT.removesuffix("END"),
    REPORT.removesuffix("\nEND"),
    REPORT + "\nT port 22",  # END must be the last line
])
def test_parse_report_without_final_END_is_refused(text: str):
    with pytest.raises(ValueError, match="no END line"):
        parse_report(text)


# The gather script's own form: ONE stat for every path (STAT lines), each file's content
# as DATA + base64, sshd -T between TBEGIN and TEND. The FILE / DIR / T form above is the
# one setup.read_files_script prints; both must give the same facts.
SPACED = "/etc/ssh/sshd_config.d/my conf.conf"
BATCHED = f"""\
CLIENT 10.88.0.1
OS debian bookworm
OPENSSH SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3
SSHD /usr/sbin/sshd
INCLUDE {DROPINS} /etc/ssh/sshd_config.d/90-z.conf
INCLUDE {DROPINS} {CLOUD}
MISSING {AUTHORIZED_KEYS}
STAT 644 0 0 {SSHD_CONFIG}
STAT 600 0 4 /etc/ssh/sshd_config.d/90-z.conf
STAT 640 0 0 {CLOUD}
STAT 644 0 0 {RSYNCD_CONF}
STAT 755 0 0 /root/.ssh
DATA {SSHD_CONFIG}
{b64(MAIN_CRLF)}
DATA /etc/ssh/sshd_config.d/90-z.conf
{b64(BINARY)}
DATA {CLOUD}
{b64(b"PermitRootLogin yes")}
DATA {RSYNCD_CONF}

TBEGIN
port 22
permitrootlogin yes
PermitRootLogin no
pidfile /run/sshd.pid
banner none
TEND
RSYNC /usr/local/bin/rsync rsync  version 3.2.7  protocol version 31
RSYNC /usr/bin/rsync rsync  version 3.2.7  protocol version 31
END"""


def test_batched_report_reads_the_same_facts():
    batched, single = parse_report(BATCHED), parse_report(REPORT)
    assert batched == single
    assert list(batched.files) == list(single.files)  # the order the files were asked for


def test_batched_report_a_stat_without_data_is_a_folder():
    report = (f"STAT 640 0 0 {SPACED}\nSTAT 700 0 0 /root/.ssh\nDATA {SPACED}\n"
              f"{b64(b'X11Forwarding no')}\nEND")
    facts = parse_report(report)
    assert facts.files == {SPACED: FileFact(SPACED, b"X11Forwarding no", 0o640, 0, 0)}
    assert facts.dirs == {"/root/.ssh": (0o700, 0, 0)}


@pytest.mark.parametrize(("text", "message"), [
    (f"DATA {SSHD_CONFIG}\n{b64(STOCK)}\nEND", "content but not its mode"),  # vanished
    ("TBEGIN\nport 22\nEND", "no TEND"),
    ("TBEGIN\nEND", "no TEND"),
])
def test_inconsistent_batched_report_is_refused(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_report(text)


class _Transport:
    def __init__(self, banner: str | None) -> None:
        self.remote_version = banner


class _Connection:
    """Just enough of a Fabric connection for ``gather``: records the command it runs."""

    host = "web1"

    def __init__(self, banner: str | None) -> None:
        self.transport = _Transport(banner)
        self.commands: list[str] = []

    def run(self, command: str, **_: object) -> object:
        self.commands.append(command)
        return dataclasses.make_dataclass("R", ["exited", "stdout", "stderr"])(
            0, "OPENSSH SSH-2.0-OpenSSH_10.0p2 Debian-7\nEND\n", "")


@pytest.mark.parametrize(("banner", "passed"), [
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", True),
    ("SSH-2.0-OpenSSH_10.0p2 Debian-7+deb13u4", True),
    ("SSH-2.0-OpenSSH_8.0", True),
    ("SSH-2.0-dropbear_2022.83", False),  # not OpenSSH: the script asks ssh -V
    ("SSH-2.0-OpenSSH", False),  # no release in it
    ("SSH-2.0-OpenSSH_9.2p1\nOPENSSH 99.9", False),  # one fact a line
    ("SSH-2.0-OpenSSH_9.2p1 caf\u00e9", False),
    (None, False),
])
def test_gather_passes_the_banner_only_when_it_names_an_openssh_release(banner, passed):
    from roles.remote.facts import gather

    conn = _Connection(banner)
    facts = gather(Session(SimpleNamespace(name="web1", admin_user="admin"), conn, Run()),
                   ["/usr/local/bin/rsync"])
    argv = shlex.split(conn.commands[0])
    assert argv[:3] == ["sudo", "-n", "sh"] and argv[-2] == "$SSH_CONNECTION"
    assert argv[-1] == (banner if passed else "")
    assert facts.openssh == (10, 0)


def test_gather_script_runs_ssh_V_only_without_a_banner_and_each_rsync_once(tmp_path):
    """Runs the real script with ``sh`` (as this user; it only reads): stand-ins for
    ssh, sshd and rsync log their calls."""
    from roles.remote.facts import gather_script

    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    stand_ins = {
        "ssh": "echo 'OpenSSH_8.9p1 Ubuntu-3, OpenSSL 3.0.2 15 Mar 2022' >&2",
        "sshd": "echo 'port 22'",
        "rsync": "printf 'rsync  version 3.4.1  protocol version 32\\nCopyright\\n'",
    }
    for name, body in stand_ins.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho {name} >> {shlex.quote(str(log))}\n{body}\n")
        tool.chmod(0o755)
    rsync = str(bin_dir / "rsync")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    script = gather_script([rsync, "/nonexistent/rsync", rsync])
    cases = [("SSH-2.0-OpenSSH_9.2p1 Debian-2", 0, "SSH-2.0-OpenSSH_9.2p1 Debian-2"),
             ("", 1, "OpenSSH_8.9p1 Ubuntu-3, OpenSSL 3.0.2 15 Mar 2022")]
    for banner, ssh_calls, openssh in cases:
        log.write_text("")
        out = subprocess.run(["sh", "-c", script, "sh", "192.0.2.1 5000 192.0.2.9 22", banner],
                             capture_output=True, text=True, env=env, check=True).stdout
        lines = out.splitlines()
        assert lines[-1] == "END"
        assert f"OPENSSH {openssh}" in lines
        assert [line for line in lines if line.startswith("RSYNC ")] == [
            f"RSYNC {rsync} rsync  version 3.4.1  protocol version 32"]
        calls = log.read_text().split()
        assert calls.count("ssh") == ssh_calls
        assert calls.count("rsync") == 1  # asked twice and found on PATH: run once
        assert calls.count("sshd") == 1
        assert "TBEGIN" in lines and "port 22" in lines and "TEND" in lines


# --- plan_setup -------------------------------------------------------------------------------


def make_facts(files: dict[str, bytes | tuple[bytes, int, int, int]], *,
               effective: str | None = "without-password",
               root_ssh: tuple[int, int, int] | None = (0o700, 0, 0),
               includes: dict[str, list[str]] | None = None, terr: str = "",
               openssh: tuple[int, int] | None = (9, 2),
               rsync: tuple[str, ...] = ("/usr/local/bin/rsync", "/usr/bin/rsync"),
               service: str | None = None,
               pullback_dir: tuple[int, int, int] | None = PRIVATE) -> HostFacts:
    facts: dict[str, FileFact] = {}
    for path, value in files.items():
        content, mode, uid, gid = value if isinstance(value, tuple) else (value, 0o644, 0, 0)
        facts[path] = FileFact(path, content, mode, uid, gid)
    if includes is None:
        includes = {DROPINS: sorted(p for p in files if p.startswith("/etc/ssh/sshd_config.d/"))}
        includes = {k: v for k, v in includes.items() if v}
    return HostFacts(
        files=facts, missing=frozenset(), includes=includes,
        dirs={**({"/root/.ssh": root_ssh} if root_ssh else {}),
              **({PULLBACK_DIR: pullback_dir} if pullback_dir else {})},
        client_addr="192.0.2.1",
        openssh=openssh, sshd="/usr/sbin/sshd",
        effective={"permitrootlogin": effective, "pidfile": "/run/sshd.pid"} if effective else {},
        sshd_T_error=terr, service=service, rsync={r: "rsync 3.2.7" for r in rsync},
    )


DONE = {
    SSHD_CONFIG: STOCK.replace(b"prohibit-password\n", b"prohibit-password\nPermitRootLogin "
                               + WANT.encode() + b"\n"),
    AUTHORIZED_KEYS: ((KEY_LINE + "\n").encode(), 0o600, 0, 0),
    PULLBACK_RSYNCD_CONF: (MODULE, 0o600, 0, 0),
}


def test_fresh_host_plan_orders_rsyncd_keys_sshd():
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK}, root_ssh=None, pullback_dir=None), HOST,
                      PUBLIC_KEY, FORCED)
    assert [(c.step, c.path) for c in plan.changes] == [
        ("rsyncd.conf", PULLBACK_RSYNCD_CONF), ("authorized_keys", AUTHORIZED_KEYS),
        ("sshd_config", SSHD_CONFIG)]
    rsyncd_change, keys_change, sshd_change = plan.changes
    assert rsyncd_change.old is None and rsyncd_change.new == MODULE
    assert (rsyncd_change.mode, rsyncd_change.uid, rsyncd_change.gid) == (0o600, 0, 0)
    assert plan.make_dirs == plan.new_dirs == (PULLBACK_DIR,)
    assert keys_change.old is None and keys_change.new == (KEY_LINE + "\n").encode()
    assert (keys_change.mode, keys_change.uid, keys_change.gid) == (0o600, 0, 0)
    assert keys_change.check_line == KEY_LINE
    assert sshd_change.old == STOCK and sshd_change.new == DONE[SSHD_CONFIG]
    assert plan.fix_root_ssh and plan.create_root_ssh and plan.reload_sshd and plan.changed
    assert plan.steps == {"sshd_config": State.CHANGED, "authorized_keys": State.CHANGED,
                          "rsyncd.conf": State.CHANGED}
    assert plan.forced_command == FORCED and plan.pidfile == "/run/sshd.pid"
    assert plan.client_addr == "192.0.2.1"


def test_no_change_plan_is_empty():
    plan = plan_setup(make_facts(DONE, effective=WANT), HOST, PUBLIC_KEY, FORCED)
    assert plan.changes == ()
    assert not plan.fix_root_ssh and not plan.create_root_ssh
    assert not plan.reload_sshd and not plan.changed
    assert plan.steps == {"sshd_config": State.OK, "authorized_keys": State.OK,
                          "rsyncd.conf": State.OK}


def test_the_shared_rsyncd_conf_is_never_written_without_a_module_of_ours():
    others = b"log file = /var/log/rsyncd.log\n[www]\n  path = /srv/www\n"
    plan = plan_setup(make_facts({**DONE, RSYNCD_CONF: others}, effective=WANT), HOST,
                      PUBLIC_KEY, FORCED)
    assert plan.changes == () and not plan.changed
    assert "old rsyncd module" not in plan.steps


@pytest.mark.parametrize(("mode", "folder", "changes"), [
    ((0o644, 0, 0), PRIVATE, ["rsyncd.conf"]),        # readable by all
    ((0o600, 1000, 0), PRIVATE, ["rsyncd.conf"]),     # not root's
    ((0o600, 0, 0), (0o775, 0, 0), []),               # the folder alone
    ((0o600, 0, 0), (0o700, 1000, 0), []),
])
def test_own_file_and_folder_modes_are_changes(mode, folder, changes):
    files = {**DONE, PULLBACK_RSYNCD_CONF: (MODULE, *mode)}
    plan = plan_setup(make_facts(files, effective=WANT, pullback_dir=folder), HOST, PUBLIC_KEY,
                      FORCED)
    assert [c.step for c in plan.changes] == changes
    assert plan.make_dirs == (() if folder == PRIVATE else (PULLBACK_DIR,))
    assert plan.steps["rsyncd.conf"] is State.CHANGED and plan.changed
    for change in plan.changes:
        assert (change.new, change.mode, change.uid, change.gid) == (MODULE, 0o600, 0, 0)


MIGRATION = [
    # id, /etc/rsyncd.conf before, after (None: removed)
    ("only-ours", (LEGACY, 0o644, 0, 0), None),
    ("with-others", (b"uid = nobody\n\n[www]\n path = /srv\n\n" + LEGACY, 0o640, 0, 4),
     b"uid = nobody\n\n[www]\n path = /srv\n"),
]


@pytest.mark.parametrize(("current", "after"), [m[1:] for m in MIGRATION],
                         ids=[m[0] for m in MIGRATION])
@pytest.mark.parametrize("mode", ["daemon", "captured"])
def test_migration_removes_the_old_module(current, after, mode):
    host = dataclasses.replace(HOST, **{"forced_command": mode})
    forced = FORCED if mode == "daemon" else "/usr/local/libexec/pullback/gate"
    facts = make_facts({**DONE, RSYNCD_CONF: current}, effective=WANT)
    plan = plan_setup(facts, host, PUBLIC_KEY, forced)
    (change,) = [c for c in plan.changes if c.path == RSYNCD_CONF]
    assert (change.step, change.old, change.new) == ("old rsyncd module", current[0], after)
    assert (change.mode, change.uid, change.gid) == current[1:]  # kept as they were
    assert plan.changes[-1] is change  # after the key line that stops using it
    assert plan.steps["old rsyncd module"] is State.REMOVED
    again = plan_setup(facts_after(facts, plan), host, PUBLIC_KEY, forced)
    assert again.changes == () and not again.changed
    assert "old rsyncd module" not in again.steps
    script = apply_script(plan)
    if after is None:
        assert "rm -f /etc/rsyncd.conf && r" in script
        assert "/etc/rsyncd.conf.pullback-new" not in script
    assert "cp -p /etc/rsyncd.conf /etc/rsyncd.conf.pullback-bak" in script
    subprocess.run(["sh", "-n", "-c", script], check=True)


def test_captured_mode_removes_the_daemon_file():
    host = dataclasses.replace(HOST, **{"forced_command": "captured"})
    facts = make_facts(DONE, effective=WANT)
    plan = plan_setup(facts, host, PUBLIC_KEY, "/usr/local/libexec/pullback/gate")
    (change,) = [c for c in plan.changes if c.path == PULLBACK_RSYNCD_CONF]
    assert (change.old, change.new) == (MODULE, None)
    assert plan.steps["rsyncd.conf"] is State.REMOVED
    assert change.diff().startswith("--- a/etc/pullback/rsyncd.conf\n+++ /dev/null\n")
    assert PULLBACK_DIR not in plan.make_dirs
    again = plan_setup(facts_after(facts, plan), host, PUBLIC_KEY,
                       "/usr/local/libexec/pullback/gate")
    assert "rsyncd.conf" not in again.steps and again.changes == ()


def test_removal_runs_and_rolls_back(tmp_path: Path):
    target = tmp_path / "rsyncd.conf"
    target.write_bytes(LEGACY)
    change = FileChange("old rsyncd module", str(target), LEGACY, None, 0o644, os.getuid(),
                        os.getgid())
    plan = fresh_plan(changes=(change,), fix_root_ssh=False, create_root_ssh=False,
                      reload_sshd=False, make_dirs=())
    result = run_script(apply_script(plan))
    assert result.stdout == "PULLBACK_OK\n", result.stderr
    assert not target.exists()
    assert (tmp_path / "rsyncd.conf.pullback-bak").read_bytes() == LEGACY
    assert run_script(rollback_script(plan)).returncode == 0
    assert target.read_bytes() == LEGACY


@pytest.mark.parametrize("files", [
    {SSHD_CONFIG: STOCK},
    {SSHD_CONFIG: STOCK.replace(b"#PermitRootLogin prohibit-password", b"PermitRootLogin yes"),
     AUTHORIZED_KEYS: (b"# ops\r\nssh-ed25519 AAAA other\r\n", 0o644, 0, 0),
     RSYNCD_CONF: b"log file = /var/log/rsyncd.log\n[www]\n  path = /srv/www\n"},
    {SSHD_CONFIG: STOCK.replace(b"\n", b"\r\n").rstrip(b"\r\n"),
     CLOUD: b"PermitRootLogin yes\n",
     RSYNCD_CONF: b"[system]\n  path = /srv\n  read only = no\n"},
])
def test_planned_files_are_a_fixed_point(files):
    """Plan, take the planned bytes as the host's new state, plan again: nothing to do."""
    first = plan_setup(make_facts(files), HOST, PUBLIC_KEY, FORCED)
    assert first.changes
    done = dict(files)
    for change in first.changes:
        done[change.path] = (change.new, change.mode, change.uid, change.gid)
    second = plan_setup(make_facts(done, effective=WANT), HOST, PUBLIC_KEY, FORCED)
    assert second.changes == () and not second.changed


def test_drop_in_that_decides_is_the_file_edited():
    files = {SSHD_CONFIG: STOCK, CLOUD: b"PermitRootLogin yes\n"}
    plan = plan_setup(make_facts(files, effective="yes"), HOST, PUBLIC_KEY, FORCED)
    sshd_changes = [c for c in plan.changes if c.step == "sshd_config"]
    assert [(c.path, c.old, c.new) for c in sshd_changes] == [
        (CLOUD, b"PermitRootLogin yes\n", f"PermitRootLogin {WANT}\n".encode())]
    assert plan.reload_sshd


@pytest.mark.parametrize(("root_ssh", "keys_mode", "fix", "changes"), [
    ((0o700, 0, 0), 0o600, False, []),
    ((0o755, 0, 0), 0o600, True, []),
    ((0o700, 1000, 0), 0o600, True, []),
    ((0o700, 0, 0), 0o644, False, ["authorized_keys"]),
])
def test_modes_and_owners_alone_are_changes(root_ssh, keys_mode, fix, changes):
    files = {**DONE, AUTHORIZED_KEYS: ((KEY_LINE + "\n").encode(), keys_mode, 0, 0)}
    plan = plan_setup(make_facts(files, effective=WANT, root_ssh=root_ssh), HOST, PUBLIC_KEY,
                      FORCED)
    assert plan.fix_root_ssh is fix and not plan.create_root_ssh
    assert [c.step for c in plan.changes] == changes
    assert plan.changed is bool(fix or changes)
    assert plan.steps["authorized_keys"] is (State.CHANGED if fix or changes else State.OK)
    assert not plan.reload_sshd
    for change in plan.changes:
        assert change.old == change.new and change.mode == 0o600
    if fix and not changes:
        script = apply_script(plan)
        assert "chown 0:0 /root/.ssh && chmod 0700 /root/.ssh" in script
        assert "rm -f" not in script  # no candidates to clean up (not `rm -f :`)


@pytest.mark.parametrize(("facts", "message"), [
    (make_facts({}), "does not exist"),
    (make_facts({SSHD_CONFIG: STOCK}, terr="line 3: Bad configuration option: X"),
     "sshd -T fails on the current configuration: line 3: Bad configuration option: X"),
    (make_facts(DONE, effective="yes"), "a Match block makes it 'yes'"),
])
def test_plan_refuses(facts: HostFacts, message: str):
    with pytest.raises(SetupError, match=re.escape(message)):
        plan_setup(facts, HOST, PUBLIC_KEY, FORCED)


def test_unrestricted_root_keys_are_warned_about():
    other, restricted = make_key(2), make_key(3)
    keys = f'# ops\n{other}\ncommand="/bin/true" {restricted}\n'.encode()
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK, AUTHORIZED_KEYS: (keys, 0o600, 0, 0)}),
                      HOST, PUBLIC_KEY, FORCED)
    (warning,) = [w for w in plan.warnings if "without command=" in w]
    assert warning.count("SHA256:") == 1
    keys_change = next(c for c in plan.changes if c.step == "authorized_keys")
    assert keys_change.new == keys + (KEY_LINE + "\n").encode()


def test_captured_mode_without_a_capture_installs_no_key():
    host = dataclasses.replace(HOST, **{"forced_command": "captured"})
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK}), host, PUBLIC_KEY, None)
    assert [c.step for c in plan.changes] == ["sshd_config"]
    assert plan.steps == {"sshd_config": State.CHANGED, "authorized_keys": State.SKIPPED}
    assert any("capture-command" in w for w in plan.warnings)


def test_captured_mode_without_a_capture_removes_the_keys_earlier_line():
    host = dataclasses.replace(HOST, **{"forced_command": "captured"})
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOjU+F2JOd0QARlf267qaP3SXDRhcS6OKWP3RfcIOxyH x"
    keys = f"# ops\n{KEY_LINE}\ncommand=\"/bin/true\" {other}\n".encode()
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK, AUTHORIZED_KEYS: (keys, 0o600, 0, 0)}),
                      host, PUBLIC_KEY, None)
    change = next(c for c in plan.changes if c.step == "authorized_keys")
    assert change.new == f"# ops\ncommand=\"/bin/true\" {other}\n".encode()
    assert plan.steps["authorized_keys"] is State.REMOVED
    again = plan_setup(make_facts({SSHD_CONFIG: STOCK,
                                   AUTHORIZED_KEYS: (change.new, 0o600, 0, 0)}),
                       host, PUBLIC_KEY, None)
    assert [c.step for c in again.changes] == ["sshd_config"]
    assert again.steps["authorized_keys"] is State.SKIPPED


@pytest.mark.parametrize(("from_", "client", "wanted", "allow"), [
    (None, "192.0.2.1", '"192.0.2.1"', "192.0.2.1"),        # the default: this client only
    ("any", "192.0.2.1", None, None),                        # the opt-out: neither
    ("198.51.100.0/24", "192.0.2.1", '"198.51.100.0/24"', "198.51.100.0/24"),
    ("backup.example.org", "192.0.2.1", '"backup.example.org"', "192.0.2.1"),
    (None, "", None, None),                                  # no address reported: a warning
])
def test_key_from_and_hosts_allow_follow_one_rule(from_, client, wanted, allow):
    host = dataclasses.replace(HOST, **{"from_": from_})
    facts = dataclasses.replace(make_facts({SSHD_CONFIG: STOCK}), client_addr=client)
    plan = plan_setup(facts, host, PUBLIC_KEY, FORCED)
    keys_change = next(c for c in plan.changes if c.step == "authorized_keys")
    options, _ = rootkey.parse_options(keys_change.new.decode().strip())
    froms = [o.removeprefix("from=") for o in options if o.startswith("from=")]
    assert froms == ([wanted] if wanted else [])
    assert hardened.wanted_from(from_, client) == (wanted.strip('"') if wanted else None)
    module = next(c for c in plan.changes if c.step == "rsyncd.conf").new.decode()
    assert (f"hosts allow = {allow}" in module) if allow else ("hosts allow" not in module)
    warned = any("did not report the backup host's address" in w for w in plan.warnings)
    assert warned is (from_ is None and not client)


def test_old_openssh_gets_no_restrict_option():
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK}, openssh=(7, 1)), HOST, PUBLIC_KEY, FORCED)
    keys_change = next(c for c in plan.changes if c.step == "authorized_keys")
    assert keys_change.new == KEY_LINE.removeprefix("restrict,").encode() + b"\n"


@pytest.mark.parametrize(("rsync", "command", "warned"), [
    (("/usr/local/bin/rsync", "/usr/bin/rsync"), FORCED, False),
    (("/usr/bin/rsync",), "/usr/bin/rsync --server --daemon --config=/etc/pullback/rsyncd.conf .",
     True),
])
def test_daemon_command_prefers_the_pinned_build(rsync, command, warned):
    forced, warnings = daemon_command(make_facts({}, rsync=rsync), HOST)
    assert forced == command
    assert bool(warnings) is warned


def test_daemon_command_without_any_rsync_fails():
    with pytest.raises(SetupError, match="no rsync on the host"):
        daemon_command(make_facts({}, rsync=()), HOST)


# --- the root scripts -------------------------------------------------------------------------


def fresh_plan(**changes) -> SetupPlan:
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK}, root_ssh=None), HOST, PUBLIC_KEY, FORCED)
    return dataclasses.replace(plan, **changes)


def test_apply_script_guards_stages_validates_then_replaces_in_order():
    plan = fresh_plan()
    script = apply_script(plan)
    digest = hashlib.sha256(STOCK).hexdigest()
    assert f"printf '%s  %s\\n' {digest} /etc/ssh/sshd_config | sha256sum -c --status" in script
    assert "[ ! -e /etc/pullback/rsyncd.conf ] || fail" in script
    assert "[ ! -e /root/.ssh/authorized_keys ] || fail" in script
    assert '"$sshd" -t -f /etc/ssh/sshd_config.pullback-new' in script
    assert "ssh-keygen -l -f /root/.ssh/authorized_keys.pullback-line" in script
    replaces = [script.index(f"mv -fT {path}.pullback-new {path}")
                for path in (PULLBACK_RSYNCD_CONF, AUTHORIZED_KEYS, SSHD_CONFIG)]
    assert replaces == sorted(replaces)
    staged = max(script.index(f"> {path}.pullback-new")
                 for path in (PULLBACK_RSYNCD_CONF, AUTHORIZED_KEYS, SSHD_CONFIG))
    assert staged < replaces[0]  # every candidate is validated before anything is replaced
    assert script.index("cp -p /etc/ssh/sshd_config /etc/ssh/sshd_config.pullback-bak") \
        < replaces[2]
    whole = script.index('"$sshd" -t 2>&1')
    reload = script.index('kill -HUP "$(cat /run/sshd.pid)"')
    assert replaces[2] < whole < reload < script.index("PULLBACK_OK")
    assert "user=root,host=192.0.2.1,addr=192.0.2.1" in script
    assert "mkdir /root/.ssh" in script and "chmod 0700 /root/.ssh" in script
    for change in plan.changes:  # the content travels base64-encoded
        assert b64(change.new) in script
    subprocess.run(["sh", "-n", "-c", script], check=True)


def test_apply_script_quotes_every_path():
    odd = "/etc/ssh/sshd_config.d/my cloud's.conf"
    change = FileChange("sshd_config", odd, b"PermitRootLogin yes\n",
                        f"PermitRootLogin {WANT}\n".encode(), 0o600, 0, 0)
    plan = fresh_plan(changes=(change,), fix_root_ssh=False, create_root_ssh=False,
                      pidfile="/run/my sshd.pid")
    script = apply_script(plan)
    for suffix in ("", ".pullback-new", ".pullback-bak"):
        assert shlex.quote(odd + suffix) in script
    assert shlex.quote("/run/my sshd.pid") in script
    words = [w for line in script.splitlines() for w in shlex.split(line, comments=False)]
    assert not any(w.startswith("cloud's") for w in words)  # never split at the blank
    assert '"$sshd" -t -f' not in script  # a drop-in is checked with the whole configuration
    assert '"$sshd" -t 2>&1' in script
    subprocess.run(["sh", "-n", "-c", script], check=True)
    subprocess.run(["sh", "-n", "-c", rollback_script(plan)], check=True)


def test_apply_script_reloads_through_systemd_when_it_runs_sshd():
    script = apply_script(fresh_plan(service="ssh"))
    assert "systemctl reload ssh || fail 'reloading sshd failed'" in script
    assert "kill -HUP" not in script


def test_apply_script_without_sshd_change_does_not_reload():
    plan = fresh_plan()
    plan = dataclasses.replace(plan, changes=plan.changes[:2], reload_sshd=False)
    script = apply_script(plan)
    assert "kill -HUP" not in script and '"$sshd" -t' not in script


@pytest.mark.parametrize(("reload", "service", "create_root_ssh", "expected"), [
    (True, None, True, [
        "rm -f /etc/pullback/rsyncd.conf || rc=1",
        "rm -f /root/.ssh/authorized_keys || rc=1",
        "mv -fT /etc/ssh/sshd_config.pullback-bak /etc/ssh/sshd_config || rc=1",
        "rmdir /etc/pullback 2>/dev/null || :",
        "rmdir /root/.ssh 2>/dev/null || :",
        'kill -HUP "$(cat /run/sshd.pid)" || rc=1',
    ]),
    (True, "ssh", False, [
        "rm -f /etc/pullback/rsyncd.conf || rc=1",
        "rm -f /root/.ssh/authorized_keys || rc=1",
        "mv -fT /etc/ssh/sshd_config.pullback-bak /etc/ssh/sshd_config || rc=1",
        "systemctl reload ssh || rc=1",
    ]),
])
def test_rollback_script(reload, service, create_root_ssh, expected):
    plan = fresh_plan(reload_sshd=reload, service=service, create_root_ssh=create_root_ssh,
                      new_dirs=(PULLBACK_DIR,) if create_root_ssh else ())
    lines = rollback_script(plan).splitlines()
    assert lines == ["set -u", "rc=0", *expected, 'exit "$rc"']


# --- the apply script, run with sh on files in a temporary folder ---------------------------


def local_plan(tmp_path: Path, second_old: bytes | None) -> tuple[SetupPlan, Path, Path]:
    first, second = tmp_path / "a.conf", tmp_path / "b.conf"
    first.write_bytes(b"old a\n")
    first.chmod(0o640)
    uid, gid = os.getuid(), os.getgid()
    changes = (
        FileChange("rsyncd.conf", str(first), b"old a\n", b"new a\n", 0o640, uid, gid),
        FileChange("authorized_keys", str(second), second_old, b"new b\n", 0o600, uid, gid),
    )
    plan = fresh_plan(changes=changes, fix_root_ssh=False, create_root_ssh=False,
                      reload_sshd=False)
    return plan, first, second


def run_script(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)


def test_apply_script_runs_and_keeps_a_backup(tmp_path: Path):
    plan, first, second = local_plan(tmp_path, None)
    result = run_script(apply_script(plan))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "PULLBACK_OK\n"
    assert first.read_bytes() == b"new a\n" and first.stat().st_mode & 0o777 == 0o640
    assert second.read_bytes() == b"new b\n" and second.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a.conf.pullback-bak").read_bytes() == b"old a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf", "a.conf.pullback-bak",
                                                          "b.conf"]
    rollback = run_script(rollback_script(plan))
    assert rollback.returncode == 0, rollback.stderr
    assert first.read_bytes() == b"old a\n" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf"]


def test_apply_script_stops_on_a_changed_file_and_leaves_nothing(tmp_path: Path):
    plan, first, second = local_plan(tmp_path, b"old b\n")
    second.write_bytes(b"edited meanwhile\n")
    result = run_script(apply_script(plan))
    assert result.returncode == 1
    assert result.stdout == f"PULLBACK_FAIL {second} changed since it was read; run again\n"
    assert first.read_bytes() == b"old a\n"
    assert second.read_bytes() == b"edited meanwhile\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf", "b.conf"]


def test_apply_script_restores_what_it_replaced_when_replacing_fails(tmp_path: Path):
    plan, first, second = local_plan(tmp_path, None)
    # The second file's candidate can be written, but its final name is a non-empty folder.
    second.mkdir()
    (second / "blocker").write_text("x")
    plan = dataclasses.replace(plan, changes=(
        plan.changes[0], dataclasses.replace(plan.changes[1], old=b"")))
    # sha256sum cannot hash a folder: stand the guard in for a file that did not change.
    result = run_script(apply_script(plan).replace(
        f"printf '%s  %s\\n' {hashlib.sha256(b'').hexdigest()} {second} | sha256sum -c "
        "--status", "true"))
    assert result.returncode == 1
    assert result.stdout == f"PULLBACK_FAIL cannot back up {second}\n"
    assert first.read_bytes() == b"old a\n"  # replaced, then restored from its backup
    assert not (tmp_path / "a.conf.pullback-new").exists()
    assert not (tmp_path / "b.conf.pullback-new").exists()


@pytest.mark.parametrize(("root_ssh", "was"), [
    ((0o755, 0, 0), (0o755, 0, 0)), ((0o2700, 1000, 1000), (0o2700, 1000, 1000)),
    ((0o700, 0, 0), None), (None, None),
])
def test_an_existing_root_ssh_gets_its_mode_and_owner_back_on_failure(root_ssh, was):
    plan = plan_setup(make_facts({SSHD_CONFIG: STOCK}, root_ssh=root_ssh), HOST, PUBLIC_KEY,
                      FORCED)
    assert plan.root_ssh_was == was
    assert plan.fix_root_ssh == (root_ssh != (0o700, 0, 0))
    script, rollback = apply_script(plan), rollback_script(plan)
    if was is None:
        assert "rs=1;" not in script and "chmod 0700 /root/.ssh ||" not in rollback
        assert ("rmdir /root/.ssh 2>/dev/null || :" in rollback) == (root_ssh is None)
        return
    put_back = f"chown {was[1]}:{was[2]} /root/.ssh && chmod {was[0]:04o} /root/.ssh"
    fail = next(line for line in script.splitlines() if line.startswith("fail() {"))
    assert f'if [ "$rs" = 1 ]; then {put_back}; fi;' in fail
    lines = script.splitlines()
    marked = lines.index('[ "$rd" = 1 ] || rs=1')
    assert lines[marked + 1].startswith("chown 0:0 /root/.ssh && chmod 0700 /root/.ssh ||")
    assert f"{put_back} || rc=1" in rollback.splitlines()
    assert "rmdir /root/.ssh" not in rollback


# --- the lockout check's retries ----------------------------------------------------------


class FakeLogin:
    """A new admin login whose ``sudo sshd -T`` prints ``permitrootlogin VALUE``."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self) -> FakeLogin:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, argv: list[str], *, sudo: bool = False) -> SimpleNamespace:
        assert sudo and argv[1:3] == ["-T", "-C"]
        return SimpleNamespace(exited=0, stdout=f"port 22\npermitrootlogin {self.value}\n",
                               stderr="")


class RestartingHost:
    """A session whose new logins are refused ``refusals`` times (sshd re-executing), or
    fail to authenticate (``passing=False``)."""

    def __init__(self, refusals: int, value: str = WANT, *, passing: bool = True) -> None:
        self.refusals, self.value, self.passing, self.attempts = refusals, value, passing, 0

    def reopen(self) -> FakeLogin:
        self.attempts += 1
        if self.attempts <= self.refusals:
            raise ConnectError(f"refused #{self.attempts}", passing=self.passing)
        return FakeLogin(self.value)


def test_the_lockout_check_retries_a_refused_login_after_short_pauses():
    host, pauses = RestartingHost(refusals=2), []
    check_new_login(host, fresh_plan(), sleep=pauses.append)  # type: ignore[arg-type]
    assert host.attempts == 3
    assert pauses == [0.01, 0.02]


def test_the_lockout_check_gives_up_when_its_pauses_run_out():
    host, pauses = RestartingHost(refusals=99), []
    with pytest.raises(SetupError, match=r"a new admin login fails after the reload: refused #4"):
        check_new_login(host, fresh_plan(), delays=lambda: [0.1, 0.2, 0.3],  # type: ignore[arg-type]
                        sleep=pauses.append)
    assert pauses == [0.1, 0.2, 0.3]


def test_the_lockout_check_does_not_try_a_failed_authentication_again():
    host, pauses = RestartingHost(refusals=1, passing=False), []
    with pytest.raises(SetupError, match=r"fails after the reload: refused #1$"):
        check_new_login(host, fresh_plan(), sleep=pauses.append)  # type: ignore[arg-type]
    assert host.attempts == 1 and pauses == []


def test_the_lockout_check_refuses_a_setting_another_file_overrides():
    with pytest.raises(SetupError, match="applies PermitRootLogin 'yes'"):
        check_new_login(RestartingHost(0, value="yes"), fresh_plan())  # type: ignore[arg-type]


def test_retry_pauses_start_short_double_and_stay_within_their_budget():
    pauses = list(retry_delays(first=0.01, longest=0.25, within=5.0))
    assert pauses[:5] == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert max(pauses) == 0.25
    assert 4.75 < sum(pauses) <= 5.0


class CutOffLogin(FakeLogin):
    def run(self, argv: list[str], *, sudo: bool = False) -> SimpleNamespace:
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_login_cut_off_after_it_began_is_named_in_the_lockout_error():
    host = SimpleNamespace(reopen=lambda: CutOffLogin(WANT))
    with pytest.raises(SetupError, match=r"^the new admin login was cut off: \[Errno 104\] "):
        check_new_login(host, fresh_plan())  # type: ignore[arg-type]


class SilentlyCutLogin(FakeLogin):
    def run(self, argv: list[str], *, sudo: bool = False) -> SimpleNamespace:
        raise EOFError()


def test_a_login_cut_off_without_a_word_is_named_by_its_kind():
    host = SimpleNamespace(reopen=lambda: SilentlyCutLogin(WANT))
    with pytest.raises(SetupError, match=r"^the new admin login was cut off: EOFError$"):
        check_new_login(host, fresh_plan())  # type: ignore[arg-type]
