"""roles.local.folders: the rule for folders on the way to a backup (pure tables), the private
folder it creates, and the mount table parser."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from roles.local import folders
from roles.local.folders import Mount, PathFact

D = stat.S_IFDIR
L = stat.S_IFLNK
ME = 1000


def chain(*facts: tuple[str, int, int]) -> list[PathFact]:
    return [PathFact(path, mode, uid) for path, mode, uid in facts]


ROOT = ("/", D | 0o755, 0)
CASES = {
    "root-owned 0755 all the way, target missing": (
        "/var/backups/web1", [ROOT, ("/var", D | 0o755, 0), ("/var/backups", D | 0o755, 0)],
        None),
    "target exists, 0755: ours to close": (
        "/b/web1", [ROOT, ("/b", D | 0o755, 0), ("/b/web1", D | 0o755, 0)], None),
    "the running user's own folders": (
        "/home/op/b", [ROOT, ("/home", D | 0o755, 0), ("/home/op", D | 0o700, ME)], None),
    "other-writable ancestor": (
        "/srv/drop/b", [ROOT, ("/srv", D | 0o755, 0), ("/srv/drop", D | 0o777, 0)],
        "/srv/drop is writable by its group and others (mode 0777)"),
    "group-writable ancestor": (
        "/srv/grp/b", [ROOT, ("/srv", D | 0o755, 0), ("/srv/grp", D | 0o775, 0)],
        "/srv/grp is writable by its group (mode 0775)"),
    "sticky /tmp, the next folder missing: another user could create it": (
        "/tmp/b/web1", [ROOT, ("/tmp", D | 0o1777, 0)],
        "/tmp is writable by its group and others (mode 1777, sticky) and /tmp/b does not "
        "exist yet"),
    "sticky /tmp, the next folder exists and is root's": (
        "/tmp/b/web1", [ROOT, ("/tmp", D | 0o1777, 0), ("/tmp/b", D | 0o700, 0)], None),
    "sticky /tmp, the next folder is another user's": (
        "/tmp/b/web1", [ROOT, ("/tmp", D | 0o1777, 0), ("/tmp/b", D | 0o700, 4242)],
        "/tmp/b belongs to uid 4242"),
    "an ancestor owned by another user, even 0755": (
        "/home/eve/b", [ROOT, ("/home", D | 0o755, 0), ("/home/eve", D | 0o755, 4242)],
        "/home/eve belongs to uid 4242, not to root or to you"),
    "the target owned by another user": (
        "/b/web1", [ROOT, ("/b", D | 0o755, 0), ("/b/web1", D | 0o700, 4242)],
        "/b/web1 belongs to uid 4242"),
    "a symlink on the way is judged by its owner (the target is checked resolved)": (
        "/b/web1", [ROOT, ("/b", L | 0o777, 0)], None),
    "another user's symlink on the way": (
        "/b/web1", [ROOT, ("/b", L | 0o777, 4242)], "/b belongs to uid 4242"),
    "the target is a symlink": (
        "/b/web1", [ROOT, ("/b", D | 0o755, 0), ("/b/web1", L | 0o777, 0)],
        "/b/web1 is a symlink"),
    "a file on the way": (
        "/b/web1", [ROOT, ("/b", stat.S_IFREG | 0o644, 0)], "/b is not a folder"),
    "the target is a file": (
        "/b/web1", [ROOT, ("/b", D | 0o755, 0), ("/b/web1", stat.S_IFREG | 0o600, 0)],
        "/b/web1 exists and is not a folder"),
}


@pytest.mark.parametrize("target,facts,why", CASES.values(), ids=CASES.keys())
def test_check_chain(target, facts, why):
    problem = folders.check_chain(target, chain(*facts), ME)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem and "\n" not in problem


def test_components():
    assert folders.components("/a/b/../c/") == ["/", "/a", "/a/c"]
    assert folders.components("/") == ["/"]
    with pytest.raises(ValueError):
        folders.components("relative/x")


def test_make_private_creates_every_missing_level_0700(tmp_path):
    target = tmp_path / "a" / "b" / "web1"
    assert folders.make_private(target) is None
    for path in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    target.chmod(0o755)
    assert folders.make_private(target) == f"{target}: mode 0755 -> 0700"


def test_make_private_refuses_a_shared_parent_and_writes_nothing(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    with pytest.raises(folders.FolderError, match="mode 1777, sticky"):
        folders.make_private(tmp_path / "shared" / "b" / "web1")
    assert os.listdir(tmp_path / "shared") == []


def test_check_folder_follows_a_symlink_on_the_way(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    os.symlink(tmp_path / "open", tmp_path / "link")
    with pytest.raises(folders.FolderError, match=f"{tmp_path / 'open'} is writable"):
        folders.check_folder(tmp_path / "link" / "web1")


def test_make_private_refuses_a_folder_another_user_created(tmp_path):
    """As root: a chown stands in for the other user's mkdir."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder away")
    (tmp_path / "b").mkdir()
    os.chown(tmp_path / "b", 4242, 4242)
    with pytest.raises(folders.FolderError, match="belongs to uid 4242"):
        folders.make_private(tmp_path / "b" / "web1")
    assert os.listdir(tmp_path / "b") == []


