"""The card's rsync 2.6.9 on both ends: built, hardened for, pulled with, diagnosed.

The official ``rsync-2.6.9.tar.gz`` cannot be fetched offline. The shared fixture
``rsync-2.6.9-from-git.tar.gz`` is a 2.6.9 source tree made from upstream's git tag
(``PULLBACK_FIXTURES`` names its folder; by default ``shared/fixtures`` beside the
repository). It is served from a loopback mirror under upstream's layout, so the real
download-and-verify path runs; its own SHA-256 reaches ``build_everywhere`` through the
test-only ``pins`` seam, never through the inventory, and the official pin is shown to
refuse it.

One build for the whole inventory, at once: the client, a bookworm host (GCC 12) and a
trixie host (GCC 14). Both hosts carry the hostile tree of the backup tests, are set up in
daemon mode, backed up and diagnosed, then switched to captured mode, captured, backed up
and diagnosed again. Mixed ends: the 2.6.9 client against a host whose forced command runs
Debian's rsync 3.2.7, and this machine's rsync against a 2.6.9 host; both back up exactly,
and doctor names the mismatch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core import fleet
from roles.core.outcome import Outcome
from roles.core.spec import HostSpec
from roles.features import backup, capture, doctor
from roles.features import rsync_build as rb
from roles.features import setup_remote as setup
from roles.inventory.schema import load
from roles.local import capture_record, keys
from roles.remote.facts import AUTHORIZED_KEYS
from tests.integration.conftest import Lab, serve_tarballs
from tests.integration.test_backup import DATA, MOUNT, OPTIONS, SEED, assert_same

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("PULLBACK_FIXTURES", ROOT.parent / "shared" / "fixtures"))
FIXTURE = FIXTURES / "rsync-2.6.9-from-git.tar.gz"
FIXTURE_SHA256 = "eaa422948bf68b3d82a731628d9556e54d910bec8f11958bf4c57f6f1b99f81e"
VERSION = "2.6.9"
VERSION_LINE = "rsync  version 2.6.9  protocol version 29"
PINS = {**rb.KNOWN_SHA256, VERSION: FIXTURE_SHA256}  # the test-only seam
PREFIX = "/usr/local"
RELEASES = ("bookworm", "trixie")


@dataclass
class Card:
    labs: dict[str, lab.LabHost]  # release -> container
    daemon: dict[str, HostSpec]  # release -> inventory host, daemon mode
    captured: dict[str, HostSpec]  # the same hosts, captured mode
    work: Path
    inventory: dict[str, object]  # the inventory's common settings


def hosts_of(lab_env: Lab, labs: list[lab.LabHost], path: Path, **defaults) -> dict[str, HostSpec]:
    loaded = load(lab_env.inventory(labs, path=path, defaults=defaults))
    return {h.name: h for h in loaded.hosts.values()}


def failed(host: HostSpec, exc: Exception) -> Outcome:
    return Outcome(host.name, {}, error=f"{type(exc).__name__}: {exc}")


def setup_all(hosts: list[HostSpec]) -> list[Outcome]:
    return fleet.for_each(hosts, setup.setup_host, failed)


def backup_all(hosts: list[HostSpec]) -> list[backup.BackupResult]:
    return fleet.for_each(
        hosts, lambda host: backup.run_backup(host, dry_run=False, tty=False),
        lambda host, exc: backup.BackupResult(host.name, False, None, 0.0,
                                              error=f"{type(exc).__name__}: {exc}"))


def sh(host: lab.LabHost, script: str) -> bytes:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=60).stdout


def whats(report: doctor.Report, level: str | None = None) -> list[str]:
    return [f.what for f in report.findings if level is None or f.level == level]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The 2.6.9 tree under upstream's name and layout, on a loopback mirror."""
    assert FIXTURE.is_file(), (
        f"{FIXTURE} is missing: the card's rsync 2.6.9 cannot be built without it "
        "(set PULLBACK_FIXTURES to the folder that holds it)")
    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == FIXTURE_SHA256
    staged = tmp_path_factory.mktemp("fixture") / f"rsync-{VERSION}.tar.gz"
    shutil.copyfile(FIXTURE, staged)
    with serve_tarballs(tmp_path_factory.mktemp("mirror"), [staged]) as url:
        yield url


