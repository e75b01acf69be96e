"""Inventories a person really writes: empty values, YAML merge keys, other encodings.

Each case is loaded by the real tasks (``invoke status``, ``invoke backup --dry-run``) and by
``pullback-backup``, as subprocesses: one line ``FILE:LINE: ...`` on stderr and exit 2 (never
a traceback), or, for merge keys, a working inventory. No host is contacted: the inventories
point at TEST-NET addresses and the failures happen while loading.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from roles.inventory.schema import InventoryError, load_text

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "    address: 192.0.2.1\n    admin_user: u\n    backup_key: /k\n"

# (name, inventory text, the line wanted on stderr after "FILE:")
BROKEN = [
    ("empty-hosts", "hosts:\n",
     "1: hosts: must be a non-empty mapping of host name -> settings"),
    ("empty-host", "hosts:\n  web1:\n",
     "2: hosts.web1: has no settings: give at least its address: (admin_user and backup_key "
     "here or under defaults:)"),
    ("empty-from", "hosts:\n  web1:\n" + HOST + "    from:\n",
     "6: hosts.web1.from: has no value: write one, or delete the line for the default"),
    ("empty-section", "hosts:\n  web1:\n" + HOST + "    backup:\n",
     "6: hosts.web1.backup: has no value: write one, or delete the line for the default"),
    ("empty-nested", "hosts:\n  web1:\n" + HOST + "    rsync:\n      version:\n",
     "7: hosts.web1.rsync.version: has no value: write one, or delete the line for the "
     "default"),
    ("empty-list-item", "hosts:\n  web1:\n" + HOST + "    backup:\n      exclude:\n        -\n",
     "8: hosts.web1.backup.exclude[0]: has no value: write one, or delete the line for the "
     "default"),
    ("empty-default", "defaults:\n  port:\nhosts:\n  web1:\n" + HOST,
     "2: defaults.port: has no value: write one, or delete the line for the default"),
    ("not-utf8", b"hosts:\n  web1:\n    address: caf\xe9\n".decode("latin-1"),
     "3: not UTF-8: byte 0xe9 at column 17 (save the file as UTF-8)"),
    ("merge-not-a-mapping", "hosts:\n  web1:\n    <<: 5\n" + HOST,
     "3: a merge key '<<' takes a mapping (an alias such as *defaults) or a list of them"),
    ("recursive-alias", "hosts: &a\n  web1: *a\n",
     "1: an alias refers to itself (recursive anchor)"),
    ("list-key", "hosts:\n  ? [a, b]\n  : {address: 192.0.2.1}\n",
     "2: a key must be a plain word"),
    ("control-character", "hosts:\n  web1:\x01 x\n",
     "2: not valid YAML: special characters are not allowed"),
    ("unknown-tag", "hosts:\n  web1:\n" + HOST + "    port: !shell 22\n",
     "6: not a value pullback reads: could not determine a constructor for the tag '!shell'"),
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text.encode("latin-1" if name == "not-utf8" else "utf-8"))
    return path


def run(*argv: str, home: Path) -> subprocess.CompletedProcess:
    # A private HOME: the compiled inventory's cache of pullback-backup and backup lands
    # there, not in the caller's.
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(home)})


@pytest.mark.parametrize(("name", "text", "wanted"), BROKEN, ids=[b[0] for b in BROKEN])
@pytest.mark.parametrize("command", ["status", "backup", "pullback-backup"])
def test_a_broken_inventory_is_one_line_and_exit_2(tmp_path, name, text, wanted, command):
    path = write(tmp_path, name, text)
    argv = ([str(BIN / "pullback-backup"), "--inventory", str(path), "--dry-run"]
            if command == "pullback-backup" else
            [str(BIN / "invoke"), command, "--inventory", str(path)]
            + (["--dry-run"] if command == "backup" else []))
    result = run(*argv, home=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr == f"{path}:{wanted}\n", result.stderr
    assert "Traceback" not in result.stdout + result.stderr


MERGED = """\
defaults:
  admin_user: u
  backup_key: /k
hosts:
  web1: &web
    address: 192.0.2.1
    port: 2222
    backup: &backup
      snapshots: 3
      exclude: [/var/cache/*]
  web2:
    <<: *web
    address: 192.0.2.2
  web3:
    <<: [*web, {port: 2200, from: any}]
    port: 2201
    backup:
      <<: *backup
      snapshots: 5
"""


def test_merge_keys_merge_and_the_mappings_own_keys_win():
    hosts = load_text(MERGED).hosts
    web1, web2, web3 = hosts["web1"], hosts["web2"], hosts["web3"]
    assert (web2.address, web2.port, web2.backup.snapshots) == ("192.0.2.2", 2222, 3)
    assert web2.backup.exclude == web1.backup.exclude == ("/var/cache/*",)
    # Own keys win over merged ones; of several merged mappings the first wins.
    assert (web3.address, web3.port, web3.from_) == ("192.0.2.1", 2201, "any")
    assert (web3.backup.snapshots, web3.backup.exclude) == (5, ("/var/cache/*",))


def test_a_merged_value_is_reported_at_the_anchor_it_came_from():
    text = MERGED.replace("    port: 2222\n", "    port: 70000\n").replace(
        "    port: 2201\n", "")
    with pytest.raises(InventoryError) as caught:
        load_text(text)
    # web2 and web3 take the bad port from web1's anchor, at line 7 (web3's own port gone,
    # the first of its merged mappings wins).
    assert caught.value.problems == [
        f"inventory.yaml:7: hosts.{name}.port: Input should be less than or equal to 65535 "
        "(got 70000)" for name in ("web1", "web2", "web3")]


def test_merge_keys_work_through_the_tasks_and_pullback_backup(tmp_path):
    destination = tmp_path / "b"
    path = tmp_path / "merged.yaml"
    path.write_text(MERGED.replace("  backup_key: /k\n", f"  backup_key: /k\n  backup: "
                                   f"{{destination: '{destination}/{{name}}', "
                                   f"allow_destination: '{destination}'}}\n"))
    status = run(str(BIN / "invoke"), "status", "--inventory", str(path), home=tmp_path)
    # Never backed up: every host is stale (exit 1), and each is listed.
    assert status.returncode == 1, status
    assert [line.split()[0] for line in status.stdout.splitlines()[1:]] == [
        "web1", "web2", "web3"]
    unattended = run(str(BIN / "pullback-backup"), "--inventory", str(path), "--host",
                     "nothere", home=tmp_path)
    assert unattended.returncode == 2, unattended
    assert unattended.stderr.strip() == (f"{path}: unknown host nothere (known: web1, web2, "
                                         "web3)")
