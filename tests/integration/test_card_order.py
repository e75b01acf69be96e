"""The card's order on a real lab host: setup-remote first, then build-rsync.

Run first, setup-remote can only name the host's own rsync (/usr/bin/rsync) in the forced
command, with a warning. build-rsync then installs the pinned build and points the forced
command at it, so the end state is the same as in the other order: doctor, verify and the
real pull agree. A forced command left on another rsync once the build exists (what older
releases left behind) is an error for doctor and a failure for verify alike, and a second
build-rsync (its build already there) mends it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import hosts as lab
from lab import mirror
from roles.core import hardened
from roles.core.spec import HostSpec
from roles.features import backup, doctor
from roles.features import rsync_build as rb
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import keys
from tests.integration.conftest import Lab, invoke, serve_tarballs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VERSION = "3.2.7"
PINNED = "/usr/local/bin/rsync"
FORCED_CHECK = "the forced command runs the pinned rsync (rsync.prefix/bin/rsync)"


@dataclass
class Card:
    lab: lab.LabHost
    host: HostSpec
    inventory: Path
    work: Path


def key_line(card: Card) -> str:
    return lab.engine("exec", card.lab.name, "cat", hardened.AUTHORIZED_KEYS).stdout.decode()


def verify(card: Card) -> tuple[int, dict[str, str]]:
    result = invoke("verify", "--inventory", str(card.inventory), timeout=180)
    rows = {}
    for line in result.stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[1] in ("PASS", "FAIL", "SKIP", "ERROR"):
            check = FORCED_CHECK if fields[2].startswith(FORCED_CHECK) else fields[2]
            rows[check] = fields[1]
    return result.returncode, rows


def dry_run(card: Card) -> dict[str, str]:
    """``invoke build-rsync --dry-run``: end -> what it says."""
    result = invoke("build-rsync", "--dry-run", "--inventory", str(card.inventory), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.split(None, 1)[0]: line.split(None, 1)[1].strip()
            for line in result.stdout.splitlines() if line.strip()}


def build(card: Card) -> list[rb.EndResult]:
    lines: list[str] = []
    results = rb.build_everywhere([card.host], cache_dir=card.work / "cache", log=lines.append)
    assert [r.error for r in results if r.error] == [], lines
    return results


@pytest.fixture(scope="module")
def card(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Card]:
    work = tmp_path_factory.mktemp("card-order")
    tarball = mirror.fetch_debian_orig(VERSION, lab.STATE / "cache")
    host = lab_env.start("card-order")
    try:
        with serve_tarballs(work / "mirror", [tarball]) as url:
            inventory = lab_env.inventory([host], path=work / "inventory.yaml", defaults={
                "rsync": {"version": VERSION, "url": url,
                          "prefix": "/usr/local", "local_prefix": str(work / "local")},
                "backup": {"destination": str(work / "backups" / "{name}"), "source": "/etc",
                           "allow_inexact": True, "options": ["-aHx", "--numeric-ids", "--delete"]},
            })
            h = load(inventory).hosts[host.name]
            keys.ensure_backup_key(Path(h.backup_key))
            yield Card(host, h, inventory, work)
    finally:
        lab_env.remove(host)


def test_setup_first_then_build_ends_where_build_first_would(card: Card):
    # 1. setup-remote before any build: the host's own rsync, said so.
    outcome = setup_host(card.host)
    assert outcome.error is None, outcome
    assert any(f"{PINNED} is not installed yet" in w for w in outcome.warnings), outcome
    assert 'command="/usr/bin/rsync --server --daemon' in key_line(card)

    # 2. build-rsync --dry-run says what would happen and does none of it.
    planned = dry_run(card)
    assert planned[card.lab.name].startswith(f"would build rsync {VERSION} into /usr/local "), \
        planned
    assert planned["local"].startswith(f"would build rsync {VERSION} into "), planned
    assert not (card.work / "local").exists()
    assert 'command="/usr/bin/rsync --server --daemon' in key_line(card)

    # 3. build-rsync: both ends get the pinned build, and the key line follows it.
    results = build(card)
    assert {r.result.version for r in results} == {VERSION}
    assert f'command="{hardened.daemon_command(PINNED)}"' in key_line(card)

    assert set(dry_run(card).values()) == {f"ok      rsync  version {VERSION}  protocol "
                                           "version 31"}

    # 4. doctor, verify and the pull agree.
    report = doctor.diagnose(card.host)
    assert report.errors == [], doctor.format_report(report)
    code, rows = verify(card)
    assert code == 0 and rows[FORCED_CHECK] == "PASS", rows
    result = backup.run_backup(card.host, dry_run=False, tty=False)
    assert result.ok, result
    assert (Path(card.host.destination) / "tree" / "hostname").is_file()
    # 5. setup-remote again: nothing left to change.
    again = setup_host(card.host)
    assert again.error is None and set(again.steps.values()) <= {"ok"}, again


def test_a_forced_command_left_on_another_rsync_is_found_and_mended(card: Card):
    # What an older release left behind: the build is there, the key still runs Debian's.
    lab.engine("exec", card.lab.name, "sed", "-i", f"s#{PINNED} --server#/usr/bin/rsync "
               "--server#", hardened.AUTHORIZED_KEYS)
    assert 'command="/usr/bin/rsync --server --daemon' in key_line(card)
    report = doctor.diagnose(card.host)
    assert [f.what for f in report.errors] == [
        f"the forced command runs /usr/bin/rsync, not the pinned build {PINNED}"], \
        doctor.format_report(report)
    code, rows = verify(card)
    assert code != 0 and rows[FORCED_CHECK] == "FAIL", rows

    build(card)  # the build is already there: only the key line changes
    assert f'command="{hardened.daemon_command(PINNED)}"' in key_line(card)
    assert doctor.diagnose(card.host).errors == []
    code, rows = verify(card)
    assert code == 0 and rows[FORCED_CHECK] == "PASS", rows
