"""`invoke backup` and `invoke restore` against a real lab host in daemon mode.

One container for the module, hardened for real by ``setup_host`` (daemon forced command;
the host's Debian rsync 3.2.7 serves it because /usr/local/bin/rsync is not built here) and
seeded with a tree that hurts, with a tmpfs mounted inside it (``MOUNT``: a second file
system that ``-x`` must skip). Locally ``rsync.local_prefix`` has no build, so the fallback
``rsync`` on PATH is used, with its warning. Every comparison is path by path: type, mode,
numeric owner, mtime (whole seconds), link target, content hash, and shared inodes; like
``rsync -x`` it stays on the tree's file system (``find -xdev``): the mount point is
compared, its contents are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core import pull
from roles.core.spec import HostSpec
from roles.inventory.schema import DEFAULT_OPTIONS, load
from roles.local import runner, store
from tests.integration.conftest import INVOKE, ROOT, Lab, LabServer, held_lock, invoke, lab_server
from tests.integration.conftest import sh_bytes as sh

pytestmark = pytest.mark.integration

DATA = "/srv/data"
MOUNT = f"{DATA}/mnt"  # the module's host mounts a tmpfs here (elsewhere: a plain folder)
OPTIONS = ["-avzHx", "--numeric-ids", "--delete", "--progress"]

SEED = r"""
set -eu
D=/srv/data
# Everything but mnt, which may be a mount point (rm -rf cannot remove one).
mkdir -p "$D"
find "$D" -mindepth 1 -maxdepth 1 ! -name mnt -exec rm -rf {} +
mkdir -p "$D/some/dir/deeper" "$D/empty" "$D/mnt"
cd "$D"
printf 'on the second file system\n' > mnt/other-fs
printf 'with spaces\n' > 'a file with spaces'
printf 'newline\n' > "$(printf 'new\nline')"
printf 'latin-1\n' > "$(printf 'caf\351')"
ln -s /etc/hostname abs-link
ln -s 'a file with spaces' rel-link
ln -s /nonexistent/target dangling
chown -h 4242:4242 dangling
printf 'linked\n' > hard1
ln hard1 some/hard2
printf 'secret\n' > root-only && chmod 0600 root-only
cp /bin/true setuid-bin && chmod 4755 setuid-bin
cp /bin/sh setuid-sh && chmod 4755 setuid-sh
mknod null-dev c 1 3 && chmod 0666 null-dev
mknod disk-dev b 7 0 && chmod 0660 disk-dev
printf 'ghost\n' > some/dir/ghost-owned && chown 4242:4242 some/dir/ghost-owned
mkdir some/dir/ghost-dir && chown 4242:4243 some/dir/ghost-dir && chmod 2750 some/dir/ghost-dir
printf 'deep\n' > some/dir/deeper/file && chmod 0640 some/dir/deeper/file
head -c 20000000 /dev/urandom > big.bin
touch -d '2011-12-13 14:15:16' some/dir/deeper/file
touch -h -d '2001-02-03 04:05:06' rel-link
"""

CHANGE = r"""
set -eu
cd /srv/data
printf 'changed, and longer\n' >> 'a file with spaces'
rm "$(printf 'caf\351')" dangling
rm -r some/dir/deeper
printf 'added\n' > 'added file' && mkdir -p added-dir/sub && chown 4243:4244 added-dir
ln hard1 added-dir/hard3
chmod 0700 root-only
chown 4243 some/dir/ghost-owned
"""


# The source comes back (nearly) empty, as when its data disk is not mounted: everything
# moves aside but the mount point (then the tree is `.` and `mnt`); RESTORE moves it back.
EMPTY = r"""
set -eu
mkdir /srv/away
find /srv/data -mindepth 1 -maxdepth 1 ! -name mnt -exec mv -t /srv/away {} +
"""
RESTORE = r"""
set -eu
find /srv/away -mindepth 1 -maxdepth 1 -exec mv -t /srv/data {} +
rmdir /srv/away
"""


# --- helpers --------------------------------------------------------------------------------


Entry = tuple[str, int, int, int, int, bytes, str | None]  # type mode uid gid mtime link sha


def remote_tree(host: lab.LabHost, top: str, *, xdev: bool = False,
                ) -> tuple[dict[bytes, Entry], dict[bytes, int]]:
    """Every path under ``top`` on the host: metadata from find, hashes from sha256sum.

    ``xdev``: stay on ``top``'s file system, as ``rsync -x`` does (the engine bind-mounts
    /etc/hosts, /etc/hostname and /etc/resolv.conf into a container).
    """
    x = " -xdev" if xdev else ""
    out = sh(host, f"find {top}{x} -printf '%P\\0%y\\0%m\\0%U\\0%G\\0%T@\\0%l\\0%i\\0'")
    fields = out.split(b"\0")[:-1]
    assert len(fields) % 8 == 0
    hashes: dict[bytes, str] = {}
    hashed = sh(host, f"cd {top} && find .{x} -type f -exec sha256sum -z {{}} +")
    for record in hashed.split(b"\0")[:-1]:
        digest, name = record.split(b"  ", 1)
        hashes[name.removeprefix(b"./")] = digest.decode()
    tree: dict[bytes, Entry] = {}
    inodes: dict[bytes, int] = {}
    for i in range(0, len(fields), 8):
        rel, kind, mode, uid, gid, mtime, link, inode = fields[i:i + 8]
        tree[rel] = (kind.decode(), int(mode, 8), int(uid), int(gid),
                     int(mtime.split(b".")[0]), link, hashes.get(rel))
        inodes[rel] = int(inode)
    return tree, inodes


KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
         stat.S_IFBLK: "b"}


def local_tree(top: Path) -> tuple[dict[bytes, Entry], dict[bytes, int]]:
    """The same walk locally with os.lstat (bytes names: non-UTF-8 survives)."""
    base = os.fsencode(top)
    tree: dict[bytes, Entry] = {}
    inodes: dict[bytes, int] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if dirpath == base else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, base) if path != base else b""
            info = os.lstat(path)
            kind = KINDS.get(stat.S_IFMT(info.st_mode), "?")
            digest = None
            if kind == "f":
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            link = os.readlink(path) if kind == "l" else b""
            tree[rel] = (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
                         int(info.st_mtime), link, digest)
            inodes[rel] = info.st_ino
    return tree, inodes


def assert_same(host: lab.LabHost, top: str, local: Path) -> dict[bytes, Entry]:
    """``local`` is an exact copy of ``top`` on the host's file system (as ``rsync -x``)."""
    remote, remote_inodes = remote_tree(host, top, xdev=True)
    mine, my_inodes = local_tree(local)
    assert sorted(mine) == sorted(remote)
    for rel, entry in remote.items():
        assert mine[rel] == entry, (rel, entry, mine[rel])
    # Hard links: paths sharing an inode on the host share one locally, and only those.
    groups: dict[int, list[bytes]] = {}
    for rel, inode in remote_inodes.items():
        if remote[rel][0] == "f":
            groups.setdefault(inode, []).append(rel)
    for paths in groups.values():
        assert len({my_inodes[p] for p in paths}) == 1, paths
    assert len({my_inodes[p[0]] for p in groups.values()}) == len(groups)
    return remote


