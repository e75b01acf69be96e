"""The receiving rsync's sandbox, attacked with real processes.

Each attack runs inside the very sandbox a backup puts its rsync in
(``roles.local.runner.pull_sandboxed``, the argv ``roles.core.sandbox`` builds) as a small
Python program that plays a compromised rsync, running as root like the real one. What it
did is then checked from OUTSIDE, on this machine's real file system. Where an attack
works without the sandbox, the test shows that too, so the test could fail.

Then a real pull (a lab host, daemon mode, the default options) runs through the sandbox
and restores exactly, and a real rsync daemon serving a ``trusted.*`` xattr shows what the
sandbox loses and why the pull filters it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.core import sandbox
from roles.core.spec import HostSpec
from roles.features.backup import run_backup
from roles.features.restore import run_restore
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load, validate_host
from roles.local import keys, runner
from tests.integration.conftest import Lab

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
# cap_sys_admin+ep as a security.capability value (VFS_CAP_REVISION_2, effective).
CAP_SYS_ADMIN_EP = bytes.fromhex("01000002" "00002000" "00000000" "00000000" "00000000")
ALLOWED_CAPS = sum(1 << n for n in (0, 1, 3, 4, 27, 31))  # sandbox.CAPABILITIES, by number

# The compromised receiver: every attack in ``ATTACKS``, each reported as "ok" or the errno
# name; the arguments come as one JSON object.
PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys
args = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        value = fn()
        out[name] = "ok" if value is None else value
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def write(path):
    with open(path, "w") as handle:
        handle.write("written by a compromised rsync\n")
for name, path in args["writes"].items():
    attempt("write " + name, lambda p=path: write(p))
attempt("unlink key", lambda: os.unlink(args["key"]))
attempt("chmod key", lambda: os.chmod(args["key"], 0o644))
attempt("read other DEST", lambda: open(args["other_secret"]).read())
def remount():
    r = subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True)
    return "exit %d" % r.returncode
attempt("remount /", remount)
libc = ctypes.CDLL(None, use_errno=True)
def mount_tmpfs():
    if libc.mount(b"none", args["dest"].encode(), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
attempt("mount tmpfs", mount_tmpfs)
def unshare_mounts():
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unshare -m", unshare_mounts)
def status_of(argv):
    text = subprocess.run(argv, capture_output=True, text=True).stdout
    return {k: v.strip() for k, v in (l.split(":", 1) for l in text.splitlines() if ":" in l)
            if k in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Uid")}
attempt("setuid+fcaps binary", lambda: status_of([args["setuid_cat"], "/proc/self/status"]))
attempt("kill outside", lambda: os.kill(args["outside_pid"], 9))
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.close()
for name, path in args["sockets"].items():
    attempt("connect " + name, lambda p=path: connect(p))
def by_handle():
    handle = bytes.fromhex(args["handle"])
    buf = ctypes.create_string_buffer(handle, len(handle))
    dest = os.open(args["dest"], os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.open_by_handle_at(dest, buf, os.O_RDWR)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    os.write(fd, b"written through a file handle\n")
attempt("open_by_handle_at", by_handle)
print(json.dumps(out))
"""


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def file_handle(path: Path) -> bytes:
    """``name_to_handle_at``: the bytes that name ``path``'s inode on its file system."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
    if libc.name_to_handle_at(-100, str(path).encode(), ctypes.byref(handle),
                              ctypes.byref(mount_id), 0) != 0:
        pytest.fail(f"name_to_handle_at({path}): {os.strerror(ctypes.get_errno())}: this "
                    "file system cannot name inodes, and the attack cannot be shown")
    return bytes(handle)[:8 + handle.handle_bytes]


def open_by_handle(mount: Path, handle: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(handle, len(handle))
    dirfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return libc.open_by_handle_at(dirfd, buf, os.O_RDONLY)
    finally:
        os.close(dirfd)


def make_host(tmp: Path, name: str = "web1", **backup) -> HostSpec:
    key = tmp / "keys" / "backup"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)
        keys.ensure_backup_key(key)
        (tmp / "keys" / "known_hosts").write_text("")
    return validate_host({
        "name": name, "address": "127.0.0.1", "admin_user": "admin",
        "backup_key": str(key), "known_hosts": str(tmp / "keys" / "known_hosts"),
        "backup": {"destination": str(tmp / "backups" / "{name}"), "snapshots": 0,
                   **backup}})


@pytest.fixture
def attacked(tmp_path: Path):
    """Run ``PROBE`` in web1's backup sandbox; yield what it saw and the paths involved."""
    host = make_host(tmp_path)
    dest = Path(host.destination)
    dest.mkdir(parents=True, mode=0o700)
    other = Path(make_host(tmp_path, "db1").destination)
    other.mkdir(parents=True, mode=0o700)
    (other / "secret").write_text("db1's copy of /etc/shadow\n")
    setuid_cat = dest / "cat"
    shutil.copy("/usr/bin/cat", setuid_cat)
    os.chmod(setuid_cat, 0o4755)
    os.setxattr(setuid_cat, "security.capability", CAP_SYS_ADMIN_EP)
    canary = tmp_path / "canary"
    canary.write_text("outside every destination\n")
    listeners = {}
    for name, where in (("/run", Path("/run") / f"pullback-test-{os.getpid()}.sock"),
                        ("/tmp", tmp_path / "service.sock")):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(where))
        listener.listen(1)
        listeners[name] = (listener, where)
    outside = subprocess.Popen(["sleep", "300"])
    escapes = {"/etc": Path("/etc") / f"pullback-escape-{os.getpid()}",
               "the repository": ROOT / f"pullback-escape-{os.getpid()}",
               "another host's DEST": other / "planted",
               "beside DEST": dest.parent / "planted",
               "the key": Path(host.backup_key),
               "DEST": dest / "written"}
    args = {"writes": {k: str(v) for k, v in escapes.items()}, "key": host.backup_key,
            "other_secret": str(other / "secret"), "dest": str(dest),
            "setuid_cat": str(setuid_cat), "outside_pid": outside.pid,
            "sockets": {k: str(w) for k, (_, w) in listeners.items()},
            "handle": file_handle(canary).hex()}
    key_before = Path(host.backup_key).read_bytes()
    argv = runner.pull_sandboxed(host, [PYTHON, "-c", PROBE, json.dumps(args)],
                                 runner.find_bwrap(host))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        yield {"seen": seen, "escapes": escapes, "dest": dest, "other": other,
               "canary": canary, "key_before": key_before, "host": host,
               "outside": outside, "setuid_cat": setuid_cat}
    finally:
        outside.kill()
        outside.wait()
        for listener, where in listeners.values():
            listener.close()
            where.unlink(missing_ok=True)
        for name in ("/etc", "the repository"):
            escapes[name].unlink(missing_ok=True)


