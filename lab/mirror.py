"""An offline source for rsync tarballs: Debian's source archive plus a loopback mirror.

Where the upstream rsync site is unreachable (CI machines, the lab), Debian's source
archive is not: bookworm's ``rsync_3.2.7.orig.tar.gz`` is byte-identical to upstream's
``rsync-3.2.7.tar.gz``. It is fetched with a PRIVATE apt configuration in a folder of our
own (``/etc/apt`` is never touched), checked against the pinned upstream SHA-256, and
served on 127.0.0.1 under the upstream layout so the real download + checksum path runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roles.features.rsync_build import sha256_file

DEBIAN_ORIGS = {
    # version: (Debian suite, upstream SHA-256 the orig tarball must equal)
    "3.2.7": ("bookworm", "4e7d9d3f6ed10878c58c5fb724a67dacf4b6aac7340b13e488fb2dc41346f2bb"),
}
DEBIAN_ARCHIVE = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
UPSTREAM_LAYOUT = "pub/rsync/src/rsync-{version}.tar.gz"


class MirrorError(Exception):
    pass



def fetch_debian_orig(version: str, cache_dir: Path) -> Path:
    """Return ``cache_dir/rsync-VERSION.tar.gz``, fetched from Debian's source archive once."""
    if version not in DEBIAN_ORIGS:
        raise MirrorError(
            f"rsync {version} has no byte-identical upstream tarball in Debian's source "
            f"archive (known: {', '.join(DEBIAN_ORIGS)})"
        )
    suite, want = DEBIAN_ORIGS[version]
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"rsync-{version}.tar.gz"
    if target.exists() and sha256_file(target) == want:
        return target
    if shutil.which("apt-get") is None:
        raise MirrorError("apt-get is needed to fetch rsync sources from Debian's archive")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "out"):
            (work / sub).mkdir(parents=True)
        (work / "sources.list").write_text(
            f"deb-src [signed-by={KEYRING}] {DEBIAN_ARCHIVE} {suite} main\n"
        )
        options = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]
        for args in (["update"], ["source", "--download-only", "rsync"]):
            result = subprocess.run(
                ["apt-get", "-q", *options, *args],
                cwd=work / "out", capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                raise MirrorError(f"apt-get {args[0]} failed: {' / '.join(tail)}")
        orig = work / "out" / f"rsync_{version}.orig.tar.gz"
        if not orig.exists():
            raise MirrorError(f"Debian's {suite} sources do not hold rsync_{version}.orig.tar.gz")
        found = sha256_file(orig)
        if found != want:
            raise MirrorError(
                f"rsync_{version}.orig.tar.gz has sha256 {found}, expected upstream {want}"
            )
        os.replace(orig, target)
    return target


def populate(root: Path, tarballs: list[Path]) -> None:
    """Lay tarballs out under ``root`` as upstream does (pub/rsync/src/...)."""
    for tarball in tarballs:
        version = tarball.name.removeprefix("rsync-").removesuffix(".tar.gz")
        dest = root / UPSTREAM_LAYOUT.format(version=version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or sha256_file(dest) != sha256_file(tarball):
            shutil.copyfile(tarball, dest)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(root: Path, pidfile: Path, port: int | None = None) -> int:
    """Serve ``root`` on 127.0.0.1 in a background process; return the port.

    The process is recorded in ``pidfile`` so that only it is ever stopped.
    """
    running = server_port(pidfile)
    if running:
        return running
    port = port or free_port()
    log = pidfile.with_suffix(".log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
         "--directory", str(root), str(port)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if process.poll() is not None:
                raise MirrorError(f"the mirror server exited; see {log.name}") from None
            time.sleep(0.1)
    else:
        process.terminate()
        raise MirrorError("the mirror server did not start within 10 s")
    pidfile.write_text(f"{process.pid} {port}\n")
    return port


def server_port(pidfile: Path) -> int | None:
    """The port of the mirror recorded in ``pidfile`` if that process still serves it."""
    try:
        pid_text, port_text = pidfile.read_text().split()
        pid, port = int(pid_text), int(port_text)
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"http.server" not in cmdline:
        return None
    return port


def stop_server(pidfile: Path) -> bool:
    """Stop the mirror started with ``pidfile`` (and nothing else)."""
    port = server_port(pidfile)
    stopped = False
    if port is not None:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        stopped = True
    pidfile.unlink(missing_ok=True)
    return stopped