def summary_of(result: subprocess.CompletedProcess, dest: Path) -> dict:
    logs = sorted((Path(str(dest) + ".pullback") / "logs").glob("*.json"),
                  key=lambda path: store.run_key(path.stem))
    assert logs, result.stderr
    return json.loads(logs[-1].read_text())


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The module's host (a tmpfs at MOUNT), seeded, set up with the inventory ``mirror``."""
    with lab_server(lab_env, tmp_path_factory, "backup", tmpfs=(MOUNT,), seed=SEED,
                    name="mirror", defaults={"backup": {
                        "source": DATA, "allow_inexact": True, "options": OPTIONS}}) as server:
        assert server.outcome is not None
        assert any("/usr/bin/rsync" in w for w in server.outcome.warnings)
        yield server


@pytest.fixture(scope="module")
def remote(server: LabServer) -> lab.LabHost:
    return server.lab


@pytest.fixture(scope="module")
def work(server: LabServer) -> Path:
    return server.work


@pytest.fixture(scope="module")
def mirror(server: LabServer) -> tuple[Path, HostSpec]:
    return server.inventory, server.host


@pytest.fixture(scope="module")
def snapshots(server: LabServer) -> tuple[Path, HostSpec]:
    return server.spec("snapshots", backup={"snapshots": 2})


# --- mirror mode ----------------------------------------------------------------------------


