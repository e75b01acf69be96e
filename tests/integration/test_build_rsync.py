"""`invoke build-rsync` end to end: a lab container and a local prefix, real rsync 3.2.7.

The tarball is the real upstream ``rsync-3.2.7.tar.gz``, obtained offline from Debian's
source archive (bookworm's orig tarball is byte-identical) and served from a loopback HTTP
mirror in this process. The CLI runs as a subprocess with ``PULLBACK_STATE`` pointing at a
temporary folder, so its download cache starts empty and the real fetch + checksum path
runs. One lab container is built once (module fixture) and reused by every test that does
not damage it; a host started from the bare image (no compiler) is the one extra build.

Missing tools or an unreachable Debian archive make these tests FAIL, never skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import hosts as lab
from lab.mirror import fetch_debian_orig
from roles.core.spec import HostSpec
from roles.features import rsync_build as rb
from roles.inventory.schema import load
from roles.remote.session import connect
from tests.integration.conftest import Lab, closed_port, serve_directory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
INVOKE = ROOT / ".venv" / "bin" / "invoke"
VERSION = "3.2.7"
SHA = rb.KNOWN_SHA256[VERSION]
VERSION_LINE = f"rsync  version {VERSION}  protocol version 31"
UPSTREAM_PATH = "pub/rsync/src/rsync-{version}.tar.gz"
REMOTE_PREFIX = "/usr/local"
REMOTE_RSYNC = f"{REMOTE_PREFIX}/bin/rsync"
REMOTE_STAMP = rb.stamp_path(REMOTE_PREFIX)
APT_COMMAND = (
    "sudo apt-get update && "
    "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y gcc make libc6-dev libacl1-dev"
)
FAKE_VERSION = "9.9.9"
FAKE_CONFIGURE = (
    "#!/bin/sh\n"
    'i=0; while [ $i -lt 50 ]; do i=$((i+1)); echo "checking thing $i... yes"; done\n'
    "echo 'configure: error: pullback-test: configure refuses on purpose' >&2\n"
    "exit 1\n"
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Mirror:
    base: str  # http://127.0.0.1:PORT
    root: Path
    bad_sha: str  # the sha256 of the tampered tarball under bad/
    fake_sha: str  # the sha256 of the fake 9.9.9 tarball whose configure fails

    def url(self, sub: str = "") -> str:
        return f"{self.base}/{sub}{UPSTREAM_PATH}"


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/{UPSTREAM_PATH}"


def fake_tarball(version: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = FAKE_CONFIGURE.encode()
        info = tarfile.TarInfo(f"rsync-{version}/configure")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    assert shutil.which("apt-get"), "apt-get is needed to fetch rsync's source from Debian"
    upstream = fetch_debian_orig(VERSION, lab.STATE / "cache")
    root = tmp_path_factory.mktemp("mirror")
    good = root / UPSTREAM_PATH.format(version=VERSION)
    good.parent.mkdir(parents=True)
    data = upstream.read_bytes()
    assert sha256_bytes(data) == SHA
    good.write_bytes(data)
    bad = root / "bad" / UPSTREAM_PATH.format(version=VERSION)
    bad.parent.mkdir(parents=True)
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01  # one byte changed
    bad.write_bytes(bytes(tampered))
    fake = root / UPSTREAM_PATH.format(version=FAKE_VERSION)
    fake.write_bytes(fake_tarball(FAKE_VERSION))
    with serve_directory(root) as base:
        yield Mirror(
            base,
            root,
            bad_sha=sha256_bytes(bytes(tampered)),
            fake_sha=sha256_bytes(fake.read_bytes()),
        )


# ------------------------------------------------------------------ helpers


@dataclass
class Run:
    rc: int
    out: str  # stdout and stderr, interleaved as printed
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def index(self, needle: str) -> int:
        hits = [i for i, line in enumerate(self.lines) if needle in line]
        assert hits, f"no line contains {needle!r} in:\n{self.out}"
        return hits[0]


def cli(inventory: Path, state: Path, *args: str, timeout: float = 600) -> Run:
    """``invoke build-rsync --inventory INVENTORY ARGS`` with its own download cache."""
    # The local build dir (and its kept build.log) goes under ``state``, not /tmp.
    (state / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PULLBACK_STATE": str(state),
        "TMPDIR": str(state / "tmp"),
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [str(INVOKE), "build-rsync", "--inventory", str(inventory), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    run = Run(proc.returncode, proc.stdout, time.monotonic() - started)
    print(
        f"\n$ invoke build-rsync {' '.join(args)}  ({run.seconds:.1f} s, rc {run.rc})\n{run.out}",
        file=sys.stderr,
    )
    return run


class Remote:
    """Admin commands on a lab host over plain ssh with the lab's pinned host key."""

    def __init__(self, lab_env: Lab, host: lab.LabHost) -> None:
        self.host = host
        self.ssh_config = lab_env.ssh_config([host])

    @property
    def rsh(self) -> str:
        return f"ssh -F {shlex.quote(str(self.ssh_config))}"

    def run(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), self.host.name, script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert res.returncode == 0, f"{script!r} on {self.host.name}: {res.stderr}"
        return res

    def sha256(self, path: str) -> str:
        return self.run(f"sha256sum {shlex.quote(path)}").stdout.split()[0]

    def cat(self, path: str) -> str:
        return self.run(f"cat {shlex.quote(path)}").stdout

    def build_dirs(self) -> set[str]:
        out = self.run("ls -d /tmp/pullback-rsync.* 2>/dev/null || true").stdout
        return set(out.split())


