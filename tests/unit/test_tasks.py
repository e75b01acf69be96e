"""The task list and selection flags, through the real `invoke` program (no host contacted)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from roles.core.shards import parse_shard, shard_of
from roles.inventory.schema import load_text

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
TASKS = ["keygen", "setup-remote", "build-rsync", "capture-command", "backup", "restore", "restore-drill", "check-inventory",
         "doctor", "verify", "schedule", "status", "trust-host", "lab.up", "lab.down",
         "lab.status", "snapshots", "diff", "prune"]


def invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_every_task_is_listed_with_help():
    listed = invoke("--list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[2:] if line.strip()
             and line.startswith("  ") and not line.startswith("    ")]
    assert sorted(names) == sorted(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_working_help(task):
    result = invoke("--help", task)
    assert result.returncode == 0, result.stderr
    assert "--inventory" in result.stdout or task.startswith("lab.")


HOSTS = "\n".join(f"  h{i}: {{address: 192.0.2.{i}}}" for i in range(1, 41))
INVENTORY = textwrap.dedent("""\
    defaults: {admin_user: u, backup_key: /k}
    hosts:
    """) + HOSTS + "\n"


def test_shards_partition_the_inventory_and_are_stable():
    inventory = load_text(INVENTORY)
    shards = [inventory.select(None, (k, 3)) for k in (1, 2, 3)]
    names = [h.name for shard in shards for h in shard]
    assert sorted(names) == sorted(inventory.hosts)  # every host exactly once
    assert all(shards)
    counts = Counter(shard_of(f"host-{i}", 4) for i in range(1000))
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 200  # spread evenly
    # Adding hosts never moves the existing ones.
    more = load_text(INVENTORY + "  new1: {address: 192.0.2.200}\n")
    assert [h.name for h in more.select(None, (2, 3)) if h.name != "new1"] == \
        [h.name for h in shards[1]]


NAMES = [f"web{i:04d}.example.org" for i in range(1000)]


def test_a_fourth_backup_host_moves_only_the_servers_it_takes():
    before = {n: shard_of(n, 3) for n in NAMES}
    after = {n: shard_of(n, 4) for n in NAMES}
    moved = [n for n in NAMES if before[n] != after[n]]
    assert all(after[n] == 4 for n in moved)  # only to the new backup host
    assert len(moved) <= 300  # about 1/4 (hash mod N moved about 3/4)
    assert len(moved) >= 150  # and the new host gets its share


def test_dropping_the_last_backup_host_moves_only_its_servers():
    before = {n: shard_of(n, 4) for n in NAMES}
    after = {n: shard_of(n, 3) for n in NAMES}
    assert [n for n in NAMES if before[n] != after[n]] == \
        [n for n in NAMES if before[n] == 4]


def test_shard_of_is_a_fixed_function_of_name_and_count():
    # Backup hosts compute shards independently, with any pullback release: a change here
    # would move servers between backup hosts. Golden values (sha256 of "K\0NAME").
    got = [shard_of(n, c) for n in ("web1", "web2", "db1", "mail") for c in (3, 5)]
    assert got == [3, 3, 3, 5, 3, 3, 3, 3]
    assert shard_of("anything", 1) == 1


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "x", "1/2/3", "-1/2", ""])
def test_bad_shard_is_a_one_line_error(text):
    with pytest.raises(ValueError, match=r"expected K/N"):
        parse_shard(text)


def test_shard_flag_selects_hosts_without_contacting_any(tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.replace("/k", str(tmp_path / "key")).replace(
        "defaults: {", f"defaults: {{backup: {{destination: '{tmp_path}/b/{{name}}', "
                      f"allow_destination: '{tmp_path}/b'}}, "))
    expected = sorted(h.name for h in load_text(inventory.read_text()).select(None, (2, 3)))
    result = invoke("status", "--inventory", str(inventory), "--shard", "2/3")
    # status reads only local summaries: every selected host is "never backed up" (exit 1)
    assert result.returncode == 1, result.stderr
    shown = sorted(line.split()[0] for line in result.stdout.splitlines()
                   if line.startswith("h") and not line.startswith("host "))
    assert shown == expected
    bad = invoke("status", "--inventory", str(inventory), "--shard", "5/3")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "expected K/N" in bad.stderr


def test_status_names_the_shard_that_took_a_host_over(tmp_path):
    """A fourth backup host joined: this one (shard 1) still holds copies of servers that
    shard 4 now backs up; status says so, and which shard owns them."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.replace("/k", str(tmp_path / "key")).replace(
        "defaults: {", f"defaults: {{backup: {{destination: '{tmp_path}/b/{{name}}', "
                      f"allow_destination: '{tmp_path}/b'}}, "))
    hosts = load_text(inventory.read_text()).hosts
    mine_before = [n for n in hosts if shard_of(n, 3) == 1]
    moved = [n for n in mine_before if shard_of(n, 4) != 1]
    assert moved and all(shard_of(n, 4) == 4 for n in moved)
    for name in mine_before:
        (tmp_path / "b" / f"{name}.pullback" / "logs").mkdir(parents=True)
    result = invoke("status", "--inventory", str(inventory), "--shard", "1/4")
    notes = [line for line in result.stderr.splitlines() if "not in shard 1/4" in line]
    assert sorted(line.split(":")[0] for line in notes) == sorted(moved)
    for line in notes:
        assert "shard 4/4 backs it up now" in line and "rsync -aH --numeric-ids" in line



def test_build_rsync_refuses_an_exposed_client_before_anything_with_exit_2(tmp_path):
    """An inventory-level refusal: one line on stderr, exit 2, nothing fetched or built."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(textwrap.dedent(f"""\
        defaults:
          admin_user: u
          backup_key: /k
          rsync: {{version: 3.2.7, url: "file://{tmp_path}/none-{{version}}.tar.gz",
                  local_prefix: {tmp_path}/local}}
        hosts:
          web1: {{address: 192.0.2.1}}
        """))
    result = invoke("build-rsync", "--inventory", str(inventory), "--local-only")
    assert result.returncode == 2, result
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("build-rsync: refused: the local build for web1 (rsync.version) "
                           "is rsync 3.2.7, older than 3.4.1")
    assert "rsync.allow_vulnerable: true" in line
    assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("task", [t for t in TASKS if not t.startswith("lab.")])
def test_dash_h_is_help_never_every_host(tmp_path, task):
    """``-h`` after a task was ``--host`` with no value, i.e. a real run on every host."""
    result = invoke(task, "--inventory", str(tmp_path / "missing.yaml"), "-h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: inv[oke] [--core-opts] " + task)
    assert "inventory file not found" not in result.stdout + result.stderr  # nothing ran


@pytest.mark.parametrize("args", [["--host"], ["--host", "--dry-run"]])
def test_a_host_flag_with_no_name_is_an_error(tmp_path, args):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.replace("/k", str(tmp_path / "key")).replace(
        "defaults: {", f"defaults: {{backup: {{destination: '{tmp_path}/b/{{name}}'}}, "))
    result = invoke("backup", "--inventory", str(inventory), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("--host needs a host name (repeat it for several; leave it "
                                     "out for every host)")