def test_mirror_backup_is_an_exact_copy_then_follows_changes(remote, mirror):
    inventory, host = mirror
    dest = Path(host.destination)
    copy = dest / "tree"
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is not built: using" in result.stderr  # the local fallback warning
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["host", "result"]
    assert table[1].split()[:2] == [remote.name, "ok"]
    assert os.listdir(dest) == ["tree"] and stat.S_IMODE(dest.stat().st_mode) == 0o700
    tree = assert_same(remote, DATA, copy)
    assert tree[b"setuid-bin"][1] == 0o4755 and tree[b"root-only"][1] == 0o600
    assert tree[b"null-dev"][0] == "c" and tree[b"disk-dev"][0] == "b"
    assert os.stat(copy / "null-dev", follow_symlinks=False).st_rdev == os.makedev(1, 3)
    assert tree[b"some/dir/ghost-owned"][2:4] == (4242, 4242)
    assert tree[b"new\nline"][0] == "f" and tree[b"caf\xe9"][0] == "f"
    assert tree[b"dangling"][0] == "l" and tree[b"empty"][0] == "d"
    assert tree[b"big.bin"][0] == "f" and (copy / "big.bin").stat().st_size == 20_000_000
    # -x: the mount point is copied (an empty folder with the mount's metadata), not its file.
    assert tree[b"mnt"][0] == "d" and os.listdir(copy / "mnt") == []

    summary = summary_of(result, dest)
    assert summary["ok"] and summary["mode"] == "mirror"
    regular = sum(1 for entry in tree.values() if entry[0] == "f")
    assert summary["stats"]["files_transferred"] == regular - 1  # hard2 is linked, not sent
    source = summary["argv"][-2]
    assert source == f"root@127.0.0.1::system{DATA}/"  # daemon mode: `::`, never `host:/`
    assert "--progress" not in summary["argv"]  # not a terminal
    assert summary["argv"][-1] == f"{copy}/"
    assert not any(p.name.startswith(".") for p in copy.iterdir())  # nothing of ours inside
    assert (Path(str(dest) + ".pullback").stat().st_mode & 0o777) == 0o700

    sh(remote, CHANGE)
    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    tree = assert_same(remote, DATA, copy)
    assert not (copy / os.fsdecode(b"caf\xe9")).exists()
    assert not (copy / "some/dir/deeper").exists() and not os.path.lexists(copy / "dangling")
    assert tree[b"added-dir"][2:4] == (4243, 4244)


def test_dry_run_changes_nothing(remote, mirror):
    inventory, host = mirror
    dest = Path(host.destination)
    sh(remote, "cd /srv/data && printf 'added\\n' > 'added file'")  # as CHANGE leaves it
    invoke("backup", "--inventory", str(inventory))  # in step with the host
    sh(remote, "cd /srv/data && printf 'dry\\n' > dry-only && rm 'added file'")
    before = local_tree(dest)
    assert b"tree/added file" in before[0]
    result = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].split()[1] == "dry-run"
    assert local_tree(dest) == before
    summary = summary_of(result, dest)
    assert summary["dry_run"] and "-n" in summary["argv"]
    assert summary["stats"]["files_transferred"] == 1 and summary["stats"]["dry_run"]


def test_a_second_concurrent_run_fails_at_once(mirror):
    inventory, host = mirror
    with held_lock(host):
        started = time.monotonic()
        result = invoke("backup", "--inventory", str(inventory))
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert f"another backup of {host.name} is running (pid 4711)" in result.stderr
    assert elapsed < 10
    assert result.stdout.splitlines()[1].split()[1] == "failed"


def test_a_restore_while_a_backup_runs_fails_at_once(mirror, work):
    inventory, host = mirror
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    target = work / "restored-while-locked"
    with held_lock(host, "4711 rsync 4712\n"):
        started = time.monotonic()
        result = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                        "--path", f"{DATA}/some", "--to", str(target))
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert (f"restore: another backup of {host.name} is running (pid 4711, rsync pid 4712)"
            in result.stderr)
    assert elapsed < 10 and not target.exists()