def inventory_for(
    lab_env: Lab, hosts: list[lab.LabHost], local_prefix: Path, *, urls: list[str], **rsync: object
) -> Path:
    return lab_env.inventory(
        hosts,
        defaults={
            "rsync": {
                "version": VERSION,
                "url": urls[0],
                "mirrors": urls[1:],
                "prefix": REMOTE_PREFIX,
                "local_prefix": str(local_prefix),
                **rsync,
            }
        },
    )


def inventory_host(path: Path, name: str) -> HostSpec:
    return load(path).select([name])[0]


def local_version(prefix: Path) -> str:
    out = subprocess.run(
        [str(prefix / "bin/rsync"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.splitlines()[0]


# ------------------------------------------------------------------ the shared build


@dataclass
class Built:
    host: lab.LabHost
    remote: Remote
    inventory: Path
    state: Path
    local_prefix: Path
    run: Run
    binary_sha: str
    stamp: str
    dead_url: str
    mirror_url: str


@pytest.fixture(scope="module")
def built(
    lab_env: Lab, mirror: Mirror, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Built]:
    """One `invoke build-rsync` on a new lab container and a temp local prefix at once.

    The inventory's first URL is a closed loopback port; the mirror is the fallback.
    """
    tmp = tmp_path_factory.mktemp("built")
    host = lab_env.start("rsync")
    try:
        local_prefix = tmp / "local"
        dead_url = closed_port_url()
        inventory = inventory_for(lab_env, [host], local_prefix, urls=[dead_url, mirror.url()])
        run = cli(inventory, tmp / "state")
        remote = Remote(lab_env, host)
        assert run.rc == 0, f"build-rsync failed:\n{run.out}"
        yield Built(
            host,
            remote,
            inventory,
            tmp / "state",
            local_prefix,
            run,
            remote.sha256(REMOTE_RSYNC),
            remote.cat(REMOTE_STAMP),
            dead_url,
            mirror.url(),
        )
    finally:
        lab_env.remove(host)


# ------------------------------------------------------------------ tests


def test_builds_remote_and_local_concurrently(built: Built) -> None:
    run, name = built.run, built.host.name
    assert f"{name:24} built  {VERSION_LINE}" in run.lines, run.out
    assert f"{'local':24} built  {VERSION_LINE}" in run.lines, run.out
    # Both ends report the same version and protocol, called by full path.
    assert built.remote.run(f"{REMOTE_RSYNC} --version").stdout.splitlines()[0] == VERSION_LINE
    assert local_version(built.local_prefix) == VERSION_LINE
    # The stamp on both ends records exactly this build.
    stamp = rb.stamp_text(VERSION, SHA, rb.build_flags(VERSION))
    assert built.stamp == stamp
    assert (built.local_prefix / rb.STAMP_RELPATH).read_text() == stamp
    # Concurrency: each end started its build before the OTHER end's make finished. Run one
    # after the other, one end's "make: ok" would be printed before the other end's build
    # even started, so this pair of orderings only happens when the two builds overlap. It
    # holds however slow one end is (a loaded container may configure for a minute while
    # the local end finishes), unlike a wall-time ratio or a configure/make interleaving.
    remote_start = run.index(f"{name}: building rsync")
    local_start = run.index("local: building rsync")
    remote_make = run.index(f"{name}: make: ok")
    local_make = run.index("local: make: ok")
    assert remote_start < local_make and local_start < remote_make, run.out
    # Progress without flooding: a line per phase per end, not the build's output.
    assert len(run.lines) < 40, run.out


def test_pull_between_the_two_builds(built: Built, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    res = subprocess.run(
        [
            str(built.local_prefix / "bin/rsync"),
            "-a",
            f"--rsync-path={REMOTE_RSYNC}",
            "-e",
            built.remote.rsh,
            "--include=*.pub",
            "--exclude=*",
            f"{built.host.name}:/etc/ssh/",
            f"{dest}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    pubs = sorted(p.name for p in dest.iterdir())
    assert "ssh_host_ed25519_key.pub" in pubs, pubs
    got = (dest / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert " ".join(got) == built.host.host_key


def test_rerun_rebuilds_nothing_and_is_fast(built: Built) -> None:
    run = cli(built.inventory, built.state)
    assert run.rc == 0, run.out
    assert f"{built.host.name:24} ok     {VERSION_LINE}" in run.lines, run.out
    assert f"{'local':24} ok     {VERSION_LINE}" in run.lines, run.out
    assert not any("configure" in line or "upload" in line for line in run.lines), run.out
    assert run.seconds < 5, f"a re-run took {run.seconds:.1f} s"
    assert built.remote.sha256(REMOTE_RSYNC) == built.binary_sha


def test_unreachable_first_url_falls_back_to_the_mirror(built: Built) -> None:
    fetches = [line for line in built.run.lines if ": fetching " in line]
    assert len(fetches) == 2, built.run.out
    assert fetches[0].endswith(f"fetching {built.dead_url.format(version=VERSION)}")
    assert fetches[1].endswith(f"fetching {built.mirror_url.format(version=VERSION)}")
    assert any("sha256 verified" in line for line in built.run.lines), built.run.out
    cached = built.state / "downloads" / f"rsync-{VERSION}.tar.gz"
    assert rb.sha256_file(cached) == SHA


def test_tampered_tarball_is_refused_before_extraction(
    built: Built, lab_env: Lab, mirror: Mirror, tmp_path: Path
) -> None:
    prefix = "/opt/pullback-tamper"
    inventory = lab_env.inventory(
        [built.host],
        defaults={
            "rsync": {
                "version": VERSION,
                "url": mirror.url("bad/"),
                "prefix": prefix,
                "local_prefix": str(tmp_path / "local"),
            }
        },
    )
    host = inventory_host(inventory, built.host.name)
    dirs_before = built.remote.build_dirs()
    cache = tmp_path / "cache"
    lines: list[str] = []
    results = rb.build_everywhere([host], cache_dir=cache, log=lines.append)
    assert [r.end for r in results] == [host.name], results  # no end was even started
    error = results[0].error or ""
    assert f"expected {SHA}" in error and f"found {mirror.bad_sha}" in error, error
    assert any("REFUSED" in line for line in lines), lines
    assert list(cache.iterdir()) == []  # the bad download was not kept
    assert not (tmp_path / "local").exists()
    assert built.remote.run(f"test ! -e {prefix}", check=False).returncode == 0
    assert built.remote.build_dirs() == dirs_before

    # The same tarball reaching a host anyway is re-verified there before extraction.
    conn = connect(host)
    try:
        res = conn.run("mktemp /tmp/pullback-tamper.XXXXXXXX")
        path = res.stdout.strip()
        conn.upload(mirror.root / "bad" / UPSTREAM_PATH.format(version=VERSION), path)
        with pytest.raises(rb.BuildError) as err:
            rb.build_rsync(conn, path, VERSION, SHA, prefix, sudo=True, log=lines.append)
        conn.run(shlex.join(["rm", "-f", path]))
    finally:
        conn.close()
    assert err.value.phase == "verify"
    assert SHA in str(err.value) and mirror.bad_sha in str(err.value)
    assert built.remote.run(f"test ! -e {prefix}", check=False).returncode == 0
    assert built.remote.build_dirs() == dirs_before


def test_remote_build_failure_shows_log_tail_and_keeps_install(
    built: Built, lab_env: Lab, mirror: Mirror, tmp_path: Path
) -> None:
    # Through the CLI: a release whose configure fails, pinned by the inventory's sha256
    # (which also applies when --version names the inventory's version).
    inventory = inventory_for(
        lab_env,
        [built.host],
        tmp_path / "local",
        urls=[mirror.url()],
        version=FAKE_VERSION,
        sha256=mirror.fake_sha,
    )
    run = cli(inventory, tmp_path / "state", "--remote-only", "--version", FAKE_VERSION)
    assert run.rc == 1, run.out
    line = run.lines[run.index(f"{built.host.name:24} failed: ")]
    assert "configure failed (exit 1)" in line and "was not touched" in line, run.out
    assert "configure: error: pullback-test: configure refuses on purpose" in run.out
    assert "checking thing 50... yes" in run.out and "checking thing 5... yes" not in run.out
    assert built.remote.sha256(REMOTE_RSYNC) == built.binary_sha
    assert built.remote.cat(REMOTE_STAMP) == built.stamp

    # Directly: the real 3.2.7 configure failing on a compiler that does not exist.
    host = inventory_host(built.inventory, built.host.name)
    tarball = rb.fetch_tarball(VERSION, [mirror.url()], SHA, tmp_path / "cache", log=lambda _: None)
    conn = connect(host)
    try:
        path = conn.run("mktemp /tmp/pullback-src.XXXXXXXX").stdout.strip()
        conn.upload(tarball, path)
        with pytest.raises(rb.BuildError) as err:
            rb.build_rsync(
                conn,
                path,
                VERSION,
                SHA,
                REMOTE_PREFIX,
                sudo=True,
                extra_configure_args=["CC=/nonexistent/cc"],
                log=lambda _: None,
            )
        conn.run(shlex.join(["rm", "-f", path]))
    finally:
        conn.close()
    assert err.value.phase == "configure", err.value
    assert "C compiler" in err.value.log_tail and err.value.log_tail in str(err.value)
    assert built.remote.sha256(REMOTE_RSYNC) == built.binary_sha
    assert built.remote.cat(REMOTE_STAMP) == built.stamp
    assert built.remote.run(f"{REMOTE_RSYNC} --version").stdout.splitlines()[0] == VERSION_LINE


def test_unknown_cli_version_without_sha256_builds_nothing(built: Built, tmp_path: Path) -> None:
    run = cli(built.inventory, tmp_path / "state", "--version", "3.9.9")
    assert run.rc in (1, 2), run.out
    errors = [line for line in run.lines if "no pinned sha256 for rsync 3.9.9" in line]
    assert len(errors) == 1, run.out
    assert "rsync.sha256" in errors[0]
    assert not any("fetching" in line or "configure" in line for line in run.lines), run.out
    assert not any(" built " in line for line in run.lines), run.out
    assert not (tmp_path / "state" / "downloads").exists() or not list(
        (tmp_path / "state" / "downloads").glob("rsync-*")
    )
    assert built.remote.sha256(REMOTE_RSYNC) == built.binary_sha
    assert built.remote.cat(REMOTE_STAMP) == built.stamp
    assert local_version(built.local_prefix) == VERSION_LINE


def test_host_without_compiler(lab_env: Lab, mirror: Mirror, tmp_path: Path) -> None:
    host = lab_env.start("bare", image=lab.build_images(compiler=False))
    try:
        remote = Remote(lab_env, host)
        assert remote.run("command -v gcc cc make", check=False).stdout.strip() == ""
        inventory = inventory_for(lab_env, [host], tmp_path / "local", urls=[mirror.url()])
        state = tmp_path / "state"

        run = cli(inventory, state, "--remote-only", "--no-install-packages")
        assert run.rc == 1, run.out
        line = run.lines[run.index(f"{host.name:24} failed: ")]
        assert line.endswith(f"to install it run: {APT_COMMAND}"), line
        assert "a C compiler" in line and "make" in line
        assert remote.run(f"test ! -e {REMOTE_RSYNC}", check=False).returncode == 0

        run = cli(inventory, state, "--remote-only")
        assert run.rc == 0, (
            "build-rsync could not install gcc/make on the bare lab host through apt; the "
            "container must reach Debian's archive (deb.debian.org) for this test:\n" + run.out
        )
        assert (f"{host.name}: missing a C compiler, make, the ACL headers (libacl, for rsync "
                "-A): installing with apt-get") in run.lines
        assert f"{host.name:24} built  {VERSION_LINE}" in run.lines, run.out
        assert remote.run(f"{REMOTE_RSYNC} --version").stdout.splitlines()[0] == VERSION_LINE
        assert remote.run("command -v gcc make").stdout.split() == ["/usr/bin/gcc", "/usr/bin/make"]
    finally:
        lab_env.remove(host)


def test_one_local_prefix_gets_one_version_per_run(built: Built, mirror: Mirror) -> None:
    """Two hosts wanting different versions never build into one local prefix at once."""
    first = inventory_host(built.inventory, built.host.name)
    other = dataclasses.replace(first, **{
            "name": "other",
            "rsync": dataclasses.replace(first.rsync, **{"version": FAKE_VERSION, "sha256": mirror.fake_sha, "url": mirror.url()}
            ),
        }
    )
    lines: list[str] = []
    results = rb.build_everywhere(
        [first, other], remote=False, cache_dir=built.state / "downloads", log=lines.append
    )
    by_end = {r.end: r for r in results}
    ours = by_end[f"local:{built.local_prefix}:{VERSION}"]
    assert ours.result is not None and ours.result.skipped, results  # already built: ok
    conflict = by_end[f"local:{built.local_prefix}:{FAKE_VERSION}"]
    assert conflict.result is None and f"already getting {VERSION}" in (conflict.error or "")
    assert not any("configure" in line for line in lines), lines
    assert local_version(built.local_prefix) == VERSION_LINE
