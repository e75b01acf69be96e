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
import subprocess
import sys
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core.rsync import SYSTEM_EXCLUDE
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import keys
from tests.integration.conftest import Lab

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
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


def sh(host: lab.LabHost, script: str) -> str:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=120).stdout.decode()


def invoke(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, timeout=timeout,
                          text=True, check=False)


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("sysexcl")
    host_lab = lab_env.start("sysexcl")
    try:
        sh(host_lab, SEED)
        yield host_lab, work
    finally:
        lab_env.remove(host_lab)


def inventory(lab_env: Lab, host_lab: lab.LabHost, work: Path, name: str, **backup) -> Path:
    return lab_env.inventory([host_lab], path=work / f"{name}.yaml", defaults={"backup": {
        "destination": str(work / name / "{name}"), "source": "/", "exclude": SMALL,
        **backup}})


@pytest.fixture(scope="module")
def hardened(lab_env: Lab, server):
    host_lab, work = server
    path = inventory(lab_env, host_lab, work, "setup")
    host = load(path).hosts[host_lab.name]
    keys.ensure_backup_key(Path(host.backup_key))
    outcome = setup_host(host)
    assert outcome.error is None, outcome
    return host_lab, work


def test_a_pull_of_root_leaves_out_the_system_paths_but_keeps_their_folders(lab_env,
                                                                              hardened):
    host_lab, work = hardened
    path = inventory(lab_env, host_lab, work, "defaults")
    host = load(path).hosts[host_lab.name]
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
    assert sorted(sh(host_lab, "ls " + " ".join(f"/{m}" for m in MARKERS)).split()) == sorted(
        f"/{m}" for m in MARKERS)


def test_an_inventory_brings_a_left_out_path_back(lab_env, hardened):
    host_lab, work = hardened
    keep = [p for p in SYSTEM_EXCLUDE if p != "/var/tmp/*"]
    path = inventory(lab_env, host_lab, work, "override", system_exclude=keep)
    host = load(path).hosts[host_lab.name]
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = Path(host.destination) / "tree"
    assert (copy / "var/tmp/pb-marker").read_text() == "volatile\n"
    for marker in MARKERS:
        if marker != "var/tmp/pb-marker":
            assert not os.path.lexists(copy / marker), marker
    # An empty list copies them all (within -x: /proc, /sys, /dev are mounts of their own).
    path = inventory(lab_env, host_lab, work, "none", system_exclude=[])
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = Path(load(path).hosts[host_lab.name].destination) / "tree"
    for marker in MARKERS:
        assert os.path.lexists(copy / marker), marker


def test_the_drill_compares_what_is_backed_up_zero_differences(lab_env, hardened):
    """/var holds left-out paths (/var/tmp's marker, apt's packages): the drill leaves out
    what the pull leaves out, so the copy of /var matches the server's /var exactly."""
    host_lab, work = hardened
    path = inventory(lab_env, host_lab, work, "drill")
    result = invoke("restore-drill", "--inventory", str(path), "--host", host_lab.name,
                    "--to", str(work / "drill-restored"), "--path", "/var")
    assert result.returncode == 0, result.stdout + result.stderr
    excluded = [line for line in result.stdout.splitlines() if "left out by" in line]
    assert excluded, result.stdout
    assert int(excluded[0].split("(")[1].split()[0]) >= 3  # the markers and the packages