def test_restore_round_trips_a_folder_and_refuses_a_non_empty_target(remote, mirror, work):
    inventory, host = mirror
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    target = work / "restored"
    args = ("restore", "--inventory", str(inventory), "--host", host.name,
            "--path", f"{DATA}/some", "--to", str(target))
    result = invoke(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"into {target}/tree" in result.stdout
    assert os.listdir(target) == ["tree"] and stat.S_IMODE(target.stat().st_mode) == 0o700
    # Hard links within the restored folder survive; hard2's partners outside it do not
    # come along, so compare the folder without the inode check.
    remote_entries, _ = remote_tree(remote, f"{DATA}/some")
    assert local_tree(target / "tree")[0] == remote_entries
    assert remote_entries[b"dir/ghost-dir"][1:4] == (0o2750, 4242, 4243)

    refused = invoke(*args)
    assert refused.returncode == 2 and "use --force" in refused.stderr
    escape = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                    "--path", f"{DATA}/../etc", "--to", str(work / "escape"))
    assert escape.returncode == 2 and "'..'" in escape.stderr
    assert not (work / "escape").exists()


def test_x_copies_the_mount_point_but_not_the_second_file_system(server, remote, mirror):
    """The default options (-avzx, no -H): the tmpfs at MOUNT arrives as an empty folder."""
    data_dev, mount_dev = sh(remote, f"stat -c %d {DATA} {MOUNT}").split()
    assert data_dev != mount_dev, "MOUNT is not a file system of its own"
    assert b"mnt/other-fs" in remote_tree(remote, DATA)[0]  # there, one file system down
    inventory, host = server.spec("default-options",
                                  backup={"options": list(DEFAULT_OPTIONS)})
    dest = Path(host.destination)
    copy = dest / "tree"
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-avzx" in summary_of(result, dest)["argv"]
    assert (copy / "mnt").is_dir() and not (copy / "mnt").is_symlink()
    assert os.listdir(copy / "mnt") == [] and not os.path.lexists(copy / "mnt" / "other-fs")
    # Path by path what find -xdev sees, the mount point's own metadata (its tmpfs root's)
    # included; without -H hard links arrive as separate copies, so no inode check.
    theirs = remote_tree(remote, DATA, xdev=True)[0]
    assert b"mnt" in theirs and b"mnt/other-fs" not in theirs
    assert local_tree(copy)[0] == theirs


def test_mirror_guard_refuses_an_emptied_source_before_any_deletion(server, remote, mirror):
    """Mirror mode, max_delete 5: the emptied source is found by a dry run first and the
    run fails with ZERO files deleted (rsync's --max-delete alone deletes the first 5)."""
    inventory, host = server.spec("mirror-guarded", backup={"max_delete": 5})
    dest = Path(host.destination)
    copy = dest / "tree"
    first = invoke("backup", "--inventory", str(inventory))
    assert first.returncode == 0, first.stdout + first.stderr
    before = local_tree(copy)
    assert len(before[0]) > 15
    sh(remote, EMPTY)
    try:
        started = time.monotonic()
        stopped = invoke("backup", "--inventory", str(inventory))
        refused_in = time.monotonic() - started
    finally:
        sh(remote, RESTORE)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert stopped.stdout.splitlines()[1].split()[:2] == [remote.name, "failed"]
    # Everything but `.` and the mount point would go; rsync counts the skipped entries
    # as it meets them (a folder whose contents were skipped is not counted again).
    gone = len(before[0]) - 2
    match = re.search(rf"{remote.name}: failed: refused before any deletion: the pull would "
                      rf"delete at least (\d+) files from {re.escape(str(copy))}, more than "
                      r"backup.max_delete 5 \(a dry run found it; nothing was deleted or "
                      r"transferred\)", stopped.stderr)
    assert match, stopped.stderr
    assert 5 < int(match[1]) <= gone
    assert "check the server" in stopped.stderr
    assert local_tree(copy) == before  # not one file deleted, nothing touched
    summary = summary_of(stopped, dest)
    check = summary["deletion_check"]
    assert check["over_limit"] and check["exit_code"] == 25
    assert check["would_delete"] == int(match[1])
    assert "-n" in check["argv"] and "--max-delete=5" in check["argv"]
    print(f"refused in {refused_in:.2f}s")

    # The source is back: the check passes and the pull follows it at once, even though
    # the check's daemon may still hold the module (max connections = 1).
    started = time.monotonic()
    again = invoke("backup", "--inventory", str(inventory))
    both = time.monotonic() - started
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same(remote, DATA, copy)
    summary = summary_of(again, dest)
    assert summary["deletion_check"]["over_limit"] is False
    assert summary["deletion_check"]["exit_code"] == 0
    print(f"check {summary['deletion_check']['seconds']:.2f}s of a {both:.2f}s run")