def test_the_sandbox_is_what_the_backup_runs_in(attacked):
    host = attacked["host"]
    argv = runner.pull_sandboxed(host, ["rsync"], runner.find_bwrap(host))
    assert argv[0] == shutil.which("bwrap") and argv[-2:] == ["--", "rsync"]


def test_nothing_outside_dest_can_be_written(attacked):
    seen, escapes = attacked["seen"], attacked["escapes"]
    assert seen["write DEST"] == "ok"  # the one place a pull writes: the attack can succeed
    assert (attacked["dest"] / "written").read_text() == "written by a compromised rsync\n"
    assert seen["write /etc"] == "EROFS" and not escapes["/etc"].exists()
    assert seen["write the repository"] == "EROFS" and not escapes["the repository"].exists()
    assert seen["write the key"] == "EROFS"
    # The key is bound back read-only over the hidden /tmp here: a mount point (EBUSY).
    assert seen["unlink key"] in ("EROFS", "EBUSY") and seen["chmod key"] == "EROFS"
    assert Path(attacked["host"].backup_key).read_bytes() == attacked["key_before"]
    assert os.stat(attacked["host"].backup_key).st_mode & 0o777 == 0o600
    # The folder around DEST is an empty tmpfs: other hosts' copies are neither readable
    # nor writable, and nothing written "beside DEST" reaches the disk.
    assert seen["read other DEST"] == "ENOENT"
    assert seen["write another host's DEST"] == "ENOENT"
    assert sorted(os.listdir(attacked["other"])) == ["secret"]
    assert not escapes["beside DEST"].exists()