@pytest.fixture(scope="module")
def card(lab_env: Lab, source_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Card]:
    work = tmp_path_factory.mktemp("card")
    labs = lab_env.start_releases(RELEASES, "269-", tmpfs=(MOUNT,))
    started = list(labs.values())
    try:
        common = {
            "rsync": {"version": VERSION, "url": source_url, "prefix": PREFIX,
                      "local_prefix": str(work / "local")},
        }

        def inventory(name: str, mode: str) -> dict[str, HostSpec]:
            by_name = hosts_of(lab_env, started, work / f"{name}.yaml", **common,
                               forced_command=mode, backup={
                                   "destination": str(work / name / "{name}"),
                                   "source": DATA, "allow_inexact": True, "options": OPTIONS})
            return {r: by_name[labs[r].name] for r in RELEASES}

        daemon, captured = inventory("daemon", "daemon"), inventory("captured", "captured")
        keys.ensure_backup_key(Path(daemon[RELEASES[0]].backup_key))
        for host in started:
            sh(host, SEED)
        yield Card(labs, daemon, captured, work, common)
    finally:
        for host in started:
            lab_env.remove(host)


@pytest.fixture(scope="module")
def built(card: Card) -> list[rb.EndResult]:
    """build-rsync for the inventory: the client and both hosts at once."""
    return rb.build_everywhere(list(card.daemon.values()), cache_dir=card.work / "cache",
                               pins=PINS, log=lambda _: None)


@dataclass
class Run:
    setups: dict[str, Outcome]
    captures: dict[str, Outcome]
    backups: dict[str, backup.BackupResult]
    reports: dict[str, doctor.Report]


@pytest.fixture(scope="module")
def daemon_run(card: Card, built: list[rb.EndResult]) -> Run:
    assert [r.error for r in built if r.error] == []
    hosts = list(card.daemon.values())
    setups = {o.host: o for o in setup_all(hosts)}
    backups = {r.host: r for r in backup_all(hosts)}
    reports = {r.host: r for r in doctor.diagnose_all(hosts)}
    return Run(setups, {}, backups, reports)


@pytest.fixture(scope="module")
def captured_run(card: Card, daemon_run: Run) -> Run:
    hosts = list(card.captured.values())
    setups = {o.host: o for o in setup_all(hosts)}
    captures = {o.host: o for o in fleet.for_each(hosts, capture.capture_host, failed)}
    backups = {r.host: r for r in backup_all(hosts)}
    reports = {r.host: r for r in doctor.diagnose_all(hosts)}
    return Run(setups, captures, backups, reports)


# --- build-rsync ----------------------------------------------------------------------------


def test_the_official_pin_refuses_the_git_made_tree(card: Card, source_url: str):
    # Without the seam the fixture is what it is: not the release tarball, refused.
    assert rb.KNOWN_SHA256[VERSION] != FIXTURE_SHA256
    results = rb.build_everywhere([card.daemon["bookworm"]], cache_dir=card.work / "pinned",
                                  log=lambda _: None)
    assert len(results) == 1 and results[0].result is None
    assert rb.KNOWN_SHA256[VERSION] in results[0].error
    assert FIXTURE_SHA256 in results[0].error  # what the mirror served instead


def test_269_builds_on_the_client_bookworm_and_trixie_at_once(card: Card, built):
    assert {r.end: r.error for r in built if r.error} == {}
    ends = {r.end for r in built}
    assert {h.name for h in card.daemon.values()} <= ends and len(ends) == 3
    assert {(r.result.version, r.result.protocol) for r in built} == {(VERSION, 29)}
    assert {r.result.version_line for r in built} == {VERSION_LINE}
    for lab_host in card.labs.values():
        assert sh(lab_host, f"{PREFIX}/bin/rsync --version").decode().splitlines()[0] \
            == VERSION_LINE
    local = card.work / "local" / "bin" / "rsync"
    assert local.is_file() and os.access(local, os.X_OK)


# --- daemon mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES)
def test_daemon_mode_setup_backup_and_doctor(card: Card, daemon_run: Run, release):
    host, lab_host = card.daemon[release], card.labs[release]
    outcome = daemon_run.setups[host.name]
    assert outcome.error is None, outcome
    assert not any("not installed yet" in w for w in outcome.warnings), outcome.warnings
    line = sh(lab_host, f"cat {AUTHORIZED_KEYS}").decode()
    assert f'command="{PREFIX}/bin/rsync --server --daemon' in line

    result = daemon_run.backups[host.name]
    assert result.ok and result.error is None, result
    assert result.warning is None, result.warning  # the client ran the 2.6.9 build
    tree = assert_same(lab_host, DATA, Path(host.destination) / "tree")
    assert tree[b"setuid-bin"][1] == 0o4755 and tree[b"some/dir/ghost-owned"][2:4] == (4242, 4242)

    report = daemon_run.reports[host.name]
    assert report.errors == [], doctor.format_report(report)
    rsync_lines = [f.what for f in report.findings if f.check == "rsync"]
    assert f"local {host.rsync.local_binary}: rsync {VERSION}, protocol 29" in rsync_lines
    assert f"remote {PREFIX}/bin/rsync: rsync {VERSION}, protocol 29" in rsync_lines
    assert "protocols 29 and 29: the pull speaks protocol 29" in rsync_lines


