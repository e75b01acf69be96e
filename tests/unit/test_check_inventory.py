"""``invoke check-inventory`` through the real program: real key files, a real known_hosts
read by ssh-keygen, real folders and modes. No host is contacted (TEST-NET addresses).

The local rsync is a stand-in at ``rsync.local_prefix``: an executable with build-rsync's
stamp, which is how backup reads the pinned build's version, so the rsync policy is tested
whatever rsync this machine has on PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")


def invoke(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False,
                          env={"PATH": os.environ["PATH"], "HOME": str(home)})


def local_rsync(prefix: Path, version: str) -> None:
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    binary = prefix / "bin" / "rsync"
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    stamp = prefix / "share" / "pullback" / "rsync.stamp"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"version": version}))


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A backup host where everything is as it should be for web1 (192.0.2.1:2222)."""
    tmp_path.chmod(0o755)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    key = keys / "backup"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "t", "-f", str(key)],
                   check=True)
    known = keys / "known_hosts"
    host_key = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    known.write_text(f"[192.0.2.1]:2222 {host_key}\n")
    (tmp_path / "backups").mkdir(mode=0o700)
    local_rsync(tmp_path / "local", "3.5.1")
    return {"root": tmp_path, "key": key, "known": known}


def write(world: dict[str, Path], extra: str = "", host_extra: str = "") -> Path:
    root = world["root"]
    path = root / "inventory.yaml"
    path.write_text(
        "defaults:\n"
        "  admin_user: admin\n"
        f"  backup_key: {world['key']}\n"
        f"  known_hosts: {world['known']}\n"
        f"  rsync: {{local_prefix: {root / 'local'}}}\n"
        f"  backup: {{destination: '{root}/backups/{{name}}', allow_destination: "
        f"'{root}/backups'}}\n"
        f"{extra}"
        "hosts:\n"
        "  web1:\n"
        "    address: 192.0.2.1\n"
        "    port: 2222\n"
        f"{host_extra}")
    return path


def test_a_sound_inventory_prints_ok(world):
    result = invoke("check-inventory", "--inventory", str(write(world)), home=world["root"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_each_local_problem_is_one_line_and_exit_2(world):
    root = world["root"]
    world["key"].chmod(0o644)
    world["known"].write_text("")
    (root / "backups").chmod(0o777)
    local_rsync(root / "local", "3.2.7")
    result = invoke("check-inventory", "--inventory", str(write(world)), home=root)
    assert result.returncode == 2, result
    lines = result.stdout.splitlines()
    assert lines == [
        f"web1: backup_key: {world['key']} has mode 0644: others can read the key that reads "
        f"every file on your servers; fix with: chmod 600 {world['key']}",
        f"web1: known_hosts {world['known']} has no key for [192.0.2.1]:2222: run `invoke "
        "trust-host --host web1`",
        lines[2],
        lines[3],
    ], result.stdout
    assert lines[2].startswith(f"web1: backup.destination: {root}/backups ") and \
        "chmod go-w" in lines[2]
    assert lines[3].startswith(f"web1: refused: the local rsync {root}/local/bin/rsync is "
                               "rsync 3.2.7, older than 3.4.1")
    assert "ok" not in lines


def test_the_rsync_policy_and_captured_mode(world):
    root = world["root"]
    result = invoke("check-inventory", "--inventory", str(write(
        world, host_extra="    forced_command: captured\n"
                          "    rsync: {version: 3.2.7, local_prefix: " + str(root / "local")
                          + "}\n")), home=root)
    assert result.returncode == 2, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith("web1: refused: the local build for web1 (rsync.version) is "
                               "rsync 3.2.7, older than 3.4.1")
    assert lines[1] == (f"web1: no capture record for web1 ({root}/backups/web1.pullback/"
                        "capture.json): run `invoke capture-command` first")
    assert len(lines) == 2
    unpinned = invoke("check-inventory", "--inventory", str(write(
        world, host_extra="    rsync: {version: 3.9.9, local_prefix: " + str(root / "local")
                          + "}\n")), home=root)
    assert unpinned.returncode == 2
    assert unpinned.stdout.startswith("web1: pullback has no pinned sha256 for rsync 3.9.9: set "
                                      "rsync.sha256")


def test_missing_files_name_the_task_that_makes_them(world):
    root = world["root"]
    world["key"].unlink()
    world["known"].unlink()
    result = invoke("check-inventory", "--inventory", str(write(world)), home=root)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"web1: backup_key: {world['key']} does not exist: create it with `invoke keygen`",
        f"web1: known_hosts {world['known']} does not exist: run `invoke trust-host --host "
        "web1`"]


def test_a_schema_problem_stops_before_the_local_checks(world):
    result = invoke("check-inventory", "--inventory", str(write(world, host_extra="    from:\n")),
                    home=world["root"])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"{world['root']}/inventory.yaml:11: hosts.web1.from: has no "
                             "value: write one, or delete the line for the default\n")
