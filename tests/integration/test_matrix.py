"""The remote OS matrix: one lab host per Debian release, converged and backed up at once.

Bullseye (OpenSSH 8.4), bookworm (9.2) and trixie (10.0: sshd split into sshd,
sshd-session and sshd-auth; no DSA) each get a container from their own debootstrap image
(built on first use, about a minute each). One inventory covers all of them, and every
step runs for the whole fleet in ONE call, concurrently, as the tasks do:
build-rsync (the same upstream 3.2.7 on every host and on the client, from a loopback
mirror serving Debian's byte-identical orig tarball), setup-remote (twice: the second run
must change nothing anywhere), and a daemon-mode backup of /etc compared path by path.
Then every host is switched to captured mode (a second inventory, its own destinations, so
the daemon copies stay as they are): setup-remote installs no key for captured mode,
capture-command records what the matrix build sends and installs the gate, a captured-mode
backup of /etc is compared path by path again, and one more setup-remote changes nothing.

``PULLBACK_MATRIX=bookworm`` (comma-separated) runs a subset locally; CI runs all three.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import hosts as lab
from lab import mirror
from roles.core import fleet, hardened, platforms, pull
from roles.core.outcome import Outcome
from roles.core.spec import HostSpec
from roles.features import backup, capture
from roles.features import rsync_build as rb
from roles.features import setup_remote as setup
from roles.inventory.schema import load
from roles.local import capture_record, keys
from roles.remote.facts import (
    AUTHORIZED_KEYS,
    PULLBACK_RSYNCD_CONF,
    RSYNCD_CONF,
    SSHD_CONFIG,
    gather,
)
from roles.remote.session import connect
from tests.integration.conftest import Lab, infra_host, serve_tarballs
from tests.integration.test_backup import local_tree, remote_tree
from tests.integration.test_setup_remote import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.matrix]

VERSION = "3.2.7"
VERSION_LINE = f"rsync  version {VERSION}  protocol version 31"
PREFIX = "/usr/local"
FORCED = f"{PREFIX}/bin/rsync --server --daemon --config={PULLBACK_RSYNCD_CONF} ."
SOURCE = "/etc"
OPTIONS = ["-aHx", "--numeric-ids", "--delete"]
WATCHED = (SSHD_CONFIG, AUTHORIZED_KEYS, PULLBACK_RSYNCD_CONF)  # /etc/rsyncd.conf: never written
# Captured mode adds pullback's own root-only folders and scripts on the host.
CAPTURED_WATCHED = (*WATCHED, "/root/.ssh", hardened.LIBEXEC, hardened.GATE,
                    hardened.CAPTURE_SCRIPT, hardened.REMOTE_STATE, hardened.CAPTURED_FILE)
DEBIAN_VERSION = {"bullseye": "11.", "bookworm": "12.", "trixie": "13."}


def selected_releases() -> list[str]:
    text = os.environ.get("PULLBACK_MATRIX", "").strip()
    if not text:
        return list(lab.RELEASES)
    chosen = lab.parse_releases(text)
    unknown = [r for r in chosen if r not in lab.RELEASES]
    if unknown:
        raise pytest.UsageError(
            f"PULLBACK_MATRIX names {', '.join(unknown)}; the matrix knows {', '.join(lab.RELEASES)}"
        )
    return chosen


RELEASES = selected_releases()


@dataclass
class Matrix:
    hosts: dict[str, HostSpec]  # release -> inventory host
    captured: dict[str, HostSpec]  # release -> the same host in captured mode
    labs: dict[str, lab.LabHost]
    work: Path
    timings: dict[str, float]


def timed(timings: dict[str, float], label: str, work: Any) -> Any:
    started = time.monotonic()
    try:
        return work()
    finally:
        timings[label] = round(time.monotonic() - started, 1)
        print(f"\nmatrix: {label}: {timings[label]} s")


def sh(host: lab.LabHost, script: str) -> bytes:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=60).stdout


def sighups(host: lab.LabHost) -> int:
    out = lab.engine("logs", host.name)
    return (out.stdout + out.stderr).decode(errors="replace").count("Received SIGHUP")


def watched(host: lab.LabHost) -> str:
    return sh(host, "sha256sum " + " ".join(WATCHED) + "; stat -c '%n %a %u %g' "
              + " ".join(WATCHED) + " /root/.ssh").decode()


def client_addr(host: HostSpec) -> str:
    conn = connect(host)
    try:
        return conn.run('printf %s "$SSH_CONNECTION"').stdout.split()[0]
    finally:
        conn.close()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Upstream's rsync-3.2.7.tar.gz (Debian's orig, byte-identical) on a loopback mirror."""
    tarball = mirror.fetch_debian_orig(VERSION, lab.STATE / "cache")
    with serve_tarballs(tmp_path_factory.mktemp("mirror"), [tarball]) as url:
        yield url


