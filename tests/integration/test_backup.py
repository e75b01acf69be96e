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

import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.features import backup as pulls
from roles.features.setup_remote import setup_host
from roles.inventory.schema import DEFAULT_OPTIONS, Host, load
from roles.local import keys
from tests.integration.conftest import Lab

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
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


def sh(host: lab.LabHost, script: str) -> bytes:
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=60).stdout


def invoke(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, timeout=timeout,
                          text=True, encoding="utf-8", errors="replace", check=False)


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


KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l"}


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
                  key=lambda path: pulls.run_key(path.stem))
    assert logs, result.stderr
    return json.loads(logs[-1].read_text())


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(lab_env: Lab) -> Iterator[lab.LabHost]:
    host = lab_env.start("backup", tmpfs=(MOUNT,))
    try:
        yield host
    finally:
        lab_env.remove(host)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backup")


def write_inventory(lab_env: Lab, remote: lab.LabHost, work: Path, name: str,
                    file: str | None = None, **backup) -> tuple[Path, Host]:
    path = lab_env.inventory([remote], path=work / f"{file or name}.yaml", defaults={
        "rsync": {"local_prefix": str(work / "no-local-build")},
        "backup": {"destination": str(work / name / "{name}"), "source": DATA,
                   "options": OPTIONS, **backup},
    })
    return path, load(path).hosts[remote.name]


@pytest.fixture(scope="module")
def mirror(lab_env: Lab, remote: lab.LabHost, work: Path) -> tuple[Path, Host]:
    inventory, host = write_inventory(lab_env, remote, work, "mirror")
    keys.ensure_backup_key(Path(host.backup_key))
    outcome = setup_host(host)
    assert outcome.error is None, outcome
    assert any("/usr/bin/rsync" in w for w in outcome.warnings)
    sh(remote, SEED)
    return inventory, host


@pytest.fixture(scope="module")
def snapshots(lab_env: Lab, remote: lab.LabHost, work: Path, mirror) -> tuple[Path, Host]:
    return write_inventory(lab_env, remote, work, "snapshots", snapshots=2)


# --- mirror mode ----------------------------------------------------------------------------


def test_mirror_backup_is_an_exact_copy_then_follows_changes(remote, mirror):
    inventory, host = mirror
    dest = Path(host.destination)
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is not built: using" in result.stderr  # the local fallback warning
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["host", "result"]
    assert table[1].split()[:2] == [remote.name, "ok"]
    tree = assert_same(remote, DATA, dest)
    assert tree[b"setuid-bin"][1] == 0o4755 and tree[b"root-only"][1] == 0o600
    assert tree[b"some/dir/ghost-owned"][2:4] == (4242, 4242)
    assert tree[b"new\nline"][0] == "f" and tree[b"caf\xe9"][0] == "f"
    assert tree[b"dangling"][0] == "l" and tree[b"empty"][0] == "d"
    assert tree[b"big.bin"][0] == "f" and (dest / "big.bin").stat().st_size == 20_000_000
    # -x: the mount point is copied (an empty folder with the mount's metadata), not its file.
    assert tree[b"mnt"][0] == "d" and os.listdir(dest / "mnt") == []

    summary = summary_of(result, dest)
    assert summary["ok"] and summary["mode"] == "mirror"
    regular = sum(1 for entry in tree.values() if entry[0] == "f")
    assert summary["stats"]["files_transferred"] == regular - 1  # hard2 is linked, not sent
    source = summary["argv"][-2]
    assert source == f"root@127.0.0.1::system{DATA}/"  # daemon mode: `::`, never `host:/`
    assert "--progress" not in summary["argv"]  # not a terminal
    assert not any(p.name.startswith(".") for p in dest.iterdir())  # nothing of ours inside
    assert (Path(str(dest) + ".pullback").stat().st_mode & 0o777) == 0o700

    sh(remote, CHANGE)
    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    tree = assert_same(remote, DATA, dest)
    assert not (dest / os.fsdecode(b"caf\xe9")).exists()
    assert not (dest / "some/dir/deeper").exists() and not os.path.lexists(dest / "dangling")
    assert tree[b"added-dir"][2:4] == (4243, 4244)


def test_dry_run_changes_nothing(remote, mirror):
    inventory, host = mirror
    dest = Path(host.destination)
    invoke("backup", "--inventory", str(inventory))  # in step with the host
    sh(remote, "cd /srv/data && printf 'dry\\n' > dry-only && rm 'added file'")
    before = local_tree(dest)
    result = invoke("backup", "--inventory", str(inventory), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].split()[1] == "dry-run"
    assert local_tree(dest) == before
    summary = summary_of(result, dest)
    assert summary["dry_run"] and "-n" in summary["argv"]
    assert summary["stats"]["files_transferred"] == 1 and summary["stats"]["dry_run"]


def test_a_second_concurrent_run_fails_at_once(mirror):
    inventory, host = mirror
    lock = Path(host.destination + ".pullback") / "lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("4711\n")
        held.flush()
        started = time.monotonic()
        result = invoke("backup", "--inventory", str(inventory))
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert f"another backup of {host.name} is running (pid 4711)" in result.stderr
    assert elapsed < 10
    assert result.stdout.splitlines()[1].split()[1] == "failed"


