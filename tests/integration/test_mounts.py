"""File systems a ``-x`` pull skips, on a real lab host: the container gets a tmpfs of its
own at ``MOUNT`` (a second file system inside the tree, as a separately mounted /home or
/srv is on a server), with files in it. doctor names it, with the field that pulls it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import capture_record, keys
from tests.integration.conftest import Lab
from tests.integration.test_doctor import (
    INVOKE,
    NO_AGENT,
    PINNED,
    ROOT,
    problems,
    run_doctor,
    the,
)

pytestmark = pytest.mark.integration

MOUNT = "/srv/pbmount"
SEED = f"""
set -eu
mkdir -p {MOUNT}/sub
printf 'on its own file system\\n' > {MOUNT}/sub/file
printf 'root file system\\n' > /srv/on-root
"""


def sh(host: lab.LabHost, script: str) -> str:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=120).stdout.decode()


def inventory(lab_env: Lab, host: lab.LabHost, work: Path, name: str, dest: str = "",
              **backup) -> Path:
    """Inventory ``name`` (its own file); ``dest``: the destination's folder (default
    ``name``), for two inventories of the same copy."""
    return lab_env.inventory([host], path=work / f"{name}.yaml", defaults={
        "rsync": PINNED,
        "backup": {"destination": str(work / (dest or name) / "{name}"), **backup}})


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[lab.LabHost, Path]]:
    work = tmp_path_factory.mktemp("mounts")
    host_lab = lab_env.start("mounts", tmpfs=(MOUNT,))
    try:
        sh(host_lab, SEED)
        # A different file system from / indeed (else the tests below prove nothing).
        assert sh(host_lab, f"stat -c %d / {MOUNT} | uniq | wc -l").strip() == "2"
        host = load(inventory(lab_env, host_lab, work, "setup")).hosts[host_lab.name]
        keys.ensure_backup_key(Path(host.backup_key))
        outcome = setup_host(host)
        assert outcome.error is None, outcome
        yield host_lab, work
    finally:
        lab_env.remove(host_lab)


def test_doctor_names_the_mount_the_backup_skips(lab_env: Lab, server):
    host_lab, work = server
    result, lines = run_doctor(inventory(lab_env, host_lab, work, "doctor"))
    assert result.returncode == 0, result.stdout + result.stderr
    found = the(lines, "warn", "mounts", f"{MOUNT} (tmpfs)")
    assert "the backup skips it" in found.what
    assert f"backup.extra_sources: [{MOUNT}]" in found.fix
    # Only that one: the container's /proc, /sys, /dev, /run and its file mounts
    # (/etc/hosts, /etc/hostname) are pseudo, excluded or copied as files.
    assert [x.what for x in problems(lines) if x.check == "mounts"] == [found.what]


def test_doctor_is_quiet_about_a_mount_excluded_on_purpose(lab_env: Lab, server):
    host_lab, work = server
    path = inventory(lab_env, host_lab, work, "excluded", exclude=[f"{MOUNT}/*"])
    result, lines = run_doctor(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [x for x in problems(lines) if x.check == "mounts"], lines
    the(lines, "ok", "mounts", "every file system below / with files is in the backup")


# --- backup.extra_sources: pulled too, never deleted because the main pull skipped it --------

SOURCE = "/srv"
FILE = "pbmount/sub/file"  # relative to SOURCE, on the tmpfs


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env=NO_AGENT)


def backup(path: Path) -> Path:
    result = run("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def test_extra_source_is_pulled_and_not_deleted_by_the_main_pull(lab_env: Lab, server):
    """Daemon mode, one mirror: -x alone leaves the mount point empty; with extra_sources
    its files arrive; a second run changes nothing (same inode: not deleted and pulled
    again); a run without the extra source leaves them alone; a file removed on the server
    goes from the copy."""
    host_lab, work = server
    plain = inventory(lab_env, host_lab, work, "mirror", source=SOURCE)
    extra = inventory(lab_env, host_lab, work, "mirror-extra", dest="mirror", source=SOURCE,
                      extra_sources=[MOUNT])
    tree = Path(load(plain).hosts[host_lab.name].destination) / "tree"
    backup(plain)
    assert (tree / "on-root").read_text() == "root file system\n"
    assert (tree / "pbmount").is_dir() and os.listdir(tree / "pbmount") == []
    backup(extra)
    assert (tree / FILE).read_text() == "on its own file system\n"
    assert (tree / "on-root").is_file()
    first = os.lstat(tree / FILE).st_ino
    backup(extra)
    assert os.lstat(tree / FILE).st_ino == first
    # The pull of SOURCE alone, with --delete: the skipped mount's copy stays as it is.
    backup(plain)
    assert (tree / FILE).read_text() == "on its own file system\n"
    assert os.lstat(tree / FILE).st_ino == first
    # A deletion on the extra source's file system reaches the copy (its own file list).
    sh(host_lab, f"printf gone > {MOUNT}/gone && printf new > /srv/new-on-root")
    backup(extra)
    assert (tree / "pbmount" / "gone").read_text() == "gone"
    sh(host_lab, f"rm {MOUNT}/gone /srv/new-on-root")
    backup(extra)
    assert not (tree / "pbmount" / "gone").exists() and not (tree / "new-on-root").exists()
    assert (tree / FILE).read_text() == "on its own file system\n"


def test_snapshots_keep_the_extra_source_hard_linked(lab_env: Lab, server):
    host_lab, work = server
    path = inventory(lab_env, host_lab, work, "snapshots", source=SOURCE,
                     extra_sources=[MOUNT], snapshots=3)
    dest = Path(load(path).hosts[host_lab.name].destination)
    backup(path)
    time.sleep(1.1)  # snapshot names have a one-second resolution
    backup(path)
    snaps = sorted(p for p in dest.iterdir() if p.is_dir() and p.name[:2] == "20"
                   and not p.name.endswith(".partial"))
    assert len(snaps) == 2, sorted(os.listdir(dest))
    older, newer = (s / FILE for s in snaps)
    assert newer.read_text() == older.read_text() == "on its own file system\n"
    assert os.lstat(newer).st_ino == os.lstat(older).st_ino  # --link-dest reached it
    assert (snaps[-1] / "on-root").is_file()


def test_restore_of_a_file_from_the_extra_source(lab_env: Lab, server, tmp_path: Path):
    host_lab, work = server
    path = backup(inventory(lab_env, host_lab, work, "restore", source=SOURCE,
                            extra_sources=[MOUNT]))
    to = tmp_path / "restored"
    result = run("restore", "--inventory", str(path), "--host", host_lab.name,
                 "--path", f"{MOUNT}/sub", "--to", str(to))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (to / "tree" / "file").read_text() == "on its own file system\n"


def test_captured_mode_records_one_command_with_every_source(lab_env: Lab,
                                                             tmp_path_factory):
    """capture-command records the one rsync (-R, both paths); the gate runs it; a changed
    extra_sources is drift, refused until capture-command runs again."""
    work = tmp_path_factory.mktemp("mounts-captured")
    host_lab = lab_env.start("mounts-cap", tmpfs=(MOUNT,))
    try:
        sh(host_lab, SEED)
        path = lab_env.inventory([host_lab], path=work / "cap.yaml", defaults={
            "forced_command": "captured", "rsync": PINNED,
            "backup": {"destination": str(work / "cap" / "{name}"), "source": SOURCE,
                       "extra_sources": [MOUNT]}})
        host = load(path).hosts[host_lab.name]
        keys.ensure_backup_key(Path(host.backup_key))
        for step in ("setup-remote", "capture-command"):
            result = run(step, "--inventory", str(path))
            assert result.returncode == 0, step + result.stdout + result.stderr
        record = capture_record.load_record(host)
        assert record is not None and record.extra_sources == (MOUNT,)
        assert record.sent.endswith(f" . {SOURCE}/./ {SOURCE}/./pbmount/"), record.sent
        assert "R" in record.sent.split(" ")[3]
        backup(path)
        tree = Path(host.destination) / "tree"
        assert (tree / FILE).read_text() == "on its own file system\n"
        assert (tree / "on-root").is_file()
        # Without the extra source the recorded command no longer fits: refused, named.
        plain = lab_env.inventory([host_lab], path=work / "plain.yaml", defaults={
            "forced_command": "captured", "rsync": PINNED,
            "backup": {"destination": str(work / "cap" / "{name}"), "source": SOURCE}})
        result = run("backup", "--inventory", str(plain))
        assert result.returncode != 0
        assert "backup.extra_sources changed since the capture" in result.stdout + result.stderr
        assert (tree / FILE).is_file()
    finally:
        lab_env.remove(host_lab)


def test_the_drill_reads_the_extra_source_too(lab_env: Lab, server, tmp_path: Path):
    """A drill of SOURCE: the server's side is read per file system (as -x pulls it) and
    the extra source merged at its place, so its files count as backed up, 0 differences."""
    host_lab, work = server
    path = inventory(lab_env, host_lab, work, "drill", source=SOURCE, extra_sources=[MOUNT])
    result = run("restore-drill", "--inventory", str(path), "--host", host_lab.name,
                 "--to", str(tmp_path / "drilled"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "drilled" / "tree" / FILE).is_file()


def test_doctor_with_the_extra_source_is_clean(lab_env: Lab, server):
    """Listed in extra_sources, the mount is covered; the test pull (one path) still runs."""
    host_lab, work = server
    result, lines = run_doctor(inventory(lab_env, host_lab, work, "doctor-extra",
                                         extra_sources=[MOUNT]))
    assert result.returncode == 0, result.stdout + result.stderr
    the(lines, "ok", "mounts", f"every file system below / and {MOUNT} with files")
    the(lines, "ok", "test pull", "dry-run pull of root@127.0.0.1::system/etc/hostname")


def test_diff_against_the_server_sees_the_extra_source(lab_env: Lab, server):
    """`diff` of the newest snapshot against the live server: the same pull with -n
    --delete -i; an extra source's unchanged files are not reported as removed."""
    host_lab, work = server
    path = backup(inventory(lab_env, host_lab, work, "diff", source=SOURCE,
                            extra_sources=[MOUNT], snapshots=2))
    result = run("diff", "--inventory", str(path), "--host", host_lab.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pbmount" not in result.stdout, result.stdout
    sh(host_lab, f"printf x > {MOUNT}/sub/added")
    try:
        result = run("diff", "--inventory", str(path), "--host", host_lab.name)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "pbmount/sub/added" in result.stdout, result.stdout
    finally:
        sh(host_lab, f"rm -f {MOUNT}/sub/added")
