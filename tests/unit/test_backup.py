"""roles.features.backup: argv tables, --stats parsing, exit codes, snapshot naming and pruning,
restore paths, and run_backup's bookkeeping with a stand-in rsync (no ssh, no containers)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from roles.core import pull
from roles.core import rsync as rsync_model
from roles.core.hardened import Mode
from roles.core.spec import HostSpec
from roles.features import backup as b
from roles.features import restore, status
from roles.inventory.schema import validate_host
from roles.local import capture_record, runner, store

RSYNC = "/opt/pullback/bin/rsync"
# Off a terminal ssh never prompts; on a terminal BatchMode=no lets it ask for a passphrase.
# No ssh_config is read (-F /dev/null), only the inventory's known_hosts, nothing forwarded.
SSH_E = ("ssh -F /dev/null -i /keys/backup -p 2222 -o StrictHostKeyChecking=yes "
         "-o UserKnownHostsFile=/keys/known_hosts -o GlobalKnownHostsFile=/dev/null "
         "-o UpdateHostKeys=no -o BatchMode=yes -o IdentitiesOnly=yes -o ForwardAgent=no "
         "-o ForwardX11=no -o ClearAllForwardings=yes -o PermitLocalCommand=no "
         "-o ControlPath=none "
         "-o ConnectTimeout=30 -o ServerAliveInterval=30 -o ServerAliveCountMax=4")


def make_host(tmp: Path | None = None, **backup) -> HostSpec:
    data = {
        "name": "web1", "address": "192.0.2.10", "port": 2222, "admin_user": "admin",
        "backup_key": "/keys/backup", "known_hosts": "/keys/known_hosts",
        # Mirror mode unless a test asks for snapshots. No sandbox: the fake rsync reads its
        # "server" beside DEST, which the sandbox hides (tests/integration/test_sandbox.py).
        "backup": {"destination": str(tmp / "{name}") if tmp else "/backups/{name}",
                   "snapshots": 0, "sandbox": False, **backup},
    }
    if "options" in backup:  # options chosen to test the argv, not a full-system copy
        data["backup"].setdefault("allow_inexact", True)
    if tmp is not None:
        data["rsync"] = {"local_prefix": str(tmp / "prefix")}
        key = tmp / "backup-key"  # run_backup refuses a missing or readable key
        key.touch(mode=0o600, exist_ok=True)
        data["backup_key"] = str(key)
    return validate_host(data)


# --- build_argv -----------------------------------------------------------------------------

DEFAULT = ["-avzx", "-HAXS", "--numeric-ids", "--delete"]  # rsync.version 3.2.7

# The default system_exclude of a pull of / (roles.core.rsync.SYSTEM_EXCLUDE).
SYS = ["--exclude=/proc/*", "--exclude=/sys/*", "--exclude=/dev/*", "--exclude=/run/*",
       "--exclude=/tmp/*", "--exclude=/var/tmp/*", "--exclude=/var/cache/apt/archives/*",
       "--exclude=/swapfile", "--exclude=/swap.img"]

CASES = {
    "mirror, no tty: --progress dropped": (
        {}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", *SYS, "root@192.0.2.10::system/", "/backups/web1/"]),
    "mirror on a tty keeps the user's --progress": (
        {}, {"dry_run": False, "tty": True},
        [*DEFAULT, "--progress", "--stats", *SYS, "root@192.0.2.10::system/", "/backups/web1/"]),
    "dry run adds -n": (
        {}, {"dry_run": True, "tty": False},
        [*DEFAULT, "--stats", *SYS, "-n", "root@192.0.2.10::system/", "/backups/web1/"]),
    "excludes, each as --exclude=PAT": (
        {"exclude": ("/proc/*", "*.tmp", "/var/cache/a b")}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", *SYS, "--exclude=/proc/*", "--exclude=*.tmp",
         "--exclude=/var/cache/a b", "root@192.0.2.10::system/", "/backups/web1/"]),
    "max_delete": (
        {"max_delete": 50}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", *SYS, "--max-delete=50", "root@192.0.2.10::system/",
         "/backups/web1/"]),
    "max_delete 0 is still passed": (
        {"max_delete": 0}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", *SYS, "--max-delete=0", "root@192.0.2.10::system/",
         "/backups/web1/"]),
    "source other than / and another module": (
        {"source": "/srv/data", "module": "full"}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", "root@192.0.2.10::full/srv/data/", "/backups/web1/"]),
    "snapshot: partial target and absolute link-dest": (
        {"snapshots": 3}, {"dry_run": False, "tty": False,
                           "dest": "/backups/web1/2026-11-26T101500Z.partial",
                           "link_dest": "/backups/web1/2026-11-25T101500Z"},
        [*DEFAULT, "--stats", *SYS, "--link-dest=/backups/web1/2026-11-25T101500Z",
         "root@192.0.2.10::system/", "/backups/web1/2026-11-26T101500Z.partial/"]),
    "-P keeps --partial off a tty; --info=progress2 dropped": (
        {"options": ("-aHx", "-P", "--info=progress2", "--numeric-ids")},
        {"dry_run": False, "tty": False},
        ["-aHx", "--partial", "--numeric-ids", "--stats", *SYS, "root@192.0.2.10::system/",
         "/backups/web1/"]),
    "system_exclude below another source, anchored there": (
        {"source": "/var", "exclude": ("*.log",)}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", "--exclude=/tmp/*", "--exclude=/cache/apt/archives/*",
         "--exclude=*.log", "root@192.0.2.10::system/var/", "/backups/web1/"]),
    "system_exclude overridden": (
        {"system_exclude": ("/var/tmp/*",)}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", "--exclude=/var/tmp/*", "root@192.0.2.10::system/",
         "/backups/web1/"]),
    "system_exclude: [] leaves nothing out": (
        {"system_exclude": ()}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", "root@192.0.2.10::system/", "/backups/web1/"]),
    "extra sources: -R, each path below a /./ marker": (
        {"extra_sources": ("/home", "/boot/efi")}, {"dry_run": False, "tty": False},
        [*DEFAULT, "--stats", "--relative", *SYS, "root@192.0.2.10::system/./",
         "root@192.0.2.10::system/./home/", "root@192.0.2.10::system/./boot/efi/",
         "/backups/web1/"]),
    "extra sources below another source, with a snapshot": (
        {"source": "/srv", "extra_sources": ("/srv/data",), "snapshots": 2},
        {"dry_run": True, "tty": False, "dest": "/b/x.partial", "link_dest": "/b/y"},
        [*DEFAULT, "--stats", "--relative", "-n", "--link-dest=/b/y",
         "root@192.0.2.10::system/srv/./", "root@192.0.2.10::system/srv/./data/",
         "/b/x.partial/"]),
    "everything at once": (
        {"source": "/home", "exclude": ("cache/",), "max_delete": 10, "snapshots": 1},
        {"dry_run": True, "tty": True, "dest": "/b/x.partial", "link_dest": "/b/y"},
        [*DEFAULT, "--progress", "--stats", "--exclude=cache/", "-n", "--max-delete=10",
         "--link-dest=/b/y", "root@192.0.2.10::system/home/", "/b/x.partial/"]),
}


@pytest.mark.parametrize("settings,kwargs,tail", CASES.values(), ids=CASES.keys())
def test_build_argv(settings, kwargs, tail):
    host = make_host(**settings)
    kwargs = {"dest": host.destination, **kwargs}
    argv = pull.build_argv(host, local_rsync=RSYNC, **kwargs)
    batch = "BatchMode=no" if kwargs["tty"] else "BatchMode=yes"
    assert argv[:3] == [RSYNC, "-e", SSH_E.replace("BatchMode=yes", batch)]
    assert argv[3:] == tail
    assert "::" in argv[-2] and not argv[-2].startswith("root@192.0.2.10:/")


def test_ssh_command_survives_rsync_splitting_with_spaces():
    host = dataclasses.replace(make_host(), **{"backup_key": "/my keys/backup",
                                          "known_hosts": "/my keys/known hosts"})
    e = pull.build_argv(host, dry_run=False, tty=False, local_rsync=RSYNC, dest="/d")[2]
    assert shlex.split(e) == [
        "ssh", "-F", "/dev/null", "-i", "/my keys/backup", "-p", "2222",
        "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/my keys/known hosts",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes", "-o", "PermitLocalCommand=no",
        "-o", "ControlPath=none", "-o", "ConnectTimeout=30",
        "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4"]


def test_ssh_command_reads_no_ssh_config_and_forwards_nothing():
    """Whatever ~/.ssh/config or /etc/ssh/ssh_config say (ProxyCommand, LocalCommand,
    RemoteForward, ForwardAgent yes, a ControlPath), the backup's ssh reads neither: -F
    /dev/null comes before the destination, and every option that could run a command,
    open a tunnel, lend the agent or trust another host key is stated on the command line
    (ssh takes the first value it sees)."""
    for tty in (False, True):
        words = shlex.split(pull.ssh_command(make_host(), interactive=tty))
        assert words[:3] == ["ssh", "-F", "/dev/null"]
        options = dict(w.split("=", 1) for w in words[words.index("-p") + 2:] if w != "-o")
        assert options | {"BatchMode": "?"} == {
            "StrictHostKeyChecking": "yes", "UserKnownHostsFile": "/keys/known_hosts",
            "GlobalKnownHostsFile": "/dev/null", "UpdateHostKeys": "no", "BatchMode": "?",
            "IdentitiesOnly": "yes", "ForwardAgent": "no", "ForwardX11": "no",
            "ClearAllForwardings": "yes", "PermitLocalCommand": "no", "ControlPath": "none",
            "ConnectTimeout": "30", "ServerAliveInterval": "30", "ServerAliveCountMax": "4"}
        assert options["BatchMode"] == ("no" if tty else "yes")
        assert words[words.index("-i") + 1] == "/keys/backup"


def test_ipv6_address_is_bracketed():
    host = dataclasses.replace(make_host(), **{"address": "2001:db8::7"})
    assert pull.source_spec(host) == "root@[2001:db8::7]::system/"


@pytest.mark.parametrize(("source", "dry_run", "tail"), [
    ("/", False, ["root@192.0.2.10:/", "/backups/web1/"]),
    ("/srv/data", False, ["root@192.0.2.10:/srv/data/", "/backups/web1/"]),
    ("/srv/data/", True, ["-n", "root@192.0.2.10:/srv/data/", "/backups/web1/"]),
])
def test_captured_mode_pulls_with_a_single_colon(source, dry_run, tail):
    """The gate runs `rsync --server --sender ... . /SOURCE/`: what a `host:` pull sends."""
    host = dataclasses.replace(make_host(source=source), **{"forced_command": "captured"})
    argv = pull.build_argv(host, dry_run=dry_run, tty=False, local_rsync=RSYNC,
                        dest="/backups/web1")
    assert argv[:3] == [RSYNC, "-e", SSH_E]
    assert argv[3:] == [*DEFAULT, "--stats", *(SYS if source == "/" else []), *tail]
    assert "::" not in argv[-2]


def test_captured_mode_with_extra_sources():
    host = dataclasses.replace(make_host(extra_sources=("/home",)), forced_command=Mode.CAPTURED)
    argv = pull.build_argv(host, dry_run=False, tty=False, local_rsync=RSYNC,
                           dest="/backups/web1")
    assert argv[3:] == [*DEFAULT, "--stats", "--relative", *SYS, "root@192.0.2.10:/./",
                        "root@192.0.2.10:/./home/", "/backups/web1/"]


def test_link_dest_must_be_absolute():
    with pytest.raises(ValueError, match="absolute"):
        pull.build_argv(make_host(snapshots=2), dry_run=False, tty=False, local_rsync=RSYNC,
                     dest="/d/x.partial", link_dest="y")


def test_find_local_rsync_prefers_the_pinned_build(tmp_path):
    host = make_host(tmp_path)
    path, warning = runner.find_local_rsync(host)
    assert path == shutil.which("rsync") and "not built" in warning
    pinned = tmp_path / "prefix" / "bin" / "rsync"
    pinned.parent.mkdir(parents=True)
    pinned.write_text("#!/bin/sh\n")
    pinned.chmod(0o755)
    assert runner.find_local_rsync(host) == (str(pinned), None)


# --- parse_stats ------------------------------------------------------------------------------


def real_stats(tmp_path: Path, *extra: str) -> str:
    """--stats output of the local rsync 3.x, copying two tmp dirs."""
    rsync = shutil.which("rsync")
    assert rsync, "rsync must be installed for these tests"
    version = subprocess.run([rsync, "--version"], capture_output=True, text=True).stdout
    assert version.split()[2].startswith("3."), version.splitlines()[0]
    src = tmp_path / "src"
    if not src.exists():
        (src / "sub").mkdir(parents=True)
        (src / "small").write_bytes(b"x" * 1234)
        (src / "sub" / "big").write_bytes(os.urandom(1_500_000))
        (src / "link").symlink_to("small")
    out = subprocess.run([rsync, "-a", "--stats", *extra, f"{src}/", f"{tmp_path}/dst/"],
                         capture_output=True, text=True, env=runner.rsync_env(), check=True)
    return out.stdout


def test_parse_stats_real_3x_output(tmp_path):
    text = real_stats(tmp_path)
    stats = pull.parse_stats(text)
    assert stats["files"] == 5  # ., sub, small, sub/big, link
    assert stats["files_by_type"] == {"reg": 2, "dir": 2, "link": 1}
    assert stats["files_transferred"] == 2
    assert stats["files_created"] == 5
    assert stats["files_deleted"] == 0
    assert stats["total_size"] == 1_501_234 + len("small")  # a link's size is its target
    assert stats["transferred_size"] == 1_501_234
    assert stats["literal_data"] == 1_501_234
    assert stats["matched_data"] == 0
    assert stats["bytes_sent"] > 1_500_000 and stats["bytes_received"] > 0
    assert "1,501,234" in text  # thousands separators were really there
    assert stats["speedup"] > 0
    # A second run transfers nothing.
    again = pull.parse_stats(real_stats(tmp_path))
    assert again["files_transferred"] == 0 and again["literal_data"] == 0


def test_parse_stats_dry_run_and_human_readable(tmp_path):
    dry = pull.parse_stats(real_stats(tmp_path, "-n"))
    assert dry["dry_run"] is True and dry["files_transferred"] == 2
    human = pull.parse_stats(real_stats(tmp_path / "h", "-h"))
    assert human["transferred_size"] == pytest.approx(1_501_234, rel=0.01)


# The last line of a 3.x and a 2.6.9 --stats run, with and without -n / --only-write-batch.
@pytest.mark.parametrize(("text", "marker"), [
    ("sent 1 bytes  received 2 bytes  6.00 bytes/sec\n"
     "total size is 1,501,239  speedup is 1.00 (DRY RUN)\n", "(DRY RUN)"),
    ("total size is 987654321  speedup is 25904.14 (DRY RUN)\n", "(DRY RUN)"),
    ("total size is 1.50M  speedup is 1.00 (DRY RUN)\n", "(DRY RUN)"),  # -h
    ("total size is 987654321  speedup is 25904.14 (BATCH ONLY)\n", "(BATCH ONLY)"),
    ("total size is 987654321  speedup is 25904.14\n", None),
    # A file named like the marker line, listed by -v, then rsync's own line: not a dry run.
    ("total size is 1  speedup is 1.00 (DRY RUN)\nsent 1 bytes  received 2 bytes\n"
     "total size is 5  speedup is 0.01\n", None),
    # ...and the other way round: a real dry run whose listing held a plain line.
    ("total size is 1  speedup is 1.00\ntotal size is 5  speedup is 0.01 (DRY RUN)\n",
     "(DRY RUN)"),
    ("(DRY RUN)\n", None),  # not rsync's summary line
    ("", None),
])
def test_no_transfer_marker_reads_rsyncs_own_summary_line(text, marker):
    assert pull.no_transfer_marker(text) == marker
    assert pull.parse_stats(text).get("dry_run", False) == (marker == "(DRY RUN)")


def test_real_dry_run_output_carries_the_marker(tmp_path):
    assert pull.no_transfer_marker(real_stats(tmp_path, "-n")) == "(DRY RUN)"
    assert pull.no_transfer_marker(real_stats(tmp_path / "again")) is None


STATS_269 = """\
sending incremental file list