def test_restore_round_trips_a_folder_and_refuses_a_non_empty_target(remote, mirror, work):
    inventory, host = mirror
    assert invoke("backup", "--inventory", str(inventory)).returncode == 0
    target = work / "restored"
    args = ("restore", "--inventory", str(inventory), "--host", host.name,
            "--path", f"{DATA}/some", "--to", str(target))
    result = invoke(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    # Hard links within the restored folder survive; hard2's partners outside it do not
    # come along, so compare the folder without the inode check.
    remote_entries, _ = remote_tree(remote, f"{DATA}/some")
    assert local_tree(target)[0] == remote_entries
    assert remote_entries[b"dir/ghost-dir"][1:4] == (0o2750, 4242, 4243)

    refused = invoke(*args)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    escape = invoke("restore", "--inventory", str(inventory), "--host", host.name,
                    "--path", f"{DATA}/../etc", "--to", str(work / "escape"))
    assert escape.returncode == 2 and "'..'" in escape.stderr
    assert not (work / "escape").exists()


def test_x_copies_the_mount_point_but_not_the_second_file_system(lab_env, remote, mirror,
                                                                 work):
    """The default options (-avzx, no -H): the tmpfs at MOUNT arrives as an empty folder."""
    data_dev, mount_dev = sh(remote, f"stat -c %d {DATA} {MOUNT}").split()
    assert data_dev != mount_dev, "MOUNT is not a file system of its own"
    assert b"mnt/other-fs" in remote_tree(remote, DATA)[0]  # there, one file system down
    inventory, host = write_inventory(lab_env, remote, work, "default-options",
                                      options=list(DEFAULT_OPTIONS))
    dest = Path(host.destination)
    result = invoke("backup", "--inventory", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-avzx" in summary_of(result, dest)["argv"]
    assert (dest / "mnt").is_dir() and not (dest / "mnt").is_symlink()
    assert os.listdir(dest / "mnt") == [] and not os.path.lexists(dest / "mnt" / "other-fs")
    # Path by path what find -xdev sees, the mount point's own metadata (its tmpfs root's)
    # included; without -H hard links arrive as separate copies, so no inode check.
    theirs = remote_tree(remote, DATA, xdev=True)[0]
    assert b"mnt" in theirs and b"mnt/other-fs" not in theirs
    assert local_tree(dest)[0] == theirs


def test_mirror_guard_stops_the_deletions_of_an_emptied_source(lab_env, remote, mirror, work):
    """Mirror mode: backup.max_delete is rsync's --max-delete (exit 25, explained)."""
    inventory, host = write_inventory(lab_env, remote, work, "mirror-guarded", max_delete=3)
    dest = Path(host.destination)
    first = invoke("backup", "--inventory", str(inventory))
    assert first.returncode == 0, first.stdout + first.stderr
    before = set(local_tree(dest)[0])
    assert len(before) > 15
    sh(remote, EMPTY)
    try:
        stopped = invoke("backup", "--inventory", str(inventory))
    finally:
        sh(remote, RESTORE)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert stopped.stdout.splitlines()[1].split()[:2] == [remote.name, "failed"]
    assert "rsync exit 25: Deletions stopped due to --max-delete limit" in stopped.stderr
    assert "check the server before raising backup.max_delete" in stopped.stderr
    after = set(local_tree(dest)[0])
    assert after <= before and len(before - after) <= 3, sorted(before - after)
    summary = summary_of(stopped, dest)
    assert summary["exit_code"] == 25 and "--max-delete=3" in summary["argv"]
    # The source is back: the next run is an exact copy again.
    again = invoke("backup", "--inventory", str(inventory))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same(remote, DATA, dest)


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
    assert pulls.complete_snapshots(os.listdir(dest)) == made[1:]
    assert pulls.partial_snapshots(os.listdir(dest)) == []
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
    assert (target / "changing").read_text() == "run 1\n"


def test_a_killed_pull_keeps_the_snapshots_and_the_next_run_resumes(lab_env, remote, snapshots,
                                                                     work):
    inventory, host = snapshots
    dest = Path(host.destination)
    before, latest = sorted(os.listdir(dest)), os.readlink(dest / "latest")
    sh(remote, "head -c 20000000 /dev/urandom > /srv/data/big2.bin")
    slow, _ = write_inventory(lab_env, remote, work, "snapshots", file="slow", snapshots=2,
                              options=[*OPTIONS, "--bwlimit=4000"])  # ~5 s for big2.bin
    job = subprocess.Popen([INVOKE, "backup", "--inventory", str(slow)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 30
    while not pulls.partial_snapshots(os.listdir(dest)):
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    time.sleep(1.5)
    assert job.poll() is None, "the slow pull finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: pullback, rsync and ssh
    job.wait()
    partial = pulls.partial_snapshots(os.listdir(dest))
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
    assert pulls.partial_snapshots(os.listdir(dest)) == []
    newest = os.readlink(dest / "latest")
    assert newest not in before and len(pulls.complete_snapshots(os.listdir(dest))) == 2
    assert_same(remote, DATA, dest / newest)


def test_snapshot_guard_refuses_an_emptied_source_and_the_next_run_goes_on(lab_env, remote,
                                                                           mirror, work):
    """A new snapshot deletes nothing, so --max-delete cannot fire: the file count of the
    run is compared with the newest snapshot's, and a collapse is never promoted."""
    inventory, host = write_inventory(lab_env, remote, work, "guarded", snapshots=2,
                                      max_delete=3)
    dest = Path(host.destination)
    for _ in range(2):
        result = invoke("backup", "--inventory", str(inventory))
        assert result.returncode == 0, result.stdout + result.stderr
    good = pulls.complete_snapshots(os.listdir(dest))
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
    assert pulls.complete_snapshots(os.listdir(dest)) == [good[-1], newest]
    assert (dest / newest / "big.bin").stat().st_ino == (dest / good[-1] / "big.bin").stat().st_ino
    assert_same(remote, DATA, dest / newest)