# --- snapshot mode --------------------------------------------------------------------------


def test_snapshots_share_unchanged_files_and_keep_the_newest_two(remote, snapshots, work):
    inventory, host = snapshots
    dest = Path(host.destination)
    made = []
    for n in range(3):
        sh(remote, f"cd /srv/data && printf 'run {n}\\n' > changing && "
                   f"touch -d '2020-01-0{n + 1} 00:00:00' changing")
        result = invoke("backup", "--inventory", str(inventory))
        assert result.returncode == 0, result.stdout + result.stderr
        made.append(result.stdout.splitlines()[1].split()[-1])
    assert len(set(made)) == 3
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700  # the container of every snapshot
    assert store.complete_snapshots(os.listdir(dest)) == made[1:]
    assert store.partial_snapshots(os.listdir(dest)) == []
    assert os.readlink(dest / "latest") == made[-1]
    older, newer = dest / made[1], dest / made[2]
    assert (older / "big.bin").stat().st_ino == (newer / "big.bin").stat().st_ino
    assert (older / "changing").stat().st_ino != (newer / "changing").stat().st_ino
    assert (newer / "changing").read_text() == "run 2\n"
    assert_same(remote, DATA, newer)
    summary = summary_of(result, dest)
    assert summary["snapshot"] == str(newer) and summary["pruned"] == [made[0]]
    assert f"--link-dest={older}" in summary["argv"]

    # A dry run leaves the snapshots exactly as they are.
    dry = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert sorted(os.listdir(dest)) == sorted([*made[1:], "latest"])

    # Restore from the older snapshot by name.
    target = work / "from-snapshot"
    restored = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                      "--path", f"{DATA}/changing", "--to", str(target),
                      "--snapshot", made[1])
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (target / "tree" / "changing").read_text() == "run 1\n"