def test_this_machines_rsync_pulls_from_a_269_host(lab_env: Lab, card: Card, daemon_run: Run,
                                                   tmp_path: Path):
    """The other way round: the client's own rsync (3.x) against the 2.6.9 daemon."""
    lab_host = card.labs["bookworm"]
    name = lab_host.name
    local = Path(shutil.which("rsync") or "/usr/bin/rsync")
    assert local.parent == Path("/usr/bin"), local
    host = hosts_of(lab_env, [lab_host], tmp_path / "reverse.yaml", rsync={
        **card.inventory["rsync"], "local_prefix": "/usr"}, backup={
        "destination": str(tmp_path / "{name}"), "source": DATA, "allow_inexact": True, "options": OPTIONS})[name]
    result = backup.run_backup(host, dry_run=False, tty=False)
    assert result.ok and result.error is None, result
    assert_same(lab_host, DATA, Path(host.destination) / "tree")
    report = doctor.diagnose(host)
    warned = whats(report, "warn")
    assert any(w.startswith("the ends run different rsync releases: local 3.")
               and w.endswith(", remote 2.6.9") for w in warned), warned


def test_the_default_options_of_a_269_pin_run_on_269_ends(lab_env: Lab, card: Card,
                                                          daemon_run: Run, tmp_path: Path):
    """No backup.options with rsync.version 2.6.9: -avzx -HS (no -A/-X, which 2.6.9 lacks),
    and both 2.6.9 ends take them."""
    lab_host = card.labs["bookworm"]
    host = hosts_of(lab_env, [lab_host], tmp_path / "defaults.yaml", **card.inventory,
                    backup={"destination": str(tmp_path / "{name}"), "source": DATA}
                    )[lab_host.name]
    assert host.backup.options == ("-avzx", "-HS", "--numeric-ids", "--delete", "--progress")
    result = backup.run_backup(host, dry_run=False, tty=False)
    assert result.ok and result.error is None, result
    assert result.warning is None, result.warning  # the 2.6.9 build on both ends
    assert_same(lab_host, DATA, Path(host.destination) / "tree")


# --- captured mode --------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES)
def test_captured_mode_setup_capture_backup_and_doctor(card: Card, captured_run: Run,
                                                       release):
    host, lab_host = card.captured[release], card.labs[release]
    assert captured_run.setups[host.name].error is None, captured_run.setups[host.name]
    outcome = captured_run.captures[host.name]
    assert outcome.error is None, outcome
    assert outcome.warnings == (), outcome.warnings
    record = capture_record.load_record(host)
    assert record is not None
    # 2.6.9 sends its own short form: no -e.iLsfxCIvu capability string of 3.x.
    assert record.command.startswith(f"{PREFIX}/bin/rsync --server --sender -vlHogDtprxz "), \
        record.command
    assert (record.local_version, record.remote_version) == (VERSION_LINE, VERSION_LINE)

    result = captured_run.backups[host.name]
    assert result.ok and result.error is None, result
    assert_same(lab_host, DATA, Path(host.destination) / "tree")

    report = captured_run.reports[host.name]
    assert report.errors == [], doctor.format_report(report)
    rsync_lines = [f.what for f in report.findings if f.check == "rsync"]
    assert f"remote {PREFIX}/bin/rsync: rsync {VERSION}, protocol 29" in rsync_lines


# --- mixed ends -----------------------------------------------------------------------------


def test_a_269_client_pulls_from_a_host_running_debians_327(lab_env: Lab, card: Card,
                                                            built, tmp_path: Path):
    """The 2.6.9 client against Debian's rsync 3.2.7 (/usr/bin/rsync) in the forced command."""
    lab_host = lab_env.start("269-mixed", tmpfs=(MOUNT,))
    try:
        sh(lab_host, SEED)
        (host,) = hosts_of(lab_env, [lab_host], tmp_path / "mixed.yaml", rsync={
            **card.inventory["rsync"], "prefix": "/usr"}, backup={
            "destination": str(tmp_path / "{name}"), "source": DATA,
            "allow_inexact": True, "options": OPTIONS}).values()
        outcome = setup.setup_host(host)
        assert outcome.error is None, outcome
        result = backup.run_backup(host, dry_run=False, tty=False)
        assert result.ok and result.error is None, result
        assert_same(lab_host, DATA, Path(host.destination) / "tree")
        report = doctor.diagnose(host)
        assert report.errors == [], doctor.format_report(report)
        warned = whats(report, "warn")
        assert "the ends run different rsync releases: local 2.6.9, remote 3.2.7" in warned
        # Debian's 3.2.7 reports protocol 32 (a patched build), upstream's 31.
        assert any(re.fullmatch(r"protocols 29 and 3[12]: the pull speaks protocol 29", w)
                   for w in warned), warned
    finally:
        lab_env.remove(lab_host)
