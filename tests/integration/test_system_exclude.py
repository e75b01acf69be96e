"""backup.system_exclude against a real lab host: a pull of / leaves out pseudo and volatile
paths, an inventory brings one back, and the restore drill still finds 0 differences.

The container's / is an overlay whose /run, /tmp, /var/tmp and /var/cache/apt/archives are
on the same file system as / (``-x`` alone would copy them) and whose
/var/cache/apt/archives really holds the image's downloaded packages. The seed adds a
marker to each and a swap file. The pull is of / itself (``backup.source: /``); /usr,
/var/lib and /var/log are left out by the test's own ``backup.exclude`` to keep the copy
small (and /var/log changes with every admin login).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.core.rsync import SYSTEM_EXCLUDE
from tests.integration.conftest import Lab, LabServer, invoke, lab_server, sh

pytestmark = pytest.mark.integration

SMALL = ["/usr/*", "/var/lib/*", "/var/log/*", "/var/cache/apt/*.bin"]
MARKERS = ["tmp/pb-marker", "var/tmp/pb-marker", "run/pb-marker",
           "var/cache/apt/archives/pb-marker.deb", "swapfile"]
# Past times for what the seed makes (rsync keeps a same-second copy's own sub-second time
# on folders: the drill would see it).
SEED = r"""
set -eu
for f in /tmp/pb-marker /var/tmp/pb-marker /run/pb-marker \
         /var/cache/apt/archives/pb-marker.deb; do
    printf 'volatile\n' > "$f"
done
head -c 1048576 /dev/zero > /swapfile && chmod 0600 /swapfile
touch -d '2020-02-03 04:05:06' /tmp/pb-marker /var/tmp/pb-marker /run/pb-marker \
    /var/cache/apt/archives/pb-marker.deb /swapfile
touch -d '2020-02-03 04:05:06.5' /tmp /var/tmp /run /var/cache/apt/archives /
ls /var/cache/apt/archives/*.deb | grep -v pb-marker | head -1 | grep -q .
"""


@pytest.fixture(scope="module")
def hardened(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    with lab_server(lab_env, tmp_path_factory, "sysexcl", seed=SEED, defaults={
            "backup": {"source": "/", "exclude": SMALL}}) as server:
        yield server


def test_a_pull_of_root_leaves_out_the_system_paths_but_keeps_their_folders(hardened):
    path, host = hardened.spec("defaults")
    assert host.backup.system_exclude == SYSTEM_EXCLUDE
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = Path(host.destination) / "tree"
    assert (copy / "etc" / "passwd").is_file()  # a real copy of /
    for marker in MARKERS:
        assert not os.path.lexists(copy / marker), marker
    assert not any(name.endswith(".deb") for name in os.listdir(copy / "var/cache/apt/archives"))
    # The folders stay, with their owner and mode: a restored system needs them.
    for folder, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("run", None), ("proc", None),
                         ("sys", None), ("dev", None), ("var/cache/apt/archives", None)):
        info = os.lstat(copy / folder)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == 0, folder
        if mode is not None:
            assert stat.S_IMODE(info.st_mode) == mode, folder
    assert os.listdir(copy / "proc") == [] and os.listdir(copy / "sys") == []
    # The server still has every marker: left out, not lost.
    assert sorted(sh(hardened.lab, "ls " + " ".join(f"/{m}" for m in MARKERS)).split()) == sorted(
        f"/{m}" for m in MARKERS)


def test_an_inventory_brings_a_left_out_path_back(hardened):
    keep = [p for p in SYSTEM_EXCLUDE if p != "/var/tmp/*"]
    path, host = hardened.spec("override", backup={"system_exclude": keep})
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = Path(host.destination) / "tree"
    assert (copy / "var/tmp/pb-marker").read_text() == "volatile\n"
    for marker in MARKERS:
        if marker != "var/tmp/pb-marker":
            assert not os.path.lexists(copy / marker), marker
    # An empty list copies them all (within -x: /proc, /sys, /dev are mounts of their own).
    path, host = hardened.spec("none", backup={"system_exclude": []})
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = Path(host.destination) / "tree"
    for marker in MARKERS:
        assert os.path.lexists(copy / marker), marker


def test_the_drill_compares_what_is_backed_up_zero_differences(hardened):
    """/var holds left-out paths (/var/tmp's marker, apt's packages): the drill leaves out
    what the pull leaves out, so the copy of /var matches the server's /var exactly."""
    path = hardened.write("drill")
    result = invoke("restore-drill", "--inventory", str(path), "--host", hardened.name,
                    "--to", str(hardened.work / "drill-restored"), "--path", "/var")
    assert result.returncode == 0, result.stdout + result.stderr
    excluded = [line for line in result.stdout.splitlines() if "left out by" in line]
    assert excluded, result.stdout
    assert int(excluded[0].split("(")[1].split()[0]) >= 3  # the markers and the packages