Number of files: 1234
Number of files transferred: 17
Total file size: 987654321 bytes
Total transferred file size: 4321 bytes
Literal data: 4000 bytes
Matched data: 321 bytes
File list size: 29876
File list generation time: 0.012 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 5120
Total bytes received: 33006

sent 5120 bytes  received 33006 bytes  76252.00 bytes/sec
total size is 987654321  speedup is 25904.14
"""


def test_parse_stats_269_format():
    assert pull.parse_stats(STATS_269) == {
        "files": 1234, "files_transferred": 17, "total_size": 987654321,
        "transferred_size": 4321, "literal_data": 4000, "matched_data": 321,
        "file_list_size": 29876, "bytes_sent": 5120, "bytes_received": 33006,
        "speedup": 25904.14,
    }


def test_parse_stats_big_numbers_with_separators():
    text = ("Number of files: 1,234,567 (reg: 1,000,000, dir: 234,500, link: 67)\n"
            "Number of regular files transferred: 12,345\n"
            "Total file size: 98,765,432,109 bytes\n"
            "total size is 98,765,432,109  speedup is 1,234.56\n")
    stats = pull.parse_stats(text)
    assert stats["files"] == 1_234_567
    assert stats["files_by_type"] == {"reg": 1_000_000, "dir": 234_500, "link": 67}
    assert stats["files_transferred"] == 12_345
    assert stats["total_size"] == 98_765_432_109
    assert stats["speedup"] == 1234.56


def test_parse_stats_of_nothing_is_empty():
    assert pull.parse_stats("rsync: connection unexpectedly closed\n") == {}


# --- exit codes and error lines -----------------------------------------------------------

@pytest.mark.parametrize("code,words", [
    (1, "syntax"), (2, "invoke build-rsync"), (5, "host::module"), (10, "socket"),
    (11, "file I/O"), (12, "forced command does not match"), (23, "partial transfer"),
    (24, "vanished"), (25, "max-delete"), (30, "timeout"), (255, "ssh failed"),
])
def test_explain_exit(code, words):
    assert words in b.explain_exit(code)


def test_explain_unknown_and_signals():
    assert "signal 9" in b.explain_exit(-9)
    assert "EXIT VALUES" in b.explain_exit(99)


def test_scanner_finds_errors_across_chunks_and_keeps_only_the_tail():
    text = (b"file1\nfile2\r  1,000 100%\r"
            b"rsync: [sender] send_files failed to open \"/srv/x\": Permission denied (13)\n"
            + b"f\n" * 50_000 +
            b"rsync error: some files/attrs were not transferred (see previous errors) "
            b"(code 23) at main.c(1338) [generator=3.2.7]\n")
    scanner = pull.OutputScanner(tail_bytes=4096)
    for i in range(0, len(text), 777):  # chunk boundaries fall inside lines
        scanner.feed(text[i:i + 777])
    scanner.close()
    assert list(scanner.errors) == [
        'rsync: [sender] send_files failed to open "/srv/x": Permission denied (13)',
        "rsync error: some files/attrs were not transferred (see previous errors) "
        "(code 23) at main.c(1338) [generator=3.2.7]",
    ]
    assert len(scanner.tail) <= 4096 and scanner.tail.endswith("[generator=3.2.7]\n")
    message = pull.describe_failure(23, scanner.errors)
    assert message.startswith('rsync exit 23: rsync: [sender] send_files failed to open')
    assert "/ rsync error: some files" in message and "partial transfer" in message


def test_describe_ssh_and_daemon_failures():
    # A known message explains more than its exit code does.
    host_key = pull.describe_failure(255, ["Host key verification failed."])
    assert host_key.startswith("ssh failed (rsync exit 255): Host key verification failed. -- "
                               "the server's host key is not pinned in the inventory's "
                               "known_hosts")
    seed = pull.describe_failure(5, ["protocol version mismatch -- is your shell clean?",
                                  "rsync error: protocol incompatibility (code 2)"])
    assert "daemon forced command" in seed and "root@host::MODULE/" in seed
    # Without a known message the exit code's meaning is used.
    assert pull.describe_failure(255, ["ssh: something new"]).endswith(b.EXIT_CODES[255])
    assert "Unknown module" in pull.describe_failure(5, ["@ERROR: Unknown module 'system'"])
    assert pull.describe_failure(12, []).startswith("rsync exit 12 -- ")


# --- snapshots ------------------------------------------------------------------------------

NOW = datetime(2026, 11, 26, 10, 15, 0, tzinfo=UTC)


def test_a_refusal_by_the_gate_is_quoted():
    scanner = pull.OutputScanner()
    scanner.feed(b"pullback gate: refused: rsync --server --sender -vlogDtprxzen . /etc/\n"
                 b"rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n"
                 b"rsync error: error in rsync protocol data stream (code 12) at io.c(232)\n")
    scanner.close()
    assert scanner.errors[0].startswith("pullback gate: refused: rsync --server")
    assert "capture-command" in pull.describe_failure(12, scanner.errors)


def test_run_id_naming_and_collisions():
    assert store.new_run_id(NOW, []) == "2026-11-26T101500Z"
    assert store.new_run_id(NOW, ["2026-11-26T101500Z"]) == "2026-11-26T101500Z-2"
    assert store.new_run_id(NOW, ["2026-11-26T101500Z", "2026-11-26T101500Z-2.partial"]) == \
        "2026-11-26T101500Z-3"


def test_snapshot_order_and_pruning():
    names = ["latest", "2026-11-26T101500Z-10", "2026-11-24T000000Z", "2026-11-26T101500Z",
             "2026-11-26T101500Z-2", "2026-11-27T000000Z.partial", "notes.txt",
             ".latest.tmp-1", "2026-11-25T000000Z"]
    assert store.complete_snapshots(names) == [
        "2026-11-24T000000Z", "2026-11-25T000000Z", "2026-11-26T101500Z",
        "2026-11-26T101500Z-2", "2026-11-26T101500Z-10"]
    assert store.newest_snapshot(names) == "2026-11-26T101500Z-10"
    assert store.plan_prune(names, 2) == [
        "2026-11-24T000000Z", "2026-11-25T000000Z", "2026-11-26T101500Z"]
    assert store.plan_prune(names, 99) == []
    assert store.plan_prune(names, 0) == []  # mirror mode never prunes
    assert store.newest_snapshot(["latest", "x.partial"]) is None


def test_stale_partials_resume_or_delete():
    names = ["2026-11-20T000000Z", "2026-11-21T000000Z.partial", "2026-11-22T000000Z.partial",
             "junk.partial"]
    assert store.plan_partials(names, resume=True) == (
        "2026-11-22T000000Z.partial", ["2026-11-21T000000Z.partial"])
    assert store.plan_partials(names, resume=False) == (
        None, ["2026-11-21T000000Z.partial", "2026-11-22T000000Z.partial"])
    assert pull.has_delete(["-a", "--delete"]) and pull.has_delete(["--delete-after"])
    assert not pull.has_delete(["-a", "--max-delete=3"])


# --- run_backup with a stand-in rsync ----------------------------------------------------------

FAKE_RSYNC = """#!/usr/bin/env python3
# Stand-in for the pinned rsync: a local copy from $FAKE_SOURCE instead of the pull.
import os, sys, time
if sys.argv[1:] == ["--version"]:
    print("rsync  version 9.9.9  protocol version 99")
    sys.exit(0)