def test_a_killed_pull_keeps_the_snapshots_and_the_next_run_resumes(server, remote, snapshots):
    inventory, host = snapshots
    dest = Path(host.destination)
    before, latest = sorted(os.listdir(dest)), os.readlink(dest / "latest")
    sh(remote, "head -c 20000000 /dev/urandom > /srv/data/big2.bin")
    slow, _ = server.spec("snapshots", file="slow", backup={  # ~5 s for big2.bin
        "snapshots": 2, "options": [*OPTIONS, "--bwlimit=4000"]})
    job = subprocess.Popen([INVOKE, "backup", "--inventory", str(slow)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 30
    while not store.partial_snapshots(os.listdir(dest)):
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    time.sleep(1.5)
    assert job.poll() is None, "the slow pull finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: pullback, rsync and ssh
    job.wait()
    partial = store.partial_snapshots(os.listdir(dest))
    assert len(partial) == 1
    assert sorted(os.listdir(dest)) == sorted([*before, *partial])
    assert os.readlink(dest / "latest") == latest

    # The server's daemon notices the dropped connection; until then max connections = 1.
    deadline = time.monotonic() + 20
    while sh(remote, "pgrep -f '[r]sync --server --daemon' || true").strip():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed the interrupted run {partial[0]}" in result.stderr
    assert store.partial_snapshots(os.listdir(dest)) == []
    newest = os.readlink(dest / "latest")
    assert newest not in before and len(store.complete_snapshots(os.listdir(dest))) == 2
    assert_same(remote, DATA, dest / newest)


def test_snapshot_guard_refuses_an_emptied_source_and_the_next_run_goes_on(server, remote,
                                                                           mirror):
    """A new snapshot deletes nothing, so --max-delete cannot fire: the file count of the
    run is compared with the newest snapshot's, and a collapse is never promoted."""
    inventory, host = server.spec("guarded", backup={"snapshots": 2, "max_delete": 3})
    dest = Path(host.destination)
    for _ in range(2):
        result = invoke("backup", "--inventory", str(inventory))
        assert result.returncode == 0, result.stdout + result.stderr
    good = store.complete_snapshots(os.listdir(dest))
    assert len(good) == 2 and os.readlink(dest / "latest") == good[-1]
    files = summary_of(result, dest)["stats"]["files"]
    kept = {name: local_tree(dest / name) for name in good}
    sh(remote, EMPTY)
    try:
        # More refused runs than snapshots kept: pruning would otherwise have begun.
        refused = [invoke("backup", "--inventory", str(inventory)) for _ in range(3)]
    finally:
        sh(remote, RESTORE)
    for run in refused:
        assert run.returncode == 1, run.stdout + run.stderr
        assert run.stdout.splitlines()[1].split()[:2] == [remote.name, "failed"]
        assert (f"refused to promote the run: the source has 2 files, the newest snapshot "
                f"{good[-1]} has {files} (") in run.stderr  # `.` and the mount point
        assert f"{files - 2} fewer, more than backup.max_delete 3" in run.stderr
    summary = summary_of(refused[-1], dest)
    assert not summary["ok"] and summary["pruned"] == [] and summary["snapshot"] is None
    assert summary["stats"]["files"] == 2 and "--link-dest=" + str(dest / good[-1]) in \
        summary["argv"]
    assert sorted(os.listdir(dest)) == sorted([*good, "latest"])  # no .partial left behind
    assert os.readlink(dest / "latest") == good[-1]
    assert {name: local_tree(dest / name) for name in good} == kept

    # The data is back: the next run is promoted, linked to the last good snapshot.
    back = invoke("backup", "--inventory", str(inventory))
    assert back.returncode == 0, back.stdout + back.stderr
    newest = os.readlink(dest / "latest")
    assert store.complete_snapshots(os.listdir(dest)) == [good[-1], newest]
    assert (dest / newest / "big.bin").stat().st_ino == (dest / good[-1] / "big.bin").stat().st_ino
    assert_same(remote, DATA, dest / newest)


# --- what local users can reach ---------------------------------------------------------------

# runuser, not setpriv: `setpriv --reuid nobody PROGRAM` was seen here running a setuid
# program from inside a 0700 folder, which no real unprivileged user can do.
NOBODY = ["runuser", "-u", "nobody", "--"]


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30,
                          check=False, cwd="/")


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A root-owned 0755 folder under /tmp that nobody can traverse (pytest's own tmp
    folders are 0700, which would hide the copy from other users by accident)."""
    import shutil

    path = Path(f"/tmp/pullback-open-{os.getpid()}")
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_local_users_cannot_reach_the_servers_setuid_files_and_devices(lab_env, remote,
                                                                     mirror, open_parent):
    """The attack: after a mirror pull, an unprivileged local user tries the copy's
    setuid-root shell and its device nodes. Before DEST/tree, DEST took the server's 0755
    and `setuid-sh -p` gave that user a root shell."""
    path = lab_env.inventory([remote], path=open_parent / "inventory.yaml", defaults={
        "rsync": {"local_prefix": str(open_parent / "no-local-build")},
        "backup": {"destination": str(open_parent / "backups" / "{name}"), "source": DATA,
                   "allow_inexact": True, "options": OPTIONS, "allow_destination": str(open_parent / "backups")},
    })
    host = load(path).hosts[remote.name]
    result = invoke("backup", "--inventory", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    dest = Path(host.destination)
    copy = dest / "tree"
    assert (copy / "setuid-sh").stat().st_mode & 0o7777 == 0o4755  # the hazard is there
    assert stat.S_ISCHR(os.lstat(copy / "null-dev").st_mode)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700 and dest.stat().st_uid == 0
    # pullback made the missing parent 0700; an operator's parent is often 0755
    # (/var/backups): only DEST itself may stand between local users and the copy.
    dest.parent.chmod(0o755)

    # Control: nobody does reach the folder that holds DEST...
    assert as_nobody("stat", str(dest.parent)).returncode == 0
    # ...and nothing below DEST.
    for target in (copy, copy / "setuid-sh", copy / "null-dev", copy / "disk-dev"):
        tried = as_nobody("stat", str(target))
        assert tried.returncode != 0 and "Permission denied" in tried.stderr, target
    tried = as_nobody(str(copy / "setuid-sh"), "-p", "-c", "id -u")
    assert tried.returncode != 0 and tried.stdout == "", tried
    assert as_nobody("ls", str(dest)).returncode != 0

    # The same checks against the old layout's mode (DEST took the server's 0755) do reach
    # the hazard: they are not failing for some other reason.
    dest.chmod(0o755)
    try:
        assert as_nobody("stat", str(copy / "null-dev")).returncode == 0
        if not os.statvfs(copy).f_flag & os.ST_NOSUID:
            shell = as_nobody(str(copy / "setuid-sh"), "-p", "-c", "id -u")
            assert shell.stdout == "0\n", shell
    finally:
        dest.chmod(0o700)


# --- unsafe folders on the way: refused, nothing written ------------------------------------


@pytest.fixture
def shared_dir(work: Path) -> Path:
    """A group-writable folder: its group's members could swap what lies below it."""
    path = work / f"shared-{len(list(work.iterdir()))}"
    path.mkdir()
    path.chmod(0o775)
    return path


def test_backup_keygen_and_restore_refuse_a_group_writable_ancestor(lab_env, remote, mirror,
                                                                   work, shared_dir):
    refusal = (f"refused: {shared_dir} is writable by its group (mode 0775): another user "
               f"could replace what lies below it; fix: chmod go-w {shared_dir}, or choose a "
               "folder only root can write")
    path = lab_env.inventory([remote], path=work / "shared.yaml", defaults={
        "backup_key": str(shared_dir / "keys" / "backup_ed25519"),
        "backup": {"destination": str(shared_dir / "backups" / "{name}"), "source": DATA},
    })
    keygen = invoke("keygen", "--inventory", str(path))
    assert keygen.returncode == 1
    assert keygen.stderr.strip() == f"keygen: {refusal}"
    assert os.listdir(shared_dir) == []  # not even the key

    # The inventory's own key, the refused destination.
    path = lab_env.inventory([remote], path=work / "shared.yaml", defaults={
        "backup": {"destination": str(shared_dir / "backups" / "{name}"), "source": DATA},
    })
    backup = invoke("backup", "--inventory", str(path))
    assert backup.returncode == 1
    assert (f"{remote.name}: failed: {refusal}; next: invoke doctor --inventory {path} "
            f"--host {remote.name}") in backup.stderr.splitlines()
    assert os.listdir(shared_dir) == []

    mirror_inventory, host = mirror
    assert invoke("backup", "--inventory", str(mirror_inventory)).returncode == 0
    restore = invoke("restore", "--inventory", str(mirror_inventory), "--host", host.name,
                     "--path", f"{DATA}/some", "--to", str(shared_dir / "restored"))
    assert restore.returncode == 2
    assert restore.stderr.strip() == f"restore: {refusal}"
    assert os.listdir(shared_dir) == []


# --- the old mirror layout ------------------------------------------------------------------


def test_an_old_mirror_layout_moves_into_tree_and_nothing_is_lost(server, remote, mirror):
    inventory, host = server.spec("old-layout")
    dest = Path(host.destination)
    # DEST as the old code filled it: the pull's target was DEST itself.
    rsync, _ = runner.find_local_rsync(host)
    dest.mkdir(parents=True, mode=0o700)
    old = subprocess.run(pull.build_argv(host, dry_run=False, tty=False, local_rsync=rsync,
                                          dest=str(dest)), capture_output=True, check=False)
    assert old.returncode == 0, old.stderr
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755  # the server's, as before the fix
    assert (dest / "setuid-sh").exists()
    before, before_inodes = local_tree(dest)

    dry = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "holds the old layout: a real run first moves it" in dry.stderr
    assert local_tree(dest) == (before, before_inodes)

    moved = invoke("backup", "--inventory", str(inventory))
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"moved the old layout's {len(os.listdir(dest / 'tree'))} entries into " \
           f"{dest}/tree" in moved.stderr
    assert f"{dest}: mode 0755 -> 0700" in moved.stderr
    assert os.listdir(dest) == ["tree"] and stat.S_IMODE(dest.stat().st_mode) == 0o700
    after, after_inodes = local_tree(dest / "tree")
    assert after == before  # every path, mode, owner, mtime, link and hash
    del after_inodes[b""], before_inodes[b""]  # DEST's own inode stays with DEST
    assert after_inodes == before_inodes  # renamed, not copied
    assert summary_of(moved, dest)["stats"]["files_transferred"] == 0
    assert_same(remote, DATA, dest / "tree")

    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "moved" not in again.stderr and "mode" not in again.stderr
    assert summary_of(again, dest)["stats"]["files_transferred"] == 0
    assert local_tree(dest / "tree")[0] == after