def test_no_mount_and_no_remount_of_root(attacked):
    seen = attacked["seen"]
    assert seen["remount /"] != "exit 0"
    assert seen["mount tmpfs"] == "EPERM" and seen["unshare -m"] == "EPERM"
    assert not os.path.ismount(attacked["dest"])


def test_a_setuid_file_capability_binary_gains_nothing(attacked):
    status = attacked["seen"]["setuid+fcaps binary"]
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == ALLOWED_CAPS == int(status["CapPrm"], 16)
    # Outside the sandbox the same file would run with cap_sys_admin (root's set): the
    # binary is armed, the sandbox is what disarms it.
    assert os.getxattr(attacked["setuid_cat"], "security.capability") == CAP_SYS_ADMIN_EP


def test_no_signal_to_and_no_socket_of_the_hosts_processes(attacked):
    seen = attacked["seen"]
    assert seen["kill outside"] == "ESRCH" and attacked["outside"].poll() is None
    assert seen["connect /run"] == "ENOENT" and seen["connect /tmp"] == "ENOENT"


def test_no_file_handle_escape_through_the_writable_mount(attacked):
    # Root with CAP_DAC_READ_SEARCH opens any inode of DEST's file system by its handle,
    # through DEST's writable mount ("shocker"): shown to work here, outside the sandbox.
    fd = open_by_handle(attacked["dest"], file_handle(attacked["canary"]))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert os.read(fd, 100) == b"outside every destination\n"
    os.close(fd)
    assert attacked["seen"]["open_by_handle_at"] == "EPERM"
    assert attacked["canary"].read_text() == "outside every destination\n"


def test_a_missing_bwrap_is_one_line_and_nothing_runs(tmp_path, monkeypatch):
    host = make_host(tmp_path)
    only_rsync = tmp_path / "bin"
    only_rsync.mkdir()
    (only_rsync / "rsync").symlink_to(shutil.which("rsync"))
    monkeypatch.setenv("PATH", str(only_rsync))
    with pytest.raises(runner.BackupError) as err:
        run_backup(host, dry_run=False, tty=False)
    assert "bwrap is not installed" in str(err.value) and "\n" not in str(err.value)
    assert not Path(host.destination).exists()
    off = make_host(tmp_path, sandbox=False)
    assert runner.find_bwrap(off) is None
    assert runner.pull_sandboxed(off, ["rsync"], None) == ["rsync"]


# --- a real pull through the sandbox ---------------------------------------------------

SEED = r"""
set -eu
mkdir -p /srv/sbx/etc /srv/sbx/dev
cd /srv/sbx
printf 'root only\n' > etc/secret && chmod 0600 etc/secret && chown 4242:4243 etc/secret
cp /bin/true setuid-true && chmod 4755 setuid-true
cp /bin/true ping-copy && setcap cap_net_raw+ep ping-copy
mknod dev/null-copy c 1 3
setfattr -n user.origin -v server etc/secret
mkdir locked && printf 'in a 0555 folder\n' > locked/f && chown 4242 locked && chmod 0555 locked
"""


def test_a_real_backup_through_the_sandbox_restores_exactly(lab_env: Lab, shared_host,
                                                            tmp_path):
    lab.engine("exec", shared_host.name, "sh", "-c", SEED, timeout=60)
    inventory = lab_env.inventory([shared_host], path=tmp_path / "inventory.yaml", defaults={
        "backup": {"destination": str(tmp_path / "backups" / "{name}"), "source": "/srv/sbx",
                   "snapshots": 2}})
    host = load(inventory).hosts[shared_host.name]
    assert host.backup.sandbox is True  # the default
    keys.ensure_backup_key(Path(host.backup_key))
    assert setup_host(host).error is None
    result = run_backup(host, dry_run=False, tty=False)
    assert result.ok, (result.error, Path(result.log_path).read_text()[-2000:])
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["sandbox"][0] == shutil.which("bwrap")
    assert Path(result.log_path).read_text().startswith(f"# {shutil.which('bwrap')} ")
    again = run_backup(host, dry_run=False, tty=False)  # a second snapshot, --link-dest
    assert again.ok, again.error
    restored = run_restore(host, path="/srv/sbx", to=str(tmp_path / "restored"))
    assert restored.ok, restored.output
    tree = Path(restored.target)
    secret = os.lstat(tree / "etc" / "secret")
    assert (secret.st_uid, secret.st_gid, secret.st_mode & 0o7777) == (4242, 4243, 0o600)
    assert os.getxattr(tree / "etc" / "secret", "user.origin") == b"server"
    assert os.stat(tree / "setuid-true").st_mode & 0o7777 == 0o4755
    assert os.getxattr(tree / "ping-copy", "security.capability").hex() \
        == "0100000200200000000000000000000000000000"
    assert os.stat(tree / "dev" / "null-copy").st_rdev == os.makedev(1, 3)
    assert (tree / "locked" / "f").read_text() == "in a 0555 folder\n"
    assert os.stat(tree / "locked").st_mode & 0o777 == 0o555
    newest = Path(host.destination) / again.snapshot
    first = Path(host.destination) / result.snapshot
    assert os.stat(newest / "etc" / "secret").st_ino == os.stat(first / "etc" / "secret").st_ino


