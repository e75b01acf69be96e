"""The restore drill against real containers: a copy that restores the machine exactly.

A lab host (daemon mode, DEFAULT backup.options: rsync.version 3.2.7 gives -avzx -HAXS) is
seeded with everything a plain ``-a`` copy loses: a hard-link group, a file with an ACL,
user xattrs, a copy of a binary with ``cap_net_raw+ep``, setuid/setgid files, char and
block devices, a 100 MB sparse file, symlinks. ``invoke restore-drill`` backs it up,
restores it here and compares with the server: 0 differences. The local restore is then
pushed into a FRESH container (rsync -aHAXS over the admin login, ``sudo rsync`` there)
and read there with the same manifest code: 0 differences again, and getcap, getfacl,
getfattr and stat in that container agree. The notes' options (``-avzx``) are shown to
lose exactly what the drill reports.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core import drill as comparison
from roles.core.rsync import NOTES_OPTIONS
from roles.features import drill
from roles.inventory.schema import load
from roles.remote.session import connect
from tests.integration.conftest import Lab, LabServer, invoke, lab_server, sh

pytestmark = pytest.mark.integration

DATA = "/srv/data"

SEED = r"""
set -eu
D=/srv/data
mkdir -p "$D/etc" "$D/bin" "$D/dev" "$D/var/lib" "$D/shared"
cd "$D"
printf 'one inode, three names\n' > etc/linked
ln etc/linked bin/linked-too
ln etc/linked var/lib/linked-three
printf 'for the auditors\n' > etc/acl-file
setfacl -m u:4242:rw-,g:4243:r-- etc/acl-file
setfacl -d -m u:4242:rwx shared
setfattr -n user.origin -v server etc/acl-file
setfattr -n user.checksum -v 0xdeadbeef bin/linked-too
cp /bin/true bin/ping-copy
setcap cap_net_raw+ep bin/ping-copy
cp /bin/true bin/setuid-true && chmod 4755 bin/setuid-true
cp /bin/true bin/setgid-true && chown 0:4243 bin/setgid-true && chmod 2755 bin/setgid-true
mknod dev/null-copy c 1 3 && chmod 0666 dev/null-copy
mknod dev/loop-copy b 7 0 && chmod 0660 dev/loop-copy && chown 0:6 dev/loop-copy
truncate -s 100M var/lib/sparse.img
printf 'data in the middle' | dd of=var/lib/sparse.img bs=1 seek=52428800 conv=notrunc status=none
ln -s ../etc/linked bin/rel-link
ln -s /etc/hostname abs-link
ln -s /nonexistent dangling && chown -h 4242:4242 dangling
printf 'owned\n' > var/ghost && chown 4242:4243 var/ghost && chmod 0640 var/ghost
touch -d '2019-03-04 05:06:07.123456789' etc/acl-file var/ghost
touch -h -d '2020-01-02 03:04:05.987654321' bin/rel-link dangling dev/null-copy
touch -d '2021-06-07 08:09:10.5' shared var/lib var
# Every other folder, symlink and device gets a past time too: rsync sets those entries'
# sub-second mtime only when the whole second differs, so an entry made in the same
# second as its copy would keep the copy's own fraction (seen as a flaky 4-entry diff).
touch -h -d '2018-05-06 07:08:09.75' abs-link dev/loop-copy
touch -d '2018-05-06 07:08:09.75' etc bin dev .
"""


def table_rows(text: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in text.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[0].strip() in comparison.PROPERTIES:
            rows[parts[0].strip()] = (int(parts[1]), int(parts[2]))
    return rows


def require_local_metadata(where: Path) -> None:
    """The copy lands here: without xattrs (root's security.* included) and ACLs on this
    file system the drill cannot pass. Fail, naming the reason; never skip."""
    probe = where / "xattr-probe"
    probe.write_text("x")
    for name, value in (("user.probe", b"1"),
                        ("security.capability", bytes.fromhex(
                            "0100000200200000000000000000000000000000")),
                        ("system.posix_acl_access", bytes.fromhex(  # u::rw-,g::r--,o::r--
                            "02000000" "01000600ffffffff" "04000400ffffffff"
                            "20000400ffffffff"))):
        try:
            os.setxattr(probe, name, value)
        except OSError as exc:
            pytest.fail(f"{where} cannot hold {name} ({exc.strerror}): the restore drill "
                        "needs a file system with xattrs and ACLs for the copy, as root")
    probe.unlink()


@pytest.fixture(scope="module")
def seeded(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    with lab_server(lab_env, tmp_path_factory, "drill", seed=SEED, name="inventory",
                    backups="backups", defaults={"backup": {"source": DATA}}) as server:
        require_local_metadata(server.work)
        yield server


def test_the_default_options_carry_every_property(seeded):
    host = seeded.host
    assert host.rsync.version == "3.2.7"
    assert host.backup.options == ("-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")


def test_restore_drill_restores_the_machine_exactly(lab_env: Lab, seeded, capsys):
    host_lab, host, inventory, work = seeded.lab, seeded.host, seeded.inventory, seeded.work
    result = invoke("restore-drill", "--inventory", str(inventory), "--host", host_lab.name,
                    "--to", str(work / "restored"))
    with capsys.disabled():
        print("\n--- invoke restore-drill (here) ---\n" + result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == set(comparison.PROPERTIES)
    assert {name: diff for name, (_, diff) in rows.items() if diff} == {}
    # Every property was really exercised by the seed.
    assert {name: checked for name, (checked, _) in rows.items() if not checked} == {}
    assert rows["hard links"][0] == 1 and rows["capabilities"][0] == 1
    assert rows["devices"][0] == 2 and rows["sparse"][0] == 1
    assert rows["setuid/setgid"][0] == 2 and rows["acls"][0] == 2

    # The restore into a fresh machine: push the local copy into a new container.
    fresh = lab_env.start("drill-target")
    try:
        known_hosts = work / "fresh.known_hosts"
        lab.write_known_hosts([fresh], known_hosts)
        ssh = shlex.join(["ssh", "-i", str(lab.admin_key()), "-p", str(fresh.port),
                          "-o", "StrictHostKeyChecking=yes",
                          "-o", f"UserKnownHostsFile={known_hosts}",
                          "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        pushed = subprocess.run(
            ["rsync", "-aHAXS", "--numeric-ids", "-e", ssh, "--rsync-path", "sudo rsync",
             f"{work / 'restored' / 'tree'}/", f"admin@127.0.0.1:{DATA}/"],
            capture_output=True, text=True, timeout=300, check=False)
        assert pushed.returncode == 0, pushed.stderr
        fresh_host = load(lab_env.inventory([fresh], path=work / "fresh.yaml")).hosts[fresh.name]
        server_conn, fresh_conn = connect(host), connect(fresh_host)
        try:
            server = drill.gather_remote_manifest(server_conn, DATA)
            restored = drill.gather_remote_manifest(fresh_conn, DATA)
        finally:
            server_conn.close()
            fresh_conn.close()
        compared = drill.compare_trees(host, server, restored, DATA)
        with capsys.disabled():
            print(f"--- {DATA} on {host.name} against the fresh container {fresh.name} ---\n"
                  + comparison.format_table(compared))
        assert compared.differences == 0, comparison.format_table(compared)

        # The distribution's own tools agree, in the fresh container.
        checks = sh(fresh, f"""cd {DATA}
getcap bin/ping-copy
getfacl -cn etc/acl-file | grep -E '^(user|group):[0-9]'
getfacl -cnd shared | grep -E '^user:[0-9]'
getfattr -n user.origin --only-values etc/acl-file; echo
stat -c '%i %h' etc/linked bin/linked-too var/lib/linked-three
stat -c '%s %b %B' var/lib/sparse.img
stat -c '%a %U' bin/setuid-true
stat -c '%t:%T %F' dev/null-copy dev/loop-copy
""").splitlines()
        assert checks[0].split()[-1] in ("cap_net_raw=ep", "cap_net_raw+ep"), checks
        assert checks[1:4] == ["user:4242:rw-", "group:4243:r--", "user:4242:rwx"], checks
        assert checks[4] == "server", checks
        inodes = {line.split()[0] for line in checks[5:8]}
        assert len(inodes) == 1 and all(line.split()[1] == "3" for line in checks[5:8])
        size, blocks, unit = map(int, checks[8].split())
        assert size == 100 * 2**20 and blocks * unit < 1 * 2**20, checks[8]
        assert checks[9] == "4755 root"
        assert checks[10:12] == ["1:3 character special file", "7:0 block special file"]
    finally:
        lab_env.remove(fresh)


def test_the_notes_options_lose_what_the_drill_reports(seeded):
    host_lab, work = seeded.lab, seeded.work
    inventory = seeded.write("notes", backup={
        "destination": str(work / "notes" / "{name}"), "allow_inexact": True,
        "options": list(NOTES_OPTIONS)})
    result = invoke("restore-drill", "--inventory", str(inventory), "--host", host_lab.name,
                    "--to", str(work / "notes-restored"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restore-drill: " in result.stderr and " differences" in result.stderr
    lost = {name: diff for name, (_, diff) in table_rows(result.stdout).items() if diff}
    # 3 names of one inode become 3 files: one group lost; the ACL'd file and the default
    # ACL folder; the xattr'd files; ping's capability; the holes.
    assert lost == {"hard links": 1, "acls": 2, "xattrs": 4, "capabilities": 1,
                    "sparse": 1}, result.stdout