# --- mounts --------------------------------------------------------------------------------

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
30 22 8:17 / /srv/backups rw,nosuid,nodev,relatime shared:9 - ext4 /dev/sdb1 rw
31 22 8:33 / /srv/backups\040old rw,relatime - xfs /dev/sdc1 rw
40 22 0:50 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
41 40 0:51 / /tmp rw,relatime - tmpfs tmpfs rw
garbage line
"""


def test_parse_mountinfo():
    mounts = folders.parse_mountinfo(MOUNTINFO)
    assert [m.point for m in mounts] == ["/", "/proc", "/srv/backups", "/srv/backups old",
                                         "/tmp", "/tmp"]
    assert mounts[2] == Mount("/srv/backups", frozenset({"rw", "nosuid", "nodev",
                                                         "relatime"}), "ext4")


MOUNT_CASES = {
    "the backup disk": ("/srv/backups/web1", "/srv/backups", []),
    "the mount point itself": ("/srv/backups", "/srv/backups", []),
    "a sibling with a longer name is not inside": ("/srv/backupsX/web1", "/", ["nosuid",
                                                                               "nodev"]),
    "an escaped space": ("/srv/backups old/web1", "/srv/backups old", ["nosuid", "nodev"]),
    "stacked mounts: the last one wins": ("/tmp/x", "/tmp", ["nosuid", "nodev"]),
    "the root file system": ("/var/backups/web1", "/", ["nosuid", "nodev"]),
}


@pytest.mark.parametrize("path,point,missing", MOUNT_CASES.values(), ids=MOUNT_CASES.keys())
def test_mount_of(path, point, missing):
    mount = folders.mount_of(folders.parse_mountinfo(MOUNTINFO), path)
    assert mount is not None and mount.point == point
    assert folders.missing_mount_options(mount) == missing


def test_this_machines_mountinfo_parses():
    text = Path("/proc/self/mountinfo").read_text()
    mounts = folders.parse_mountinfo(text)
    assert len(mounts) == len(text.splitlines())
    assert folders.mount_of(mounts, "/") is not None


def test_folders_import_is_stdlib_only():
    result = subprocess.run([sys.executable, "-c", "import sys, roles.local.folders; "
                             "print(sorted(m for m in sys.modules if m.startswith('roles')))"],
                            capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    # Its mount-table parser is roles.core.mounts', standard library as well.
    assert result.stdout.strip() == ("['roles', 'roles.core', 'roles.core.mounts', 'roles.local', "
                                     "'roles.local.folders']")