# --- what the sandbox cannot keep: trusted.* xattrs -------------------------------------

def test_trusted_xattrs_are_what_the_sandbox_loses_and_the_filter_keeps_the_run_whole(
        tmp_path):
    """A real rsync daemon here (root, outside any sandbox: a server) serves a file with a
    trusted.* xattr. The sandboxed receiver cannot set it (CAP_SYS_ADMIN): without the
    filter the pull fails with exit 23; with it the pull succeeds and keeps the rest."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("data\n")
    for name, value in (("trusted.overlay.opaque", b"y"), ("user.kept", b"1"),
                        ("security.capability", CAP_SYS_ADMIN_EP)):
        os.setxattr(source / "f", name, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(f"address = 127.0.0.1\nport = {port}\nuse chroot = no\n[src]\n"
                    f"path = {source}\nread only = yes\nuid = 0\ngid = 0\n")
    daemon = subprocess.Popen([shutil.which("rsync"), "--daemon", "--no-detach",
                               f"--config={conf}"])
    host = make_host(tmp_path)
    dest = Path(host.destination)
    dest.mkdir(parents=True, mode=0o700)
    try:
        url = f"rsync://127.0.0.1:{port}/src/"
        for _ in range(50):
            if subprocess.run(["rsync", f"rsync://127.0.0.1:{port}/"], capture_output=True,
                              check=False).returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        bwrap = runner.find_bwrap(host)
        plain = runner.pull_sandboxed(host, ["rsync", "-aX", url, f"{dest}/plain/"], bwrap)
        lost = subprocess.run(plain, capture_output=True, text=True, check=False)
        assert lost.returncode == 23 and "trusted.overlay.opaque" in lost.stderr
        filtered = runner.pull_sandboxed(
            host, ["rsync", "-aX", *sandbox.XATTR_FILTERS, url, f"{dest}/filtered/"], bwrap)
        kept = subprocess.run(filtered, capture_output=True, text=True, check=False)
        assert kept.returncode == 0, kept.stderr
        names = set(os.listxattr(dest / "filtered" / "f"))
        assert names == {"user.kept", "security.capability"}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_an_agent_socket_in_a_hidden_folder_is_bound_back(tmp_path, monkeypatch):
    """A passphrase key is used through an agent whose socket lives in /tmp or /run, both
    emptied in the sandbox: the socket is bound back, so ssh inside still reaches it."""
    sock = tmp_path / "agent" / "agent.sock"
    sock.parent.mkdir(mode=0o700)
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"], check=False)
        host = make_host(tmp_path)
        Path(host.destination).mkdir(parents=True, mode=0o700)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        argv = runner.pull_sandboxed(host, ["ssh-add", "-l"], runner.find_bwrap(host))
        listed = subprocess.run(argv, capture_output=True, text=True, check=False)
        # 1: the agent answered and holds no key; 2 would be "could not connect".
        assert listed.returncode == 1 and "no identities" in listed.stdout, listed
        monkeypatch.delenv("SSH_AUTH_SOCK")
        argv = runner.pull_sandboxed(host, ["sh", "-c", f"test -e {sock}"],
                                     runner.find_bwrap(host))
        assert subprocess.run(argv, check=False).returncode == 1  # hidden unless asked for
    finally:
        agent.terminate()
        agent.wait()
