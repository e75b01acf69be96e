"""File systems a ``-x`` pull skips, on a real lab host: the container gets a tmpfs of its
own at ``MOUNT`` (a second file system inside the tree, as a separately mounted /home or
/srv is on a server), with files in it. doctor names it, with the field that pulls it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import keys
from tests.integration.conftest import Lab
from tests.integration.test_doctor import PINNED, problems, run_doctor, the

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


def inventory(lab_env: Lab, host: lab.LabHost, work: Path, name: str, **backup) -> Path:
    return lab_env.inventory([host], path=work / f"{name}.yaml", defaults={
        "rsync": PINNED,
        "backup": {"destination": str(work / name / "{name}"), **backup}})


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