args, skip = [], False
for a in sys.argv[1:]:
    if skip:
        skip = False
    elif a == "-e":
        skip = True
    elif a.startswith("root@"):
        args.append(os.environ["FAKE_SOURCE"] + "/")
    elif a not in ("-z", "-avzx"):
        args.append(a)
with open(os.environ["FAKE_SOURCE"] + ".argv", "a") as f:
    f.write(repr(sys.argv[1:]) + "\\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
code = int(os.environ.get("FAKE_EXIT", "0"))
if code:
    dest = args[-1]
    os.makedirs(dest, exist_ok=True)
    open(os.path.join(dest, "half-done"), "w").close()
    print('rsync: [sender] send_files failed to open "/x": Permission denied (13)')
    print("rsync error: some files/attrs were not transferred (see previous errors) "
          f"(code {code}) at main.c(1338) [generator=3.2.7]")
    sys.exit(code)
os.execv(os.environ["REAL_RSYNC"], ["rsync", "-a", *os.environ.get("FAKE_EXTRA", "").split(),
                                    *args])
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    prefix = tmp_path / "prefix" / "bin"
    prefix.mkdir(parents=True)
    (prefix / "rsync").write_text(FAKE_RSYNC)
    (prefix / "rsync").chmod(0o755)
    source = tmp_path / "server"
    source.mkdir()
    (source / "keep").write_text("same in every snapshot\n")
    (source / "change").write_text("v1\n")
    monkeypatch.setenv("FAKE_SOURCE", str(source))
    monkeypatch.setenv("REAL_RSYNC", shutil.which("rsync"))
    return source


def test_run_backup_mirror_writes_log_and_summary_outside_the_copy(tmp_path, fake):
    host = make_host(tmp_path)
    result = b.run_backup(host, dry_run=False, tty=False)
    assert result.ok and result.exit_code == 0 and result.warning is None
    dest = tmp_path / "web1"
    assert os.listdir(dest) == ["tree"] and (dest.stat().st_mode & 0o7777) == 0o700
    assert sorted(os.listdir(dest / "tree")) == ["change", "keep"]
    state = tmp_path / "web1.pullback"
    assert (state.stat().st_mode & 0o777) == 0o700
    assert (state / "layout").read_text() == "tree\n"
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["mode"] == "mirror" and summary["exit_code"] == 0
    assert summary["stats"]["files_transferred"] == 2
    log = Path(result.log_path).read_text()
    assert log.startswith("# ") and "--stats" in log.splitlines()[0]
    assert "Number of files" in log
    argv = (fake.parent / "server.argv").read_text()
    assert "--progress" not in argv and "root@192.0.2.10::system/" in argv


def test_run_backup_dry_run_writes_no_backup(tmp_path, fake):
    result = b.run_backup(make_host(tmp_path, snapshots=2), dry_run=True, tty=False)
    assert result.ok and result.dry_run and result.snapshot is None
    assert not (tmp_path / "web1").exists()
    assert "-n" in (fake.parent / "server.argv").read_text()


def test_run_backup_snapshots_link_rename_prune(tmp_path, fake):
    host = make_host(tmp_path, snapshots=2)
    dest = tmp_path / "web1"
    made = []
    for n, version in enumerate(("v1", "v2", "v3")):
        (fake / "change").write_text(version + "\n")
        # Same size within the same second would pass rsync's quick check unchanged.
        os.utime(fake / "change", (1_700_000_000 + n, 1_700_000_000 + n))
        result = b.run_backup(host, dry_run=False, tty=False)
        assert result.ok, result.error
        made.append(Path(result.snapshot).name)
    assert len(set(made)) == 3  # same-second runs get -2, -3
    assert store.complete_snapshots(os.listdir(dest)) == made[1:]
    assert os.readlink(dest / "latest") == made[-1]
    older, newer = (dest / made[1]), (dest / made[2])
    assert (older / "keep").stat().st_ino == (newer / "keep").stat().st_ino
    assert (newer / "change").read_text() == "v3\n"
    assert (older / "change").read_text() == "v2\n"
    argv = (fake.parent / "server.argv").read_text().splitlines()
    assert f"--link-dest={dest / made[1]}" in argv[-1]


def test_run_backup_failure_keeps_snapshots_and_the_next_run_resumes(tmp_path, fake,
                                                                     monkeypatch):
    host = make_host(tmp_path, snapshots=3)
    dest = tmp_path / "web1"
    first = b.run_backup(host, dry_run=False, tty=False)
    monkeypatch.setenv("FAKE_EXIT", "23")
    failed = b.run_backup(host, dry_run=False, tty=False)
    assert not failed.ok and failed.exit_code == 23 and failed.snapshot is None
    assert "Permission denied" in failed.error and "partial transfer" in failed.error
    assert store.complete_snapshots(os.listdir(dest)) == [Path(first.snapshot).name]
    assert os.readlink(dest / "latest") == Path(first.snapshot).name
    partials = store.partial_snapshots(os.listdir(dest))
    assert len(partials) == 1
    monkeypatch.delenv("FAKE_EXIT")
    again = b.run_backup(host, dry_run=False, tty=False)
    assert again.ok and "resumed" in again.warning
    assert store.partial_snapshots(os.listdir(dest)) == []
    # --delete (in the default options) removed what the killed run left behind.
    assert sorted(os.listdir(again.snapshot)) == ["change", "keep"]


def test_check_shrink_limits():
    assert store.check_shrink(90, 100, "S", "w", 10) is None  # exactly max_delete fewer: fine
    assert store.check_shrink(500, 100, "S", "w", 0) is None  # growth is never refused
    refused = store.check_shrink(89, 100, "S", "w", 10)
    assert "has 89 files" in refused and "S has 100 (w): 11 fewer" in refused
    assert "backup.max_delete 10" in refused
    assert store.check_shrink(99, 100, "S", "w", 0)  # 0: any drop is refused
    assert "no 'Number of files'" in store.check_shrink(None, 100, "S", "w", 10)


def test_count_entries_counts_what_rsync_counts(tmp_path):
    stats = pull.parse_stats(real_stats(tmp_path))
    (tmp_path / "dst" / "sub" / "dangling").symlink_to("/nonexistent")
    (tmp_path / "dst" / "dirlink").symlink_to("sub")  # a link to a folder is not followed
    assert store.count_entries(tmp_path / "dst") == stats["files"] + 2


def test_snapshot_guard_refuses_an_emptied_source(tmp_path, fake):
    """A new snapshot deletes nothing, so --max-delete never fires: the guard compares the
    file counts and neither promotes the run nor prunes, and the next good run goes on."""
    host = make_host(tmp_path, snapshots=2, max_delete=1)
    dest = tmp_path / "web1"
    (fake / "sub").mkdir()
    (fake / "sub" / "more").write_text("more\n")
    first = b.run_backup(host, dry_run=False, tty=False)
    second = b.run_backup(host, dry_run=False, tty=False)
    assert first.ok and second.ok and first.stats["files"] == 5  # ., keep, change, sub, more
    good = store.complete_snapshots(os.listdir(dest))
    assert good == [Path(first.snapshot).name, Path(second.snapshot).name]

    shutil.rmtree(fake / "sub")
    (fake / "keep").unlink()
    (fake / "change").unlink()
    # A dry run only warns: it promotes nothing anyway.
    dry = b.run_backup(host, dry_run=True, tty=False)
    assert dry.ok and "a real run would be refused: the source has 1 files" in dry.warning
    for _ in range(3):  # more runs than snapshots kept: still nothing is pruned
        refused = b.run_backup(host, dry_run=False, tty=False)
        assert not refused.ok and refused.exit_code == 0 and refused.snapshot is None
        assert refused.stats["files"] == 1
        assert (f"the source has 1 files, the newest snapshot {good[-1]} has 5 "
                f"({store.state_dir(host) / 'logs' / good[-1]}.json): 4 fewer, more than "
                "backup.max_delete 1") in refused.error
        assert b.result_label(refused) == "failed"
        assert sorted(os.listdir(dest)) == sorted([*good, "latest"])  # no .partial either
        assert os.readlink(dest / "latest") == good[-1]
        assert sorted(os.listdir(dest / good[-1])) == ["change", "keep", "sub"]
        summary = json.loads(Path(refused.summary_path).read_text())
        assert not summary["ok"] and summary["pruned"] == [] and summary["snapshot"] is None

    # The guard needs the newest snapshot's summary only as a shortcut: without it (logs
    # pruned after many refused runs), the snapshot is counted on disk.
    (store.state_dir(host) / "logs" / f"{good[-1]}.json").unlink()
    again = b.run_backup(host, dry_run=False, tty=False)
    assert not again.ok and f"has 5 (counted in {dest / good[-1]})" in again.error

    # One file fewer is within max_delete 1; with the data back the next run succeeds.
    (fake / "keep").write_text("same in every snapshot\n")
    (fake / "change").write_text("v2\n")
    (fake / "sub").mkdir()
    back = b.run_backup(host, dry_run=False, tty=False)
    assert back.ok, back.error
    assert back.stats["files"] == 4 and back.warning is None
    assert store.complete_snapshots(os.listdir(dest)) == [good[-1], Path(back.snapshot).name]
    assert os.readlink(dest / "latest") == Path(back.snapshot).name


def test_snapshot_guard_is_off_without_max_delete(tmp_path, fake):
    host = make_host(tmp_path, snapshots=2)
    assert b.run_backup(host, dry_run=False, tty=False).ok
    for name in ("keep", "change"):
        (fake / name).unlink()
    empty = b.run_backup(host, dry_run=False, tty=False)
    assert empty.ok and os.listdir(empty.snapshot) == []


def test_mirror_guard_refuses_before_any_deletion(tmp_path, fake):
    """Mirror mode: a dry run counts the deletions first; over the limit nothing is
    deleted (rsync's --max-delete alone would still delete the first N)."""
    host = make_host(tmp_path, max_delete=1)
    copy = tmp_path / "web1" / "tree"
    first = b.run_backup(host, dry_run=False, tty=False)
    assert first.ok
    summary = json.loads(Path(first.summary_path).read_text())
    assert summary["deletion_check"]["over_limit"] is False
    assert "-n" in summary["deletion_check"]["argv"]
    for name in ("keep", "change"):
        (fake / name).unlink()
    stopped = b.run_backup(host, dry_run=False, tty=False)
    assert not stopped.ok and stopped.exit_code == 25
    assert stopped.error.startswith("refused before any deletion: the pull would delete at "
                                    f"least 2 files from {copy}, more than backup.max_delete 1")
    assert sorted(os.listdir(copy)) == ["change", "keep"]  # nothing deleted
    log = Path(stopped.log_path).read_text()
    assert log.startswith("# deletion check (dry run): ") and log.count("\n# ") == 0
    summary = json.loads(Path(stopped.summary_path).read_text())
    assert summary["deletion_check"]["would_delete"] == 2 and not summary["ok"]
    # Within the limit the pull runs (after the check, in the same log).
    (fake / "keep").write_text("same in every snapshot\n")
    one = b.run_backup(host, dry_run=False, tty=False)
    assert one.ok and sorted(os.listdir(copy)) == ["keep"]
    log = Path(one.log_path).read_text()
    assert log.startswith("# deletion check (dry run): ") and "\n# " in log


def test_mirror_guard_check_is_skipped_without_delete_or_limit(tmp_path, fake):
    for host in (make_host(tmp_path), make_host(tmp_path, max_delete=1,
                                                options=("-a", "--numeric-ids"))):
        result = b.run_backup(host, dry_run=False, tty=False)
        assert result.ok
        assert json.loads(Path(result.summary_path).read_text())["deletion_check"] is None


def test_max_delete_zero_is_refused_with_an_old_local_rsync(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(b, "local_rsync_version", lambda host, rsync: "2.6.9")
    host = make_host(tmp_path, max_delete=0)
    host = dataclasses.replace(host, **{"rsync": dataclasses.replace(host.rsync, **{"allow_vulnerable": True})})
    with pytest.raises(store.BackupError, match="means 'no limit' to the local rsync 2.6.9"):
        b.run_backup(host, dry_run=False, tty=False)


@pytest.mark.parametrize("code,errors,stats,want", [
    (25, ["Deletions stopped due to --max-delete limit (38 skipped)",
          "rsync error: the --max-delete limit stopped deletions (code 25) at main.c(1394)"],
     {"files_deleted": 5}, (True, 43)),
    (23, ["rsync warning: Deletions stopped due to --max-delete limit (1,200 skipped)"], {},
     (True, 1205)),
    (25, [], {}, (True, None)),
    (0, [], {"files_deleted": 3}, (False, 3)),
    (0, [], {}, (False, None)),  # 2.6.9 prints no deletion count
])
def test_deletion_check_reads_the_dry_run(code, errors, stats, want):
    assert pull.deletion_check(code, errors, stats, 5) == want


@pytest.mark.parametrize("limit,version,refused", [
    (0, "2.6.9", True), (0, "3.0.0", False), (0, "3.5.1", False), (1, "2.6.9", False),
    (None, "2.6.9", False), (0, None, False),
])
def test_max_delete_zero_needs_rsync_3(limit, version, refused):
    assert (pull.max_delete_problem(limit, version) is not None) == refused


def test_run_backup_code_24_is_a_success_with_a_warning(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT", "24")
    result = b.run_backup(make_host(tmp_path, snapshots=1), dry_run=False, tty=False)
    assert result.ok and result.exit_code == 24 and "vanished" in result.warning
    assert result.snapshot and b.result_label(result) == "ok (24)"


@pytest.mark.parametrize("snapshots", [0, 2])
def test_a_run_whose_rsync_says_dry_run_is_not_a_backup(tmp_path, fake, monkeypatch,
                                                         snapshots):
    """-n smuggled past backup.options (here: into the stand-in's own argv): rsync's
    (DRY RUN) marks the run failed, nothing is promoted, status never counts it."""
    host = make_host(tmp_path, snapshots=snapshots)
    monkeypatch.setenv("FAKE_EXTRA", "--dry-run")
    result = b.run_backup(host, dry_run=False, tty=False)
    assert not result.ok and result.snapshot is None and not result.dry_run
    assert "(DRY RUN)" in result.error and "nothing was promoted" in result.error
    dest = tmp_path / "web1"
    assert "latest" not in os.listdir(dest)
    assert store.complete_snapshots(os.listdir(dest)) == []
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["ok"] is False and summary["stats"]["dry_run"] is True
    assert status.gather_status(host).newest_good is None
    # A dry run asked for says (DRY RUN) too: that one is fine, and still no backup.
    asked = b.run_backup(host, dry_run=True, tty=False)
    assert asked.ok and asked.dry_run and status.gather_status(host).newest_good is None
    monkeypatch.delenv("FAKE_EXTRA")
    real = b.run_backup(host, dry_run=False, tty=False)
    assert real.ok and status.gather_status(host).newest_good is not None
    assert bool(real.snapshot) == bool(snapshots)


def test_lock_refuses_a_second_run_at_once(tmp_path, fake):
    host = make_host(tmp_path)
    state = store.state_dir(host)
    state.mkdir(mode=0o700)
    held = rf"another backup of web1 is running \(pid {os.getpid()}\)"
    with store.Lock(state / "lock", host.name), pytest.raises(store.BackupError, match=held):
        b.run_backup(host, dry_run=False, tty=False)
    assert b.run_backup(host, dry_run=False, tty=False).ok


def test_run_backup_on_a_tty_echoes_and_shows_progress(tmp_path, fake):
    shown = io.BytesIO()
    result = b.run_backup(make_host(tmp_path), dry_run=False, tty=True, echo=shown)
    assert result.ok and b"Number of files" in shown.getvalue()
    # Both ends >= 3.1 (the fake says 9.9.9): one progress line for the whole pull.
    assert "--info=progress2" in (fake.parent / "server.argv").read_text()
    old = make_host(tmp_path)
    old = dataclasses.replace(old, **{"rsync": dataclasses.replace(old.rsync, **{"version": "3.0.9"})})
    assert b.run_backup(old, dry_run=False, tty=True, echo=io.BytesIO()).ok
    assert "--progress" in (fake.parent / "server.argv").read_text()


def test_mirror_mode_refuses_a_folder_of_snapshots(tmp_path, fake):
    assert b.run_backup(make_host(tmp_path, snapshots=2), dry_run=False, tty=False).ok
    with pytest.raises(store.BackupError, match="would erase them"):
        b.run_backup(make_host(tmp_path), dry_run=False, tty=False)


def test_an_orphaned_rsync_keeps_the_lock(tmp_path, fake, monkeypatch):
    """pullback killed, its rsync still running: no new run may start until rsync ends."""
    monkeypatch.setenv("FAKE_SLEEP", "1.5")
    host = make_host(tmp_path, allow_destination=str(tmp_path))  # the child has no seam
    script = ("import json, sys, roles.features.backup as b, roles.core.spec as spec; "
              "b.run_backup(spec.HostSpec.from_dict(json.loads(sys.argv[1])), dry_run=False, "
              "tty=False)")
    child = subprocess.Popen([sys.executable, "-c", script, json.dumps(host.to_dict())],
                             cwd=Path(__file__).resolve().parents[2])
    lock = store.state_dir(host) / "lock"
    deadline = time.monotonic() + 10
    while "rsync" not in (lock.read_text() if lock.exists() else ""):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    child.kill()
    child.wait()
    with pytest.raises(store.BackupError, match=r"is running \(pid \d+, rsync pid \d+\)"):
        store.Lock(lock, host.name).__enter__()
    deadline = time.monotonic() + 10
    while True:
        try:
            with store.Lock(lock, host.name):
                break
        except store.BackupError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def captured_host(tmp_path: Path, **backup) -> HostSpec:
    return dataclasses.replace(make_host(tmp_path, **backup), **{"forced_command": "captured"})


def write_record(host: HostSpec, rsync_version: str = "rsync  version 9.9.9  protocol version 99"):

    sent = "rsync --server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . /"
    words = tuple(sent.split(" "))
    settings = host.backup
    record = capture_record.CaptureRecord(
        host=host.name, captured_at="2026-11-26T10:15:00Z", source=settings.source,
        options=settings.options, exclude=settings.exclude, sent=sent,
        sent_dry_run=" ".join(rsync_model.dry_run_variant(words)), remote_rsync="/usr/bin/rsync",
        remote_version="rsync  version 3.2.7  protocol version 31",
        local_rsync=host.rsync.local_binary, local_version=rsync_version,
        fingerprint=rsync_model.fingerprint(settings.options, settings.exclude, settings.source,
                                        rsync_version,
                                        "rsync  version 3.2.7  protocol version 31"))
    capture_record.save_record(host, record)
    return record


def test_run_backup_captured_mode_runs_on_a_matching_record(tmp_path, fake):
    host = captured_host(tmp_path)
    record = write_record(host)
    result = b.run_backup(host, dry_run=False, tty=False)
    assert result.ok, result.error
    assert sorted(os.listdir(tmp_path / "web1" / "tree")) == ["change", "keep"]
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["forced_command"] == "captured"
    assert summary["capture_fingerprint"] == record.fingerprint
    assert summary["argv"][-2] == "root@192.0.2.10:/"
    dry = b.run_backup(host, dry_run=True, tty=False)
    assert dry.ok and "-n" in json.loads(Path(dry.summary_path).read_text())["argv"]


@pytest.mark.parametrize(("change", "named"), [
    ({"options": ("-avzx", "--numeric-ids", "--delete", "-H")}, "backup.options"),
    ({"exclude": ("/proc/*",)}, "backup.exclude"),
    ({"source": "/srv"}, "backup.source"),
])
def test_run_backup_refuses_drift_before_touching_anything(tmp_path, fake, change, named):
    write_record(captured_host(tmp_path))
    host = captured_host(tmp_path, **change)
    with pytest.raises(store.BackupError, match=rf"^{named} changed since the capture of "
                       r"2026-11-26T10:15:00Z: .*run `invoke capture-command` again$"):
        b.run_backup(host, dry_run=False, tty=False)
    assert not (tmp_path / "web1").exists()
    assert not (fake.parent / "server.argv").exists()  # rsync never ran a pull
    assert not (store.state_dir(host) / "logs").exists()


def test_run_backup_refuses_a_new_local_rsync(tmp_path, fake):
    host = captured_host(tmp_path)
    write_record(host, rsync_version="rsync  version 3.2.7  protocol version 31")
    with pytest.raises(store.BackupError, match="^the local rsync changed since the capture"):
        b.run_backup(host, dry_run=False, tty=False)


def test_run_backup_refuses_a_damaged_record(tmp_path, fake):
    host = captured_host(tmp_path)
    write_record(host)
    path = store.state_dir(host) / "capture.json"
    path.write_text(path.read_text().replace("--numeric-ids . /", "--numeric-ids . /etc/"))
    with pytest.raises(store.BackupError, match=r"capture record .* is damaged .*capture-command"):
        b.run_backup(host, dry_run=False, tty=False)


def test_format_table():
    rows = [
        b.BackupResult("web1", True, 0, 12.34, {"files_transferred": 3, "files": 10,
                                                "transferred_size": 2_500_000,
                                                "bytes_received": 1_200},
                       snapshot="/b/web1/2026-11-26T101500Z"),
        b.BackupResult("db1", False, None, 0.0, error="another backup of db1 is running"),
    ]
    lines = b.format_table(rows).splitlines()
    assert lines[0].split() == ["host", "result", "seconds", "files", "transferred",
                                "received", "snapshot"]
    assert lines[1].split() == ["web1", "ok", "12.3", "3/10", "2.5", "MB", "1.2", "KB",
                                "2026-11-26T101500Z"]
    assert lines[2].split() == ["db1", "failed", "0.0", "-", "-", "-", "-"]


# --- restore ----------------------------------------------------------------------------------


def test_restore_argv_adds_acls_and_xattrs_only_when_backed_up():
    src = Path("/b/web1/etc/ssh")
    plain = pull.build_restore_argv(RSYNC, ["-avzx", "--numeric-ids"], src, is_dir=True, to="/r")
    assert plain == [RSYNC, "-a", "--numeric-ids", "-H", "/b/web1/etc/ssh/", "/r/"]
    full = pull.build_restore_argv(RSYNC, ["-aHAXx"], src, is_dir=False, to="/r/")
    assert full == [RSYNC, "-a", "--numeric-ids", "-H", "-A", "-X", "/b/web1/etc/ssh", "/r/"]
    longs = pull.build_restore_argv(RSYNC, ["-a", "--acls", "--xattrs"], src, is_dir=True,
                                 to="/r")
    assert "-A" in longs and "-X" in longs
    # The defaults (-HAXS) carry everything back, holes included.
    default = pull.build_restore_argv(RSYNC, ["-avzx", "-HAXS", "--numeric-ids"], src,
                                      is_dir=True, to="/r")
    assert default == [RSYNC, "-a", "--numeric-ids", "-H", "-A", "-X", "-S",
                       "/b/web1/etc/ssh/", "/r/"]
    assert "-S" in pull.build_restore_argv(RSYNC, ["--sparse"], src, is_dir=True, to="/r")


def test_restore_path_checks(tmp_path):
    root = tmp_path / "web1"
    (root / "etc" / "ssh").mkdir(parents=True)
    (root / "etc" / "ssh" / "sshd_config").write_text("x")
    (root / "bin").symlink_to("/usr/bin")
    host = make_host(tmp_path)
    assert restore.resolve_restore_path(host, root, "/etc/ssh") == root / "etc" / "ssh"
    assert restore.resolve_restore_path(host, root, "/") == root
    assert restore.resolve_restore_path(host, root, "/bin") == root / "bin"  # the link itself
    for bad, why in [("/etc/../../x", r"'\.\.'"), ("etc/ssh", "absolute"),
                     ("/bin/ls", "symlink to /usr/bin"), ("/nope", "not in the backup")]:
        with pytest.raises(restore.RestoreError, match=why):
            restore.resolve_restore_path(host, root, bad)
    data = make_host(tmp_path, source="/srv/data")
    assert restore.resolve_restore_path(data, root, "/srv/data/etc") == root / "etc"
    with pytest.raises(restore.RestoreError, match="not inside backup.source"):
        restore.resolve_restore_path(data, root, "/etc/ssh")


def test_backup_root_picks_mirror_or_snapshot(tmp_path):
    mirror = make_host(tmp_path)
    with pytest.raises(restore.RestoreError, match="no backup"):
        restore.backup_root(mirror, None)
    (tmp_path / "web1").mkdir()
    with pytest.raises(restore.RestoreError, match="no backup"):
        restore.backup_root(mirror, None)  # an empty DEST: nothing pulled yet
    (tmp_path / "web1" / "etc").mkdir()
    assert restore.backup_root(mirror, None) == tmp_path / "web1"  # the old layout, read in place
    (tmp_path / "web1" / "etc").rename(tmp_path / "web1" / "tree")
    assert restore.backup_root(mirror, None) == tmp_path / "web1" / "tree"
    (tmp_path / "web1" / "tree").rmdir()
    with pytest.raises(restore.RestoreError, match="does not apply"):
        restore.backup_root(mirror, "2026-11-26T101500Z")
    snaps = make_host(tmp_path, snapshots=3)
    with pytest.raises(restore.RestoreError, match="no complete snapshot"):
        restore.backup_root(snaps, None)
    for name in ("2026-11-25T000000Z", "2026-11-26T000000Z", "2026-11-27T000000Z.partial"):
        (tmp_path / "web1" / name).mkdir()
    assert restore.backup_root(snaps, None).name == "2026-11-26T000000Z"
    assert restore.backup_root(snaps, "latest").name == "2026-11-26T000000Z"
    assert restore.backup_root(snaps, "2026-11-25T000000Z").name == "2026-11-25T000000Z"
    with pytest.raises(restore.RestoreError, match="no snapshot"):
        restore.backup_root(snaps, "2026-11-27T000000Z.partial")


def test_run_restore_refuses_non_empty_and_inside_the_backup(tmp_path):
    host = make_host(tmp_path)
    (tmp_path / "web1" / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "web1" / "tree" / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    target = tmp_path / "out"
    target.mkdir(mode=0o755)
    (target / "other").write_text("")
    with pytest.raises(restore.RestoreError, match="mode 0755 and is not empty"):
        restore.run_restore(host, path="/etc", to=str(target))
    target.chmod(0o700)
    (target / "tree").mkdir()
    with pytest.raises(restore.RestoreError, match="use --force"):
        restore.run_restore(host, path="/etc", to=str(target))
    with pytest.raises(restore.RestoreError, match="inside the backup"):
        restore.run_restore(host, path="/etc", to=str(tmp_path / "web1" / "x"))
    result = restore.run_restore(host, path="/etc", to=str(target), force=True)
    assert result.ok, result.output
    assert result.target == str(target / "tree")
    assert (target / "tree" / "hosts").read_text() == "127.0.0.1 localhost\n"
    assert (target / "other").exists()


def test_a_restore_during_a_backup_fails_at_once_and_a_backup_during_a_restore(tmp_path):
    host = make_host(tmp_path)
    (tmp_path / "web1" / "tree" / "etc").mkdir(parents=True)
    state = store.state_dir(host)
    state.mkdir(mode=0o700)
    target = tmp_path / "out"
    backup_holds = rf"another backup of web1 is running \(pid {os.getpid()}\)"
    with store.Lock(state / "lock", host.name), \
            pytest.raises(store.BackupError, match=backup_holds):
        restore.run_restore(host, path="/etc", to=str(target))
    assert not target.exists()
    restore_holds = rf"a restore of web1 is running \(pid {os.getpid()}\); lock {state}/lock$"
    with store.Lock(state / "lock", host.name, "restore"), \
            pytest.raises(store.BackupError, match=restore_holds):
        b.run_backup(host, dry_run=False, tty=False)
    assert restore.run_restore(host, path="/etc", to=str(target)).ok
    assert (state / "lock").read_text() == ""  # released


def test_a_restore_holds_the_lock_while_its_rsync_runs(tmp_path, monkeypatch):
    host = make_host(tmp_path)
    (tmp_path / "web1" / "tree" / "etc").mkdir(parents=True)
    seen = []

    def fake_run(argv, **kwargs):
        lock = store.state_dir(host) / "lock"
        seen.append((lock.read_text(), kwargs.get("pass_fds")))
        with pytest.raises(store.BackupError, match="a restore of web1 is running"):
            store.Lock(lock, host.name).__enter__()
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(restore.subprocess, "run", fake_run)
    assert restore.run_restore(host, path="/etc", to=str(tmp_path / "out")).ok
    (text, fds), = seen
    assert text == f"{os.getpid()} restore\n" and fds and len(fds) == 1


@pytest.mark.parametrize(("text", "said"), [
    ("4711\n", "another backup of h is running (pid 4711)"),
    ("4711 rsync 4712\n", "another backup of h is running (pid 4711, rsync pid 4712)"),
    ("4711 restore\n", "a restore of h is running (pid 4711)"),
    ("4711 rsync 4712 restore\n", "a restore of h is running (pid 4711, rsync pid 4712)"),
    ("4711 capture-command\n", "a capture-command of h is running (pid 4711)"),
    ("", "another backup of h is running (pid unknown)"),
    ("4711 $(reboot)\n", "another backup of h is running (pid 4711)"),
])
def test_describe_holder(text, said):
    assert store.describe_holder("h", text) == said


def test_run_restore_makes_a_new_container_0700(tmp_path):
    host = make_host(tmp_path)
    (tmp_path / "web1" / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "web1" / "tree" / "etc" / "hosts").write_text("x\n")
    target = tmp_path / "new" / "out"
    result = restore.run_restore(host, path="/etc/hosts", to=str(target))
    assert result.ok, result.output
    assert (target.stat().st_mode & 0o7777) == 0o700
    assert (target / "tree" / "hosts").read_text() == "x\n"


def test_run_restore_refuses_an_other_writable_ancestor_and_creates_nothing(tmp_path):
    host = make_host(tmp_path)
    (tmp_path / "web1" / "tree" / "etc").mkdir(parents=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(restore.RestoreError, match=f"refused: {shared} is writable by its group "
                                             "and others \\(mode 0777\\)"):
        restore.run_restore(host, path="/etc", to=str(shared / "out" / "deeper"))
    assert os.listdir(shared) == []


# --- the mirror layout: DEST/tree, and the move from the old layout -----------------------------

LAYOUTS = {
    "fresh": ([], False, None, store.MirrorLayout("new")),
    "new layout": (["tree"], False, None, store.MirrorLayout("new")),
    "old layout": (["etc", "usr"], False, None,
                   store.MirrorLayout("old", ".pullback-migrating", ("etc", "usr"))),
    "old layout with a server folder named tree": (
        ["tree", "etc"], False, None,
        store.MirrorLayout("old", ".pullback-migrating", ("etc", "tree"))),
    "old layout holding the staging name": (
        [".pullback-migrating", "etc"], False, None,
        store.MirrorLayout("old", ".pullback-migrating-2", (".pullback-migrating", "etc"))),
    "marked new layout with a stray file: left alone": (
        ["tree", "notes.txt"], True, None, store.MirrorLayout("new", strays=("notes.txt",))),
    "marked, tree not pulled yet": ([], True, None, store.MirrorLayout("new")),
    "interrupted move": (
        [".pullback-migrating", "usr", "var"], False, ".pullback-migrating",
        store.MirrorLayout("migrating", ".pullback-migrating", ("usr", "var"))),
    "interrupted before the staging folder existed": (
        ["etc", "usr"], False, ".pullback-migrating",
        store.MirrorLayout("migrating", ".pullback-migrating", ("etc", "usr"))),
    "interrupted after the last rename": (["tree"], True, ".pullback-migrating",
                                          store.MirrorLayout("new")),
}


@pytest.mark.parametrize("names,marked,staging,expected", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_plan_mirror_layout(names, marked, staging, expected):
    assert store.plan_mirror_layout(names, marked=marked, staging=staging) == expected


def old_layout(dest: Path) -> None:
    """DEST as the old code left it: the tree's top level in DEST, DEST 0755."""
    (dest / "etc").mkdir(parents=True)
    (dest / "etc" / "passwd").write_text("root:x:0:0\n")
    (dest / "tree").mkdir()  # a server folder that happens to be called tree
    (dest / "tree" / "leaf").write_text("leaf\n")
    (dest / "setuid").write_text("#!/bin/sh\n")
    (dest / "setuid").chmod(0o4755)
    os.symlink("etc/passwd", dest / "link")
    dest.chmod(0o755)


def test_run_backup_moves_the_old_layout_into_tree_then_pulls(tmp_path, fake):
    # Without --delete the pull keeps what was moved, so the move itself can be checked.
    host = make_host(tmp_path, options=("-a", "--numeric-ids"))
    dest = tmp_path / "web1"
    old_layout(dest)
    result = b.run_backup(host, dry_run=True, tty=False)
    assert result.ok and "a real run first moves it" in result.warning
    assert sorted(os.listdir(dest)) == ["etc", "link", "setuid", "tree"]  # untouched
    argv = (fake.parent / "server.argv").read_text().splitlines()[-1]
    assert f"'{dest}/'" in argv
    result = b.run_backup(host, dry_run=False, tty=False)
    assert result.ok, result.error
    assert "mode 0755 -> 0700" in result.warning and "moved the old layout's 4 entries" \
        in result.warning
    assert os.listdir(dest) == ["tree"] and (dest.stat().st_mode & 0o7777) == 0o700
    tree = dest / "tree"
    assert sorted(os.listdir(tree)) == ["change", "etc", "keep", "link", "setuid", "tree"]
    assert (tree / "tree" / "leaf").read_text() == "leaf\n"
    assert (tree / "setuid").stat().st_mode & 0o7777 == 0o4755
    assert os.readlink(tree / "link") == "etc/passwd"
    assert not (store.state_dir(host) / "migration.json").exists()
    again = b.run_backup(host, dry_run=False, tty=False)
    assert again.ok and again.warning is None
    assert os.listdir(dest) == ["tree"]


def test_an_interrupted_move_is_finished_by_the_next_run(tmp_path, fake, monkeypatch):
    host = make_host(tmp_path, options=("-a", "--numeric-ids"))
    dest = tmp_path / "web1"
    old_layout(dest)
    real_rename, calls = os.rename, []

    def failing_rename(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(b.os, "rename", failing_rename)
    result = b.pull_all([host], dry_run=False, out=io.StringIO(), err=io.StringIO())
    assert result == ["web1"]
    monkeypatch.setattr(b.os, "rename", real_rename)
    record = json.loads((store.state_dir(host) / "migration.json").read_text())
    staging = dest / record["staging"]
    assert len(os.listdir(staging)) == 2 and len(os.listdir(dest)) == 3  # 2 moved, 2 left
    assert (dest.stat().st_mode & 0o7777) == 0o700
    with pytest.raises(restore.RestoreError, match="interrupted"):
        restore.backup_root(host, None)
    result = b.run_backup(host, dry_run=False, tty=False)
    assert result.ok, result.error
    assert os.listdir(dest) == ["tree"]
    assert sorted(os.listdir(dest / "tree")) == ["change", "etc", "keep", "link", "setuid",
                                                 "tree"]
    assert not (store.state_dir(host) / "migration.json").exists()


def test_run_backup_refuses_a_group_writable_ancestor_before_writing(tmp_path, fake):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    host = make_host(tmp_path, destination=str(shared / "deeper" / "{name}"))
    err = io.StringIO()
    assert b.pull_all([host], dry_run=False, out=io.StringIO(), err=err) == ["web1"]
    assert err.getvalue().splitlines()[0] == (
        f"web1: failed: refused: {shared} is writable by its group (mode 0775): another "
        f"user could replace what lies below it; fix: chmod go-w {shared}, or choose a "
        "folder only root can write")
    assert os.listdir(shared) == []


RESTORE_TARGETS = {
    "missing: becomes the container": (None, [], False, None),
    "empty 0755: closed to 0700": (0o40755, [], False, None),
    "private, tree present, --force": (0o40700, ["tree"], True, None),
    "private, tree present": (0o40700, ["tree"], False, "exists; use --force"),
    "open and not empty": (0o40755, ["x"], True, "has mode 0755 and is not empty"),
    "a file": (0o100600, [], False, "is not a folder"),
}


@pytest.mark.parametrize("mode,names,force,why", RESTORE_TARGETS.values(),
                         ids=RESTORE_TARGETS.keys())
def test_check_restore_container(mode, names, force, why):
    problem = restore.check_restore_container(Path("/r"), names, mode, force=force)
    assert (problem is None) if why is None else (why in problem)


# --- start-up cost ----------------------------------------------------------------------------


def test_backup_import_path_has_no_ssh_library():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import roles.features.backup, roles.core.fleet"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], check=True)
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if "|" in line}
    assert "roles" in imported
    assert not imported & {"paramiko", "fabric", "cryptography", "invoke"}


# --- the tasks' input checks (no host is contacted) -------------------------------------------


def cli(tmp_path: Path, *args: str, **host) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory.yaml"
    entries = "".join(
        f"  {name}:\n    address: 192.0.2.{i + 1}\n    forced_command: {mode}\n"
        for i, (name, mode) in enumerate(host.items()))
    inventory.write_text(f"defaults:\n  admin_user: admin\n  backup_key: {tmp_path}/key\n"
                         f"  backup:\n    destination: {tmp_path}/b/{{name}}\n"
                         f"    allow_destination: {tmp_path}/b\n"
                         f"hosts:\n{entries}")
    return subprocess.run([str(Path(sys.executable).parent / "invoke"), *args,
                           "--inventory", str(inventory)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=False, timeout=60)


def test_backup_task_refuses_captured_mode_without_a_capture(tmp_path):
    result = cli(tmp_path, "backup", web2="captured")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"web2: failed: no capture record for web2 ({tmp_path}/b/web2.pullback/"
            "capture.json): run `invoke capture-command` first") in result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["web2", "failed"]
    assert not (tmp_path / "b").exists()


def test_restore_task_needs_exactly_one_host(tmp_path):
    result = cli(tmp_path, "restore", "--path", "/etc", "--to", str(tmp_path / "r"),
                 web1="daemon", web2="daemon")
    assert result.returncode == 2 and "exactly one --host" in result.stderr
    result = cli(tmp_path, "restore", "--host", "web1", "--path", "/etc/../root",
                 "--to", str(tmp_path / "r"), web1="daemon")
    assert result.returncode == 2 and "'..'" in result.stderr


def test_run_backup_refuses_a_key_others_can_read(tmp_path, fake):
    host = make_host(tmp_path)
    Path(host.backup_key).chmod(0o644)
    with pytest.raises(store.BackupError, match=r"mode 0644.*chmod 600"):
        b.run_backup(host, dry_run=False, tty=False)
    assert not (tmp_path / "web1").exists()


def test_run_backup_keeps_only_the_newest_runs_logs(tmp_path, fake):

    logs = tmp_path / "web1.pullback" / "logs"
    logs.mkdir(parents=True)
    for day in range(1, 36):  # 35 old runs, each a .log and a .json
        for suffix in (".log", ".json"):
            (logs / f"2026-10-{day:02d}T020000Z{suffix}").write_text("{}\n")
    (logs / "notes.txt").write_text("not ours\n")
    result = b.run_backup(make_host(tmp_path), dry_run=False, tty=False)
    assert result.ok
    runs = sorted({name.rsplit(".", 1)[0] for name in os.listdir(logs) if name != "notes.txt"})
    assert len(runs) == store.DEFAULT_KEEP_LOGS
    assert runs[-1] == Path(result.log_path).stem  # the run just made is kept
    assert "2026-10-01T020000Z" not in runs and (logs / "notes.txt").exists()


@pytest.mark.parametrize(("options", "expected"), [
    (("-avzx", "--numeric-ids", "--delete", "--progress"),
     ["-avzx", "--numeric-ids", "--delete", "--info=progress2"]),
    (("-aHx", "-P"), ["-aHx", "--partial", "--info=progress2"]),
    (("-a", "--info=progress2"), ["-a", "--info=progress2"]),
])
def test_a_terminal_with_new_rsyncs_shows_whole_transfer_progress(options, expected):
    host = make_host(options=options, system_exclude=())
    argv = pull.build_argv(host, dry_run=False, tty=True, local_rsync=RSYNC, dest="/d",
                        progress2=True)
    assert argv[3:-3] == expected and argv[-3] == "--stats"
    # Off a terminal progress goes whatever the versions; old rsyncs keep --progress.
    assert "--info=progress2" not in pull.build_argv(host, dry_run=False, tty=False,
                                                  local_rsync=RSYNC, dest="/d", progress2=True)


@pytest.mark.parametrize(("version", "ok"), [
    ("2.6.9", False), ("3.0.9", False), ("3.1.0", True), ("3.2.7", True), ("3.10.1", True),
    (None, False), ("", False)])
def test_progress2_needs_rsync_3_1(version, ok):
    assert pull.supports_progress2(version) is ok


def test_both_ends_checks_the_local_rsync_on_path(tmp_path):
    old = tmp_path / "rsync"
    old.write_text("#!/bin/sh\necho 'rsync  version 3.0.9  protocol version 30'\n")
    old.chmod(0o755)
    host = make_host(tmp_path)  # rsync.version 3.5.1 on the server, local build missing
    assert runner.local_rsync_version(host, str(old)) == "3.0.9"
    assert runner.both_ends_have_progress2(host, "3.0.9") is False
    assert runner.both_ends_have_progress2(host, "3.2.7") is True
    assert runner.both_ends_have_progress2(host, None) is False
    assert runner.both_ends_have_progress2(
        dataclasses.replace(host, **{"rsync": dataclasses.replace(host.rsync, **{"version": "2.6.9"})}),
        "3.5.1") is False


def stamp(host: HostSpec, version: str) -> None:
    """A pinned build in rsync.local_prefix with build-rsync's stamp for ``version``."""
    prefix = Path(host.rsync.local_prefix)
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    (prefix / "bin" / "rsync").write_text("#!/bin/sh\nexit 99\n")
    (prefix / "bin" / "rsync").chmod(0o755)
    (prefix / rsync_model.STAMP_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    (prefix / rsync_model.STAMP_RELPATH).write_text(json.dumps({"version": version}))


def test_the_pinned_build_s_version_is_its_stamp_without_a_process(tmp_path, monkeypatch):
    """A scheduled backup with the pinned build starts no `rsync --version`: the stamp says
    what was built (not rsync.version, which may be raised before the build)."""
    host = make_host(tmp_path)
    stamp(host, "3.2.7")
    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: pytest.fail("a process ran"))
    assert runner.local_rsync_version(host, host.rsync.local_binary) == "3.2.7"


def test_an_unstamped_or_unreadable_rsync_is_asked_or_unknown(tmp_path):
    host = make_host(tmp_path)
    stamp(host, "3.2.7")
    (Path(host.rsync.local_prefix) / rsync_model.STAMP_RELPATH).write_text("{not json")
    assert runner.local_rsync_version(host, host.rsync.local_binary) is None  # exit 99
    assert runner.local_rsync_version(host, str(tmp_path / "missing")) is None


@pytest.mark.parametrize(("version", "allowed", "refused"), [
    ("3.2.7", False, True), ("2.6.9", False, True), ("3.4.0", False, True),
    ("3.4.1pre1", False, True), (None, False, True),
    ("3.4.1", False, False), ("3.5.1", False, False),
    ("3.2.7", True, False), ("2.6.9", True, False), (None, True, False),
])
def test_refuse_exposed_client(tmp_path, version, allowed, refused):
    host = make_host(tmp_path)
    host = dataclasses.replace(host, **{"rsync": dataclasses.replace(host.rsync, **{"allow_vulnerable": allowed})})
    refusal = runner.refuse_exposed_client(host, "/x/rsync", version)
    assert (refusal is not None) == refused
    if refusal:
        assert "\n" not in refusal and refusal.startswith("refused: the local rsync /x/rsync ")
        assert "CVE-2024-12084..12088" in refusal and "3.4.1" in refusal
        assert "rsync.allow_vulnerable: true" in refusal and "build-rsync" in refusal
        assert (version or "cannot read") in refusal


def test_run_backup_refuses_an_old_local_rsync_before_anything(tmp_path, fake):
    host = make_host(tmp_path, snapshots=2)
    stamp(host, "3.2.7")
    with pytest.raises(store.BackupError, match=r"^refused: the local rsync .* is rsync 3\.2\.7, "
                       r"older than 3\.4\.1: .*CVE-2024-12084\.\.12088"):
        b.run_backup(host, dry_run=False, tty=False)
    assert not (tmp_path / "web1").exists()
    assert not store.state_dir(host).exists()  # no lock, no log: nothing ran
    assert not (fake.parent / "server.argv").exists()


def test_run_backup_runs_an_old_local_rsync_with_the_switch(tmp_path, fake):
    host = make_host(tmp_path)
    host = dataclasses.replace(host, **{"rsync": dataclasses.replace(host.rsync, **{"allow_vulnerable": True})})
    stamp_file = Path(host.rsync.local_prefix) / rsync_model.STAMP_RELPATH
    stamp_file.parent.mkdir(parents=True)
    stamp_file.write_text(json.dumps({"version": "2.6.9"}))  # the fake rsync stays in bin/
    result = b.run_backup(host, dry_run=False, tty=False)
    assert result.ok and result.warning is None, result


# --- the default became snapshots: a mirror's DEST/tree becomes the first snapshot ------------


def test_a_mirror_becomes_the_first_snapshot_and_is_hard_linked(tmp_path, fake):
    dest = tmp_path / "web1"
    mirror = b.run_backup(make_host(tmp_path), dry_run=False, tty=False)
    assert mirror.ok and os.listdir(dest) == ["tree"]
    tree_inode = (dest / "tree" / "keep").stat().st_ino
    mirror_run = Path(mirror.summary_path).stem
    host = make_host(tmp_path, snapshots=7)

    dry = b.run_backup(host, dry_run=True, tty=False)
    assert dry.ok and os.listdir(dest) == ["tree"]  # a dry run moves nothing
    assert f"turns the mirror {dest / 'tree'} into the first snapshot {mirror_run}" in dry.warning

    first = b.run_backup(host, dry_run=False, tty=False)
    assert first.ok, first.error
    assert f"the mirror {dest / 'tree'} became the first snapshot {mirror_run}" in first.warning
    new = Path(first.snapshot).name
    assert store.complete_snapshots(os.listdir(dest)) == [mirror_run, new]
    assert os.readlink(dest / "latest") == new and not (dest / "tree").exists()
    assert (dest / mirror_run / "keep").stat().st_ino == tree_inode  # renamed, not copied
    assert (dest / new / "keep").stat().st_ino == tree_inode  # hard-linked by --link-dest
    summary = json.loads(Path(first.summary_path).read_text())
    assert f"--link-dest={dest / mirror_run}" in summary["argv"]


@pytest.mark.parametrize("names,tree_is_dir,last,want", [
    (["tree"], True, "2026-01-02T030405Z", "2026-01-02T030405Z"),
    (["tree"], True, None, "FALLBACK"),
    (["tree", "2026-01-02T030405Z"], True, "2026-01-02T030405Z", None),  # has a snapshot
    (["tree", "2026-01-02T030405Z.partial"], True, "2026-01-02T030405Z",
     "2026-01-02T030405Z"),
    (["tree"], False, None, None),  # a file or link named tree: not a mirror
    ([], True, None, None),
])
def test_plan_tree_snapshot(names, tree_is_dir, last, want):
    assert store.plan_tree_snapshot(names, tree_is_dir=tree_is_dir, last_mirror=last,
                                    fallback="FALLBACK") == want


class Watching:
    """A fleet view that keeps what pull_all tells it (roles.cli.progress's are tested in
    tests/unit/test_progress.py)."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.events: list[tuple[str, str]] = []
        self.progress: dict[str, object] = {}
        self.closed = False

    def started(self, host):
        self.events.append(("started", host))

    def output(self, host, whole):
        from roles.core.progress import PullProgress

        self.progress[host] = progress = PullProgress(whole=whole)
        return Sink(progress)

    def finished(self, result):
        self.events.append(("ok" if result.ok else "failed", result.host))

    def close(self):
        self.closed = True


class Sink:
    def __init__(self, progress):
        self.progress = progress

    def write(self, chunk):
        self.progress.feed(chunk)

    def flush(self):
        pass


@pytest.mark.parametrize("live", [True, False])
def test_pull_all_tells_a_watch_and_feeds_it_the_progress_output(tmp_path, fake, live):
    (fake / "big").write_bytes(b"x" * 300_000)
    web1 = make_host(tmp_path)
    web2 = dataclasses.replace(web1, name="web2")
    watch = Watching(live)
    out, err = io.StringIO(), io.StringIO()
    failed = b.pull_all([web1, web2], dry_run=False, out=out, err=err, watch=watch)
    assert failed == [] and watch.closed
    assert sorted(watch.events) == [("ok", "web1"), ("ok", "web2"),
                                    ("started", "web1"), ("started", "web2")]
    argvs = (fake.parent / "server.argv").read_text()
    if live:  # the progress option kept, ssh still in batch mode, the output read
        assert argvs.count("--info=progress2") == 2 and "BatchMode=no" not in argvs
        for name in ("web1", "web2"):
            progress = watch.progress[name]
            progress.close()
            assert progress.whole and progress.files == 3 and progress.bytes >= 300_000
    else:  # no terminal: the pulls as before
        assert "progress" not in argvs and watch.progress == {}
    assert "xfr#" not in out.getvalue() + err.getvalue()  # read, never shown
