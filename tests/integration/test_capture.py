"""capture-command and a captured-mode backup against ONE real lab host.

The module's host goes through the whole story once (fixture ``story``, every step through
the CLI): capture-command is refused before setup-remote; setup-remote in captured mode
installs no key line; capture-command captures what the local rsync sends, installs the
gate and writes the record. The tests then check that end state, back up the hostile tree
of ``test_backup`` through the gate (an exact copy, then after changes), run ``--dry-run``
through it, and make sure everything else is refused: drifted options, another command
with the key, daemon syntax. The host's Debian rsync 3.2.7 serves (``/usr/local/bin/rsync``
is not built here) and locally the ``rsync`` on PATH is used, both with their warnings.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lab import hosts as lab
from roles.config import gate as gate_scripts
from roles.config import rootkey
from roles.core import hardened, pull
from roles.core import rsync as rsync_model
from roles.core.spec import HostSpec
from roles.local import capture_record, runner
from roles.remote.session import connect
from tests.integration.conftest import Lab, invoke, lab_server
from tests.integration.conftest import sh_bytes as sh
from tests.integration.test_backup import CHANGE, DATA, OPTIONS, SEED, assert_same, local_tree
from tests.integration.test_backup import summary_of as last_summary
from tests.integration.test_setup_remote import leftovers, read, snapshot, step_lines

pytestmark = pytest.mark.integration

GATE_FILES = (hardened.LIBEXEC, hardened.GATE, hardened.CAPTURE_SCRIPT, hardened.REMOTE_STATE,
              hardened.CAPTURED_FILE, "/root/.ssh/authorized_keys")
# What the local client (3.x) sends for OPTIONS (-avzHx --numeric-ids --delete --progress).
SENT = f"rsync --server --sender -vlHogDtprxze.iLsfxCIvu --numeric-ids . {DATA}/"
SENT_DRY = f"rsync --server --sender -vnlHogDtprxze.iLsfxCIvu --numeric-ids . {DATA}/"


@dataclass
class Story:
    lab: lab.LabHost
    inventory: Path
    host: HostSpec
    before_setup: subprocess.CompletedProcess
    setup: subprocess.CompletedProcess
    keys_after_setup: bytes | None
    capture: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def story(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    with lab_server(lab_env, tmp_path_factory, "capture", seed=SEED, name="mirror",
                    setup=False, defaults={
                        "forced_command": "captured",
                        "backup": {"source": DATA, "allow_inexact": True, "options": OPTIONS},
                    }) as server:
        remote, inventory = server.lab, server.inventory
        before = invoke("capture-command", "--inventory", str(inventory))
        setup = invoke("setup-remote", "--inventory", str(inventory))
        keys_after_setup = read(remote, "/root/.ssh/authorized_keys")
        captured = invoke("capture-command", "--inventory", str(inventory))
        assert captured.returncode == 0, captured.stdout + captured.stderr
        yield Story(remote, inventory, server.host, before, setup, keys_after_setup, captured)


def backup_ssh(host: HostSpec, *command: str) -> subprocess.CompletedProcess:
    """``ssh`` as ``backup`` runs it (backup key, strict host key), with ``command``."""
    argv = [*shlex.split(pull.ssh_command(host)), "root@127.0.0.1", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


def public_key(host: HostSpec) -> rootkey.PublicKey:
    return rootkey.parse_public_key(Path(host.backup_pubkey).read_text())


# --- before a capture -------------------------------------------------------------------------


def test_capture_is_refused_until_setup_remote_ran(story: Story):
    result = story.before_setup
    assert result.returncode == 1, result.stdout + result.stderr
    (failed,) = [line for line in result.stdout.splitlines() if "failed:" in line]
    assert failed.startswith(story.lab.name)
    assert "PermitRootLogin" in failed and "run setup-remote first; next: invoke doctor " \
        "--inventory " in failed and failed.endswith(f" --host {story.lab.name}")


def test_setup_remote_installs_no_key_line_before_a_capture(story: Story):
    result = story.setup
    assert result.returncode == 0, result.stdout + result.stderr
    # "changed" only for /root/.ssh, which the fresh image lacks: no key line is written.
    assert step_lines(result.stdout, story.lab.name)["authorized_keys"] in ("skipped",
                                                                            "changed")
    assert "no captured command yet: no key installed; run `invoke capture-command`" \
        in result.stderr
    assert story.keys_after_setup is None or \
        public_key(story.host).blob.encode() not in story.keys_after_setup
    assert "rsyncd.conf" not in step_lines(result.stdout, story.lab.name)  # daemon mode only


# --- the capture ------------------------------------------------------------------------------


def test_capture_installs_the_gate_and_records_both_commands(story: Story):
    result, remote, host = story.capture, story.lab, story.host
    steps = step_lines(result.stdout, remote.name)
    assert {k: v for k, v in steps.items() if k != "action"} == {
        "capture-script": "changed", "capture": "ok", "capture-dry-run": "ok",
        "gate": "changed", "authorized_keys": "changed", "record": "written",
        "proof-dry-run": "ok"}
    assert f"runs: /usr/bin/rsync {SENT.removeprefix('rsync ')}" in result.stdout
    # Neither end has the pinned build here: both fallbacks are named.
    assert "/usr/local/bin/rsync is not installed: the gate runs /usr/bin/rsync" \
        in result.stderr
    assert "is not built: using" in result.stderr

    record = capture_record.load_record(host)
    assert (record.sent, record.sent_dry_run) == (SENT, SENT_DRY)
    assert record.remote_rsync == "/usr/bin/rsync"
    assert record.remote_version == sh(remote, "rsync --version | head -n1").decode().strip()
    local_version = capture_record.local_version_line(runner.find_local_rsync(host)[0])
    assert record.local_version == local_version
    assert record.fingerprint == rsync_model.fingerprint(OPTIONS, [], DATA, local_version,
                                                     record.remote_version)
    saved = json.loads(capture_record.record_path(host).read_text())
    assert saved["command"] == f"/usr/bin/rsync {SENT.removeprefix('rsync ')}"
    assert saved["dry_run_command"] == f"/usr/bin/rsync {SENT_DRY.removeprefix('rsync ')}"
    assert capture_record.record_path(host).stat().st_mode & 0o777 == 0o600

    state = snapshot(remote, GATE_FILES)
    assert state[hardened.LIBEXEC] == state[hardened.REMOTE_STATE] == "dir 700 0 0"
    assert state[hardened.GATE].endswith(" 700 0 0")
    assert state[hardened.CAPTURE_SCRIPT].endswith(" 700 0 0")
    assert state[hardened.CAPTURED_FILE] == "missing"  # read, then removed
    assert read(remote, hardened.GATE) == gate_scripts.gate_file(record).content
    conn = connect(host)
    try:  # the backup host's address as the server sees it: the key's default from=
        addr = conn.run('printf %s "$SSH_CONNECTION"').stdout.split()[0]
    finally:
        conn.close()
    options = rootkey.build_options(hardened.GATE, restrict=True,
                                    from_=hardened.wanted_from(host.from_, addr))
    assert f'from="{addr}"' in options
    line = rootkey.render_key_line(public_key(host), options)
    assert read(remote, "/root/.ssh/authorized_keys") == line.encode() + b"\n"
    # Only setup's kept backups (.pullback-bak): no candidate or key-check file.
    found = [*leftovers(remote), *sh(remote, f"find {hardened.LIBEXEC} {hardened.REMOTE_STATE} "
                                             "-name '*.pullback-*'").decode().split()]
    assert all(path.endswith(".pullback-bak") for path in found), found


# --- backups through the gate -------------------------------------------------------------------


def test_backup_is_an_exact_copy_then_follows_changes(story: Story):
    dest = Path(story.host.destination)
    result = invoke("backup", "--inventory", str(story.inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == [story.lab.name, "ok"]
    tree = assert_same(story.lab, DATA, dest / "tree")
    assert tree[b"setuid-bin"][1] == 0o4755 and tree[b"new\nline"][0] == "f"
    summary = last_summary(result, dest)
    assert summary["argv"][-2] == f"root@127.0.0.1:{DATA}/"  # one colon: not the daemon
    assert summary["forced_command"] == "captured"
    assert summary["capture_fingerprint"] == capture_record.load_record(story.host).fingerprint

    sh(story.lab, CHANGE)
    again = invoke("backup", "--inventory", str(story.inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    tree = assert_same(story.lab, DATA, dest / "tree")
    assert tree[b"added-dir"][2:4] == (4243, 4244)


def test_dry_run_works_through_the_gate_and_changes_nothing(story: Story):
    dest = Path(story.host.destination)
    sh(story.lab, f"cd {DATA} && printf 'added\\n' > 'added file'")  # as CHANGE leaves it
    assert invoke("backup", "--inventory", str(story.inventory)).returncode == 0
    sh(story.lab, f"cd {DATA} && printf 'dry\\n' > dry-only && rm 'added file'")
    before = local_tree(dest)
    result = invoke("backup", "--inventory", str(story.inventory), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].split()[1] == "dry-run"
    assert local_tree(dest) == before
    summary = last_summary(result, dest)
    assert summary["dry_run"] and "-n" in summary["argv"]
    assert summary["stats"]["files_transferred"] == 1 and summary["stats"]["dry_run"]
    assert summary["stats"]["files_deleted"] == 1  # would delete 'added file'; did not
    assert (dest / "tree" / "added file").exists()


def test_diff_against_the_live_server_goes_through_the_gate(story: Story):
    """`invoke diff` without --old/--new: a dry-run pull with -i over the backup key into
    the copy; the gate runs it only if the server sees the recorded dry run."""
    inventory, name = str(story.inventory), story.lab.name
    dest = Path(story.host.destination)
    spaces = "a file with spaces"
    sh(story.lab, f"cd {DATA} && printf 'going\\n' > to-go && cp -p '{spaces}' /root/saved")
    assert invoke("backup", "--inventory", inventory).returncode == 0
    same = invoke("diff", "--inventory", inventory, "--host", name)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines() == ["tree -> server: 0 added, 0 removed, 0 changed"]

    before = local_tree(dest)
    sh(story.lab, f"cd {DATA} && printf 'live\\n' > live-only && rm to-go "
                  f"&& printf 'more\\n' >> '{spaces}'")
    try:
        live = invoke("diff", "--inventory", inventory, "--host", name)
    finally:
        sh(story.lab, f"cd {DATA} && rm live-only && mv /root/saved '{spaces}'")
    assert live.returncode == 0, live.stdout + live.stderr
    assert live.stdout.splitlines() == ["tree -> server: 1 added, 1 removed, 1 changed",
                                        "+ live-only", "- to-go", f"~ {spaces}"]
    assert local_tree(dest) == before  # a dry run: the copy is as it was


def test_setup_remote_keeps_and_repairs_the_gate(story: Story):
    before = snapshot(story.lab, GATE_FILES)
    result = invoke("setup-remote", "--inventory", str(story.inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert step_lines(result.stdout, story.lab.name) == {
        "sshd_config": "ok", "authorized_keys": "ok", "gate": "ok", "folders": "ok"}
    assert snapshot(story.lab, GATE_FILES) == before
    sh(story.lab, f"rm {hardened.GATE}")
    repaired = invoke("setup-remote", "--inventory", str(story.inventory))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert step_lines(repaired.stdout, story.lab.name)["gate"] == "changed"
    assert snapshot(story.lab, GATE_FILES) == before


def test_capture_again_changes_nothing(story: Story):
    before = snapshot(story.lab, GATE_FILES)
    record = capture_record.load_record(story.host)
    result = invoke("capture-command", "--inventory", str(story.inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(result.stdout, story.lab.name)
    assert (steps["capture-script"], steps["gate"], steps["authorized_keys"]) == \
        ("ok", "ok", "ok")
    assert snapshot(story.lab, GATE_FILES) == before
    again = capture_record.load_record(story.host)
    assert (again.sent, again.sent_dry_run, again.fingerprint) == \
        (record.sent, record.sent_dry_run, record.fingerprint)


# --- refusals -------------------------------------------------------------------------------------


def test_an_option_change_makes_backup_refuse(lab_env: Lab, story: Story):
    dest = Path(story.host.destination)
    inventory = story.inventory.with_name("drifted.yaml")
    data = yaml.safe_load(story.inventory.read_text())
    data["defaults"]["backup"]["options"] = [*OPTIONS, "--checksum"]
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    logs = sorted((Path(str(dest) + ".pullback") / "logs").iterdir())
    before = local_tree(dest)
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"{story.lab.name}: failed: backup.options changed since the capture of "
            in result.stderr)
    assert "run `invoke capture-command` again" in result.stderr
    assert local_tree(dest) == before
    assert sorted((Path(str(dest) + ".pullback") / "logs").iterdir()) == logs  # rsync never ran


@pytest.mark.parametrize("command", [
    ["rsync", "--server", "--sender", "-vlogDtprxzen", ".", "/etc/"],
    SENT.replace(f"{DATA}/", "/etc/").split(" "),
    [*SENT.split(" "), "/etc/shadow"],
    ["cat", "/etc/shadow"],
    [],
])
def test_the_gate_refuses_any_other_command(story: Story, command: list[str]):
    result = backup_ssh(story.host, *command)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    shown = " ".join(command) or "(no command: an interactive login)"
    assert f"pullback gate: refused: {shown}\n" in result.stderr


def test_daemon_syntax_against_the_captured_key_fails(story: Story, tmp_path: Path):
    rsync, _ = runner.find_local_rsync(story.host)
    result = subprocess.run(
        [rsync, "-e", pull.ssh_command(story.host), "-a",
         "root@127.0.0.1::system/etc/", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "pullback gate: refused: rsync --server --daemon ." in result.stderr
    assert not (tmp_path / "out").exists()