@pytest.fixture(scope="module")
def matrix(lab_env: Lab, source_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """One container per release, started (and its image built) concurrently."""
    work = tmp_path_factory.mktemp("matrix")
    timings: dict[str, float] = {}
    labs = timed(timings, "images + containers", lambda: lab_env.start_releases(RELEASES))
    started = list(labs.values())
    try:
        def inventory(name: str, mode: str) -> dict[str, HostSpec]:
            path = lab_env.inventory(started, path=work / f"{name}.yaml", defaults={
                "forced_command": mode,
                "rsync": {"version": VERSION, "url": source_url, "prefix": PREFIX,
                          "local_prefix": str(work / "local")},
                "backup": {"destination": str(work / name / "{name}"), "source": SOURCE,
                           "allow_inexact": True, "options": OPTIONS},
            })
            loaded = load(path)
            return {r: loaded.hosts[labs[r].name] for r in RELEASES}

        hosts, captured = inventory("backups", "daemon"), inventory("captured", "captured")
        keys.ensure_backup_key(Path(hosts[RELEASES[0]].backup_key))
        yield Matrix(hosts, captured, labs, work, timings)
    finally:
        print(f"\nmatrix timings: {timings}")
        for host in started:
            lab_env.remove(host)


@pytest.fixture(scope="module")
def built(matrix: Matrix) -> list[rb.EndResult]:
    """`build-rsync` for the whole inventory: every host and the client, concurrently."""
    return timed(matrix.timings, "build-rsync", lambda: rb.build_everywhere(
        list(matrix.hosts.values()), cache_dir=matrix.work / "cache", log=lambda _: None))


def failed(host: HostSpec, exc: Exception) -> Outcome:
    return Outcome(host.name, {}, error=f"{type(exc).__name__}: {exc}")


def setup_all(hosts: dict[str, HostSpec]) -> dict[str, Outcome]:
    outcomes = fleet.for_each(list(hosts.values()), setup.setup_host, failed)
    return {o.host: o for o in outcomes}


def backup_all(hosts: dict[str, HostSpec]) -> dict[str, backup.BackupResult]:
    results = fleet.for_each(
        list(hosts.values()),
        lambda host: backup.run_backup(host, dry_run=False, tty=False),
        lambda host, exc: backup.BackupResult(host.name, False, None, 0.0,
                                              error=f"{type(exc).__name__}: {exc}"))
    return {r.host: r for r in results}


@dataclass
class Converged:
    first: dict[str, Outcome]
    second: dict[str, Outcome]
    before: dict[str, tuple[str, int]]  # release -> (watched files, SIGHUPs) after run 1
    after: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def converged(matrix: Matrix, built: list[rb.EndResult]) -> Converged:
    """setup-remote over the fleet, then once more."""
    assert all(r.error is None for r in built), [r.error for r in built if r.error]
    first = timed(matrix.timings, "setup-remote", lambda: setup_all(matrix.hosts))
    before = {r: (watched(h), sighups(h)) for r, h in matrix.labs.items()}
    second = timed(matrix.timings, "setup-remote again", lambda: setup_all(matrix.hosts))
    after = {r: (watched(h), sighups(h)) for r, h in matrix.labs.items()}
    return Converged(first, second, before, after)


@pytest.fixture(scope="module")
def backed_up(matrix: Matrix, converged: Converged) -> dict[str, backup.BackupResult]:
    assert all(o.error is None for o in converged.first.values())
    return timed(matrix.timings, "backup", lambda: backup_all(matrix.hosts))


def pull_uncaptured(host: HostSpec, dest: Path) -> subprocess.CompletedProcess:
    """A captured-mode pull (``root@ADDR:/etc/``) with the backup key, exactly as backup
    would run it, before any capture: whatever key line the host has must not serve it."""
    argv = pull.build_argv(host, dry_run=False, tty=False,
                             local_rsync=host.rsync.local_binary, dest=str(dest))
    return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


@dataclass
class Switched:
    """Every release switched to captured mode after its daemon-mode backup."""
    daemon_copies: dict[str, dict]  # release -> local_tree of the daemon copy, before
    first_setup: dict[str, Outcome]  # setup-remote in captured mode, no capture yet
    before_setup: dict[str, dict[str, str]]  # release -> snapshot of CAPTURED_WATCHED
    after_setup: dict[str, dict[str, str]]
    uncaptured: dict[str, subprocess.CompletedProcess]  # a captured-mode pull, then
    captures: dict[str, Outcome]  # capture-command
    records: dict[str, capture_record.CaptureRecord | None]
    backups: dict[str, backup.BackupResult]
    again: dict[str, Outcome]  # setup-remote once more, after the capture
    before_again: dict[str, tuple[dict[str, str], int]]  # (snapshot, SIGHUPs)
    after_again: dict[str, tuple[dict[str, str], int]]


@pytest.fixture(scope="module")
def switched(matrix: Matrix, backed_up: dict[str, backup.BackupResult]) -> Switched:
    """setup-remote, capture-command, backup and setup-remote again, all in captured mode."""
    hosts, labs, timings = matrix.captured, matrix.labs, matrix.timings
    daemon_copies = {r: local_tree(Path(h.destination) / "tree")[0]
                     for r, h in matrix.hosts.items()}
    before_setup = {r: snapshot(h, CAPTURED_WATCHED) for r, h in labs.items()}
    first = timed(timings, "captured: setup-remote", lambda: setup_all(hosts))
    after_setup = {r: snapshot(h, CAPTURED_WATCHED) for r, h in labs.items()}
    uncaptured = timed(timings, "captured: pull before capture", lambda: dict(zip(
        RELEASES, fleet.for_each(
            list(hosts.values()),
            lambda h: pull_uncaptured(h, matrix.work / "uncaptured" / h.name),
            lambda h, exc: subprocess.CompletedProcess([], -1, "", f"{exc}")),
        strict=True)))
    # capture-command's per-host entry, on the fleet as the task runs it.
    captured = timed(timings, "captured: capture-command", lambda: {
        o.host: o for o in fleet.for_each(list(hosts.values()), capture.capture_host,
                                          failed)})
    records = {r: capture_record.load_record(h) for r, h in hosts.items()}
    backups = timed(timings, "captured: backup", lambda: backup_all(hosts))
    before_again = {r: (snapshot(h, CAPTURED_WATCHED), sighups(h)) for r, h in labs.items()}
    again = timed(timings, "captured: setup-remote again", lambda: setup_all(hosts))
    after_again = {r: (snapshot(h, CAPTURED_WATCHED), sighups(h)) for r, h in labs.items()}
    return Switched(daemon_copies, first, before_setup, after_setup, uncaptured, captured,
                    records, backups, again, before_again, after_again)


def assert_exact_copy(lab_host: lab.LabHost, dest: Path) -> dict:
    """``dest`` holds the host's SOURCE path by path (``find -xdev``, as ``rsync -x``)."""
    mine, theirs = local_tree(dest)[0], remote_tree(lab_host, SOURCE, xdev=True)[0]
    assert sorted(mine) == sorted(theirs)
    different = {rel: (theirs[rel], mine[rel]) for rel in theirs if mine[rel] != theirs[rel]}
    assert different == {}
    return mine


# --- build-rsync ----------------------------------------------------------------------------


def test_the_same_rsync_is_built_on_every_release_and_the_client(matrix: Matrix, built):
    errors = {r.end: r.error for r in built if r.error}
    assert errors == {}
    ends = {r.end for r in built}
    assert {h.name for h in matrix.hosts.values()} <= ends
    assert len(ends) == len(matrix.hosts) + 1  # one local end for the shared local prefix
    assert {r.result.version for r in built if r.result} == {VERSION}
    assert {r.result.protocol for r in built if r.result} == {31}
    local = matrix.work / "local" / "bin" / "rsync"
    assert local.is_file() and os.access(local, os.X_OK)


# --- setup-remote ---------------------------------------------------------------------------


def test_one_run_converges_every_release(matrix: Matrix, converged: Converged):
    for release, host in matrix.hosts.items():
        outcome = converged.first[host.name]
        assert outcome.error is None, (release, outcome)
        assert outcome.steps == {"sshd_config": "changed", "authorized_keys": "changed",
                                 "rsyncd.conf": "changed"}, release
        assert outcome.actions == ("reloaded sshd",), release
        # The pinned build serves the forced command: no "not installed yet" fallback.
        assert not any("not installed yet" in w for w in outcome.warnings), outcome.warnings


def test_a_second_run_changes_nothing_on_any_release(matrix: Matrix, converged: Converged):
    for release, host in matrix.hosts.items():
        outcome = converged.second[host.name]
        assert outcome.error is None, (release, outcome)
        assert set(outcome.steps.values()) == {"ok"}, (release, outcome.steps)
        assert outcome.actions == () and outcome.diffs == (), release
        assert converged.after[release] == converged.before[release], release  # no reload


@pytest.mark.parametrize("release", RELEASES)
def test_facts_pick_the_tested_platform_row(matrix: Matrix, converged: Converged, release):
    """The table's row for this release agrees with what the host itself reports."""
    host = matrix.hosts[release]
    conn = connect(host)
    try:
        facts = gather(conn, [host.rsync.remote_binary])
    finally:
        conn.close()
    row = facts.platform
    assert (row.name, row.tested) == (f"debian-{release}", True)
    assert facts.openssh == row.openssh
    assert facts.sshd == row.sshd
    assert facts.pidfile == row.pidfile == facts.effective["pidfile"]
    assert row.restrict and platforms.supports_restrict(facts.openssh)
    assert facts.service is None  # no systemd in the lab: setup reloads through the pidfile
    assert facts.rsync[f"{PREFIX}/bin/rsync"] == VERSION_LINE


@pytest.mark.parametrize("release", RELEASES)
def test_end_state_with_testinfra(lab_env: Lab, matrix: Matrix, converged: Converged,
                                  release):
    host, lab_host = matrix.hosts[release], matrix.labs[release]
    row = platforms.lookup("debian", release)
    assert row is not None
    infra = infra_host(lab_env, lab_host)
    for binary in row.sshd_binaries:  # trixie: sshd-session and sshd-auth too
        f = infra.file(binary)
        assert f.is_file and f.user == "root" and f.mode & 0o111, binary
    spec = platforms.connection_spec(client_addr(host))
    settings = infra.check_output(f"{row.sshd} -T -C {spec}").splitlines()
    assert "permitrootlogin forced-commands-only" in settings
    root_ssh = infra.file("/root/.ssh")
    assert (root_ssh.mode, root_ssh.user, root_ssh.group) == (0o700, "root", "root")
    authorized = infra.file(AUTHORIZED_KEYS)
    assert (authorized.mode, authorized.user, authorized.group) == (0o600, "root", "root")
    key_type, blob = Path(host.backup_pubkey).read_text().split()[:2]
    assert authorized.content_string == (
        f'restrict,command="{FORCED}",from="{client_addr(host)}",no-port-forwarding,'
        f"no-agent-forwarding,no-X11-forwarding,no-pty {key_type} {blob} pullback-backup\n")
    assert not infra.file(RSYNCD_CONF).exists  # the shared file is never written
    conf = infra.file(PULLBACK_RSYNCD_CONF)
    assert (conf.mode, conf.user, conf.group) == (0o600, "root", "root")
    expected = sh(matrix.labs[RELEASES[0]], f"cat {PULLBACK_RSYNCD_CONF}")
    assert conf.content == expected  # the same module text on every release
    assert b"uid = 0" in expected and b"read only = yes" in expected
    assert infra.check_output(f"{PREFIX}/bin/rsync --version").splitlines()[0] == VERSION_LINE


# --- backup ---------------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES)
def test_daemon_backup_of_etc_is_exact(matrix: Matrix, backed_up, release):
    host, lab_host = matrix.hosts[release], matrix.labs[release]
    result = backed_up[host.name]
    assert result.ok and result.error is None, result
    assert result.warning is None, result.warning  # the local end used the matrix build
    dest = Path(host.destination) / "tree"
    mine = assert_exact_copy(lab_host, dest)
    # It is this release's /etc (each host went to its own destination), and root-only
    # files came along: the daemon reads as uid 0.
    assert (dest / "debian_version").read_text().startswith(DEBIAN_VERSION[release])
    assert mine[b"shadow"][1] == 0o640 and mine[b"shadow"][6] is not None
    assert mine[b"ssh/ssh_host_ed25519_key"][1:3] == (0o600, 0)


# --- captured mode --------------------------------------------------------------------------


def test_captured_setup_installs_no_usable_key_before_a_capture(matrix: Matrix,
                                                                switched: Switched):
    for release, host in matrix.captured.items():
        outcome = switched.first_setup[host.name]
        assert outcome.error is None, (release, outcome)
        # The key's daemon-mode line goes (the key must grant nothing before a capture);
        # daemon mode's /etc/pullback/rsyncd.conf goes too; no gate, no reload.
        assert outcome.steps == {"sshd_config": "ok", "authorized_keys": "removed",
                                 "rsyncd.conf": "removed"}, release
        assert outcome.actions == () and outcome.diffs == (), release
        assert "no captured command yet: the backup key's earlier line was removed; run " \
            "`invoke capture-command`" in outcome.warnings, (release, outcome.warnings)
        before, after = switched.before_setup[release], switched.after_setup[release]
        changed = (AUTHORIZED_KEYS, PULLBACK_RSYNCD_CONF)
        assert {k: v for k, v in after.items() if k not in changed} == \
            {k: v for k, v in before.items() if k not in changed}, release
        assert after[AUTHORIZED_KEYS] != before[AUTHORIZED_KEYS], release
        assert after[PULLBACK_RSYNCD_CONF] == "missing", release
        assert after[hardened.GATE] == "missing", release
        # With no line the key is refused outright, and nothing arrives.
        pulled = switched.uncaptured[release]
        assert pulled.returncode not in pull.OK_CODES, (release, pulled.stderr)
        assert "Permission denied" in pulled.stderr, (release, pulled.stderr)
        assert not any((matrix.work / "uncaptured" / host.name).glob("*")), release


def test_capture_records_the_matrix_rsync_on_every_release(matrix: Matrix,
                                                          switched: Switched):
    for release, host in matrix.captured.items():
        outcome = switched.captures[host.name]
        assert outcome.error is None, (release, outcome)
        assert outcome.steps == {
            "capture-script": "changed", "capture": "ok", "capture-dry-run": "ok",
            "gate": "changed", "authorized_keys": "changed", "record": "written",
            "proof-dry-run": "ok"}, release
        # Both ends run the matrix build: no "not installed"/"not built" fallback.
        assert outcome.warnings == (), (release, outcome.warnings)
        record = switched.records[release]
        assert record is not None, release
        assert record.command.startswith(f"{PREFIX}/bin/rsync --server --sender -"), \
            (release, record.command)
        assert record.command.endswith(f" . {SOURCE}/"), (release, record.command)
        assert record.dry_run_command.startswith(f"{PREFIX}/bin/rsync --server --sender -")
        assert (record.remote_rsync, record.remote_version) == (f"{PREFIX}/bin/rsync",
                                                                VERSION_LINE), release
        assert (record.local_rsync, record.local_version) == (host.rsync.local_binary,
                                                              VERSION_LINE), release
        assert f"runs: {record.command}" in outcome.actions, release
        state = switched.before_again[release][0]
        assert state[hardened.GATE].endswith(" 700 0 0"), (release, state)
        assert state[hardened.CAPTURED_FILE] == "missing", release  # read, then removed
        assert sh(matrix.labs[release], f"cat {AUTHORIZED_KEYS}").startswith(
            f'restrict,command="{hardened.GATE}",'.encode()), release
    # The same rsync on every end sends the same command to every release.
    recorded = {r.sent for r in switched.records.values() if r is not None}
    assert len(recorded) == 1, recorded


@pytest.mark.parametrize("release", RELEASES)
def test_captured_backup_of_etc_is_exact(matrix: Matrix, switched: Switched, release):
    host, lab_host = matrix.captured[release], matrix.labs[release]
    result = switched.backups[host.name]
    assert result.ok and result.error is None, result
    assert result.warning is None, result.warning
    dest = Path(host.destination) / "tree"
    assert dest != Path(matrix.hosts[release].destination) / "tree"
    mine = assert_exact_copy(lab_host, dest)
    assert (dest / "debian_version").read_text().startswith(DEBIAN_VERSION[release])
    # The gate runs the sender as root: root-only files came along.
    assert mine[b"shadow"][1] == 0o640 and mine[b"shadow"][6] is not None
    assert mine[b"ssh/ssh_host_ed25519_key"][1:3] == (0o600, 0)
    # The daemon-mode copy was not touched by the switch.
    daemon_dest = Path(matrix.hosts[release].destination) / "tree"
    assert local_tree(daemon_dest)[0] == switched.daemon_copies[release]


def test_a_second_captured_setup_changes_nothing_on_any_release(matrix: Matrix,
                                                                switched: Switched):
    for release, host in matrix.captured.items():
        outcome = switched.again[host.name]
        assert outcome.error is None, (release, outcome)
        assert outcome.steps == {"sshd_config": "ok", "authorized_keys": "ok", "gate": "ok",
                                 "folders": "ok"}, (release, outcome.steps)
        assert outcome.actions == () and outcome.diffs == (), release
        assert outcome.warnings == (), (release, outcome.warnings)
        assert switched.after_again[release] == switched.before_again[release], release
