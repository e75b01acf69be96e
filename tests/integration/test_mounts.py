"""File systems a ``-x`` pull skips, on a real lab host: the container gets a tmpfs of its
own at ``MOUNT`` (a second file system inside the tree, as a separately mounted /home or
/srv is on a server), with files in it. doctor names it, with the field that pulls it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.inventory.schema import load
from roles.local import capture_record
from tests.integration.conftest import Lab, LabServer, lab_server, sh
from tests.integration.conftest import invoke as run
from tests.integration.test_doctor import PINNED, problems, run_doctor, the

pytestmark = pytest.mark.integration

MOUNT = "/srv/pbmount"
SEED = f"""
set -eu
mkdir -p {MOUNT}/sub
printf 'on its own file system\\n' > {MOUNT}/sub/file
printf 'root file system\\n' > /srv/on-root
"""


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    with lab_server(lab_env, tmp_path_factory, "mounts", tmpfs=(MOUNT,), seed=SEED,
                    defaults={"rsync": PINNED}) as server:
        # A different file system from / indeed (else the tests below prove nothing).
        assert sh(server.lab, f"stat -c %d / {MOUNT} | uniq | wc -l").strip() == "2"
        yield server


def test_doctor_names_the_mount_the_backup_skips(server):
    result, lines = run_doctor(server.write("doctor"))
    assert result.returncode == 0, result.stdout + result.stderr
    found = the(lines, "warn", "mounts", f"{MOUNT} (tmpfs)")
    assert "the backup skips it" in found.what
    assert f"backup.extra_sources: [{MOUNT}]" in found.fix
    # Only that one: the container's /proc, /sys, /dev, /run and its file mounts
    # (/etc/hosts, /etc/hostname) are pseudo, excluded or copied as files.
    assert [x.what for x in problems(lines) if x.check == "mounts"] == [found.what]


def test_doctor_is_quiet_about_a_mount_excluded_on_purpose(server):
    path = server.write("excluded", backup={"exclude": [f"{MOUNT}/*"]})
    result, lines = run_doctor(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [x for x in problems(lines) if x.check == "mounts"], lines
    the(lines, "ok", "mounts", "every file system below / with files is in the backup")


# --- backup.extra_sources: pulled too, never deleted because the main pull skipped it --------

SOURCE = "/srv"
FILE = "pbmount/sub/file"  # relative to SOURCE, on the tmpfs


def backup(path: Path) -> Path:
    result = run("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def test_extra_source_is_pulled_and_not_deleted_by_the_main_pull(server: LabServer):
    """Daemon mode, one mirror: -x alone leaves the mount point empty; with extra_sources
    its files arrive; a second run changes nothing (same inode: not deleted and pulled
    again); a run without the extra source leaves them alone; a file removed on the server
    goes from the copy."""
    host_lab = server.lab
    plain = server.write("mirror", backup={"source": SOURCE})
    extra = server.write("mirror-extra", dest="mirror", backup={
        "source": SOURCE, "extra_sources": [MOUNT]})
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


def test_snapshots_keep_the_extra_source_hard_linked(server):
    path, host = server.spec("snapshots", backup={
        "source": SOURCE, "extra_sources": [MOUNT], "snapshots": 3})
    dest = Path(host.destination)
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


def test_restore_of_a_file_from_the_extra_source(server, tmp_path: Path):
    path = backup(server.write("restore", backup={"source": SOURCE, "extra_sources": [MOUNT]}))
    to = tmp_path / "restored"
    result = run("restore", "--inventory", str(path), "--host", server.name,
                 "--path", f"{MOUNT}/sub", "--to", str(to))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (to / "tree" / "file").read_text() == "on its own file system\n"


def test_captured_mode_records_one_command_with_every_source(lab_env: Lab,
                                                             tmp_path_factory):
    """capture-command records the one rsync (-R, both paths); the gate runs it; a changed
    extra_sources is drift, refused until capture-command runs again."""
    with lab_server(lab_env, tmp_path_factory, "mounts-cap", tmpfs=(MOUNT,), seed=SEED,
                    name="cap", setup=False, defaults={
                        "forced_command": "captured", "rsync": PINNED,
                        "backup": {"source": SOURCE, "extra_sources": [MOUNT]}}) as server:
        path, host = server.inventory, server.host
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
        plain = server.write("plain", dest="cap", backup={"extra_sources": []})
        result = run("backup", "--inventory", str(plain))
        assert result.returncode != 0
        assert "backup.extra_sources changed since the capture" in result.stdout + result.stderr
        assert (tree / FILE).is_file()


def test_the_drill_reads_the_extra_source_too(server, tmp_path: Path):
    """A drill of SOURCE: the server's side is read per file system (as -x pulls it) and
    the extra source merged at its place, so its files count as backed up, 0 differences."""
    path = server.write("drill", backup={"source": SOURCE, "extra_sources": [MOUNT]})
    result = run("restore-drill", "--inventory", str(path), "--host", server.name,
                 "--to", str(tmp_path / "drilled"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "drilled" / "tree" / FILE).is_file()


def test_doctor_with_the_extra_source_is_clean(server):
    """Listed in extra_sources, the mount is covered; the test pull (one path) still runs."""
    result, lines = run_doctor(server.write("doctor-extra", backup={"extra_sources": [MOUNT]}))
    assert result.returncode == 0, result.stdout + result.stderr
    the(lines, "ok", "mounts", f"every file system below / and {MOUNT} with files")
    the(lines, "ok", "test pull", "dry-run pull of root@127.0.0.1::system/etc/hostname")


def test_diff_against_the_server_sees_the_extra_source(server):
    """`diff` of the newest snapshot against the live server: the same pull with -n
    --delete -i; an extra source's unchanged files are not reported as removed."""
    host_lab = server.lab
    path = backup(server.write("diff", backup={
        "source": SOURCE, "extra_sources": [MOUNT], "snapshots": 2}))
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
