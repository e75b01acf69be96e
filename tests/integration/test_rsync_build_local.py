"""build_rsync on this machine through LocalShell: the same code path as a remote host.

Two groups:
- a tiny fake "rsync" project (shell configure + Makefile): the build pipeline, the stamp,
  and every failure path in about a second, no compiler needed beyond make;
- ``slow``: the REAL rsync 3.2.7 tarball, obtained offline from Debian's source archive
  (``lab.mirror.fetch_debian_orig``), served from a loopback HTTP mirror under the upstream layout,
  fetched through an unreachable first mirror, checksum-verified, built and installed into a
  temporary prefix, then used for a pull with ``--rsync-path``.

Missing tools (make, gcc, tar, apt-get) make these tests fail, never skip.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.hosts import STATE
from lab.mirror import fetch_debian_orig
from roles.features import rsync_build as rb
from tests.integration.conftest import closed_port, serve_directory

VERSION = "3.2.7"
UPSTREAM_PATH = "pub/rsync/src/rsync-{version}.tar.gz"



def quiet_build(tarball: Path, version: str, sha: str, prefix: Path) -> rb.BuildResult:
    """build_rsync on this machine, no sudo, phase lines discarded."""
    return rb.build_rsync(rb.LocalShell(), str(tarball), version, sha, str(prefix),
                          sudo=False, log=lambda _: None)

def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    assert not missing, f"tools needed by this test are missing: {missing}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


# ============================================================== fake project (fast)

FAKE_CONFIGURE = """#!/bin/sh
prefix=/usr/local
for a in "$@"; do
  case "$a" in
    --prefix=*) prefix="${a#--prefix=}" ;;
    --fail) echo "configure: error: told to fail" >&2; exit 1 ;;
  esac
done
echo "configure args: $*"
echo "CFLAGS=${CFLAGS:-}"
printf 'prefix = %s\\n' "$prefix" > Makefile.vars
"""

FAKE_MAKEFILE = """include Makefile.vars
all: rsync
rsync: rsync.in
\t@echo compiling a lot of noise
\tcp rsync.in rsync
\tchmod 755 rsync
check: rsync
\t./rsync --version
install: all
\tmkdir -p $(DESTDIR)$(prefix)/bin
\tcp rsync $(DESTDIR)$(prefix)/bin/rsync
"""


def fake_rsync_script(reported: str, body: str = "") -> str:
    return f'#!/bin/sh\n{body}echo "rsync  version {reported}  protocol version 99"\n'


def make_fake_tarball(
    path: Path,
    version: str,
    *,
    reported: str | None = None,
    makefile: str = FAKE_MAKEFILE,
    body: str = "",
) -> str:
    files = {
        "configure": (FAKE_CONFIGURE, 0o755),
        "Makefile": (makefile, 0o644),
        "rsync.in": (fake_rsync_script(reported or version, body), 0o755),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"rsync-{version}/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return sha256(path)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    require_tools("make", "tar", "sha256sum")
    build_root = tmp_path / "builds"
    build_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(build_root))  # builddirs land where we can inspect them
    return {"tmp": tmp_path, "prefix": tmp_path / "prefix", "builds": build_root}


def test_fake_build_install_stamp_and_skip(fake: dict[str, Path]) -> None:
    tarball = fake["tmp"] / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(tarball, "9.9.9")
    c = rb.LocalShell()
    out = Lines()
    res = rb.build_rsync(c, str(tarball), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=out)
    assert (res.version, res.protocol, res.skipped) == ("9.9.9", 99, False)
    assert res.version_line == "rsync  version 9.9.9  protocol version 99"
    stamp = fake["prefix"] / "share/pullback/rsync.stamp"
    assert stamp.read_text() == rb.stamp_text("9.9.9", sha, rb.build_flags("9.9.9"))
    # One line per phase, build noise only in the log, which is kept.
    assert len(out) <= 6 and not any("noise" in line for line in out)
    assert "compiling a lot of noise" in Path(res.log_path).read_text()
    assert [p.name for p in Path(res.log_path).parent.iterdir()] == ["build.log"]
    # Ownership/mode of what was installed: a plain executable file.
    assert os.access(fake["prefix"] / "bin/rsync", os.X_OK)

    started = time.monotonic()
    again = rb.build_rsync(c, str(tarball), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=out)
    assert again.skipped and again.version_line == res.version_line
    assert time.monotonic() - started < 1.0
    assert len(list(fake["builds"].iterdir())) == 1  # no second build dir


def test_fake_changed_flags_rebuild_and_log_dir(fake: dict[str, Path]) -> None:
    tarball = fake["tmp"] / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(tarball, "9.9.9")
    c, prefix = rb.LocalShell(), str(fake["prefix"])
    rb.build_rsync(c, str(tarball), "9.9.9", sha, prefix, sudo=False, log=lambda _: None)
    logs = fake["tmp"] / "logs"
    res = rb.build_rsync(
        c,
        str(tarball),
        "9.9.9",
        sha,
        prefix,
        sudo=False,
        check=True,
        log_dir=str(logs),
        extra_configure_args=["--with-x=a b"],
        log=lambda _: None,
    )
    assert not res.skipped and res.log_path == str(logs / "rsync-9.9.9-build.log")
    text = Path(res.log_path).read_text()
    assert "configure args: --prefix=" in text and "--with-x=a b" in text
    assert "=== make check" in text
    # log_dir given: the whole build dir is removed.
    assert len(list(fake["builds"].iterdir())) == 1


def test_fake_legacy_cflags_reach_configure_only(fake: dict[str, Path]) -> None:
    tarball = fake["tmp"] / "rsync-2.6.8.tar.gz"
    sha = make_fake_tarball(tarball, "2.6.8")
    res = quiet_build(tarball, "2.6.8", sha, fake["prefix"])
    text = Path(res.log_path).read_text()
    assert re.search(rf"=== env 'CFLAGS={re.escape(rb.LEGACY_CFLAGS)}' ./configure ", text)
    # configure writes them into the Makefile; on make's command line they would replace
    # the Makefile's CFLAGS and drop what configure added (2.6.9's -I./popt).
    assert re.search(r"=== make -j\d+\n", text)
    assert re.search(r"=== make install DESTDIR=\S+\n", text)
    assert f"\nCFLAGS={rb.LEGACY_CFLAGS}\n" in text  # what the fake configure saw
    assert text.count(f"CFLAGS={rb.LEGACY_CFLAGS}") == 2  # that, and configure's command


def install_once(fake: dict[str, Path]) -> tuple[rb.LocalShell, str, str]:
    tarball = fake["tmp"] / "good" / "rsync-9.9.9.tar.gz"
    tarball.parent.mkdir()
    sha = make_fake_tarball(tarball, "9.9.9")
    c = rb.LocalShell()
    rb.build_rsync(
        c, str(tarball), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=lambda _: None
    )
    return (
        c,
        sha256(fake["prefix"] / "bin/rsync"),
        (fake["prefix"] / "share/pullback/rsync.stamp").read_text(),
    )


def assert_untouched(fake: dict[str, Path], binary_sha: str, stamp: str) -> None:
    assert sha256(fake["prefix"] / "bin/rsync") == binary_sha
    assert (fake["prefix"] / "share/pullback/rsync.stamp").read_text() == stamp
    assert not list((fake["prefix"] / "bin").glob("*.pullback-new"))


def test_fake_make_failure_shows_tail_and_keeps_install(fake: dict[str, Path]) -> None:
    c, binary_sha, stamp = install_once(fake)
    broken = FAKE_MAKEFILE.replace(
        "\tcp rsync.in rsync\n",
        "\t@for i in $$(seq 1 60); do echo noise line $$i; done\n"
        "\t@echo 'error: the compiler exploded' >&2; exit 3\n",
    )
    bad = fake["tmp"] / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(bad, "9.9.9", makefile=broken)
    out = Lines()
    with pytest.raises(rb.BuildError) as err:
        rb.build_rsync(c, str(bad), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=out)
    e = err.value
    assert e.phase == "make" and "the compiler exploded" in e.log_tail
    assert "the compiler exploded" in str(e) and "was not touched" in str(e)
    assert len(e.log_tail.splitlines()) == rb.LOG_TAIL_LINES
    assert "noise line 60" in e.log_tail and "noise line 5\n" not in e.log_tail
    assert Path(e.log_path).exists()
    assert_untouched(fake, binary_sha, stamp)


def test_fake_configure_failure(fake: dict[str, Path]) -> None:
    c, binary_sha, stamp = install_once(fake)
    with pytest.raises(rb.BuildError) as err:
        rb.build_rsync(
            c,
            str(fake["tmp"] / "good/rsync-9.9.9.tar.gz"),
            "9.9.9",
            sha256(fake["tmp"] / "good/rsync-9.9.9.tar.gz"),
            str(fake["prefix"]),
            sudo=False,
            extra_configure_args=["--fail"],
            log=lambda _: None,
        )
    assert err.value.phase == "configure" and "told to fail" in err.value.log_tail
    assert_untouched(fake, binary_sha, stamp)


def test_fake_binary_reporting_wrong_version_is_not_installed(fake: dict[str, Path]) -> None:
    c, binary_sha, stamp = install_once(fake)
    bad = fake["tmp"] / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(bad, "9.9.9", reported="9.9.8")
    with pytest.raises(rb.BuildError) as err:
        rb.build_rsync(
            c, str(bad), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=lambda _: None
        )
    assert err.value.phase == "verify build"
    assert_untouched(fake, binary_sha, stamp)


def test_fake_install_failure_drops_stamp_so_next_run_rebuilds(fake: dict[str, Path]) -> None:
    c, _, _ = install_once(fake)
    bad = fake["tmp"] / "rsync-9.9.9.tar.gz"
    (fake["prefix"] / "share/man").write_text("a file where the install needs a dir\n")
    makefile = FAKE_MAKEFILE + "\tmkdir -p $(DESTDIR)$(prefix)/share/man/man1\n"
    sha = make_fake_tarball(bad, "9.9.9", makefile=makefile, body=": new build\n")
    with pytest.raises(rb.BuildError) as err:
        rb.build_rsync(
            c, str(bad), "9.9.9", sha, str(fake["prefix"]), sudo=False, log=lambda _: None
        )
    assert err.value.phase == "install" and "next run rebuilds" in str(err.value)
    assert not (fake["prefix"] / rb.STAMP_RELPATH).exists()
    assert not list(fake["prefix"].rglob("*.pullback-new"))


def test_fake_tarball_changed_on_that_end_is_not_extracted(fake: dict[str, Path]) -> None:
    tarball = fake["tmp"] / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(tarball, "9.9.9")
    data = bytearray(tarball.read_bytes())
    data[-10] ^= 0xFF
    tarball.write_bytes(bytes(data))
    with pytest.raises(rb.BuildError) as err:
        rb.build_rsync(
            rb.LocalShell(),
            str(tarball),
            "9.9.9",
            sha,
            str(fake["prefix"]),
            sudo=False,
            log=lambda _: None,
        )
    assert err.value.phase == "verify"
    assert sha in str(err.value) and hashlib.sha256(data).hexdigest() in str(err.value)
    assert list(fake["builds"].iterdir()) == []  # no build dir, nothing extracted
    assert not fake["prefix"].exists()


def test_quoting_survives_hostile_tarball_path(fake: dict[str, Path]) -> None:
    """Our commands quote every value: a hostile path runs nothing."""
    odd = fake["tmp"] / "it's a $(touch pwned) `touch pwned2`; dir"
    odd.mkdir()
    tarball = odd / "rsync-9.9.9.tar.gz"
    sha = make_fake_tarball(tarball, "9.9.9")
    res = quiet_build(tarball, "9.9.9", sha, fake["prefix"])
    assert res.version == "9.9.9" and (fake["prefix"] / "bin/rsync").exists()
    assert not list(fake["tmp"].rglob("pwned*"))


@pytest.mark.parametrize("prefix", ["relative/p", "/opt/pre fix", "/opt/$(id)", "/opt/a;b"])
def test_paths_make_would_split_are_refused_before_running(
    fake: dict[str, Path], prefix: str
) -> None:
    """rsync's Makefile uses --prefix and DESTDIR unquoted: refuse what it would mangle."""

    class NoShell:
        def run(self, *a: object, **k: object) -> None:
            raise AssertionError("ran a command")

        sudo = run

    with pytest.raises(ValueError, match="unquoted"):
        rb.build_rsync(NoShell(), "/x.tar.gz", "9.9.9", "0" * 64, prefix, sudo=False)
    with pytest.raises(ValueError, match="build_root"):
        rb.build_rsync(
            NoShell(), "/x.tar.gz", "9.9.9", "0" * 64, "/opt/ok", sudo=False, build_root=prefix
        )


def test_toolchain_probe_runs_here() -> None:
    facts = rb.gather_toolchain(rb.LocalShell())
    assert facts.ok, f"this machine needs gcc, make and libc headers: {facts}"
    assert rb.ensure_toolchain(rb.LocalShell(), install=False, sudo=False).cc


# ============================================================== real rsync 3.2.7 (slow)


@dataclass
class HttpMirror:
    base: str  # http://127.0.0.1:PORT
    root: Path

    def url(self, sub: str = "") -> str:
        return f"{self.base}/{sub}{UPSTREAM_PATH}"


@pytest.fixture(scope="module")
def upstream_tarball() -> Path:
    require_tools("apt-get", "apt-cache")
    return fetch_debian_orig(VERSION, STATE / "cache")


@pytest.fixture(scope="module")
def http_mirror(
    upstream_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpMirror]:
    root = tmp_path_factory.mktemp("mirror")
    good = root / UPSTREAM_PATH.format(version=VERSION)
    good.parent.mkdir(parents=True)
    shutil.copyfile(upstream_tarball, good)
    bad = root / "bad" / UPSTREAM_PATH.format(version=VERSION)
    bad.parent.mkdir(parents=True)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with serve_directory(root) as base:
        yield HttpMirror(base, root)


@dataclass
class Built:
    prefix: Path
    tarball: Path
    result: rb.BuildResult
    fetch_lines: list[str]
    build_lines: list[str]
    seconds: float


@pytest.fixture(scope="module")
def built(http_mirror: HttpMirror, tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_tools("gcc", "make", "tar", "sha256sum")
    tmp = tmp_path_factory.mktemp("real")
    dead = f"http://127.0.0.1:{closed_port()}/{UPSTREAM_PATH}"
    fetch_lines = Lines()
    tarball = rb.fetch_tarball(
        VERSION,
        [dead, http_mirror.url()],
        rb.expected_sha256(VERSION, None),
        tmp / "cache",
        log=fetch_lines,
    )
    prefix = tmp / "prefix"
    assert not rb.local_install_needs_sudo(prefix)
    build_lines = Lines()
    started = time.monotonic()
    result = build_real(tarball, prefix, log_dir=str(tmp / "logs"), log=build_lines)
    seconds = time.monotonic() - started
    print(f"\nrsync {VERSION} build: {seconds:.1f} s; " + "; ".join(build_lines))
    return Built(prefix, tarball, result, fetch_lines, build_lines, seconds)


def build_real(tarball: Path, prefix: Path, **kwargs: Any) -> rb.BuildResult:
    """build_rsync of the real pinned source into ``prefix`` here, without sudo."""
    kwargs.setdefault("log", lambda _: None)
    return rb.build_rsync(rb.LocalShell(), str(tarball), VERSION, rb.KNOWN_SHA256[VERSION],
                          str(prefix), sudo=False, **kwargs)


@pytest.mark.slow
def test_real_fetch_falls_back_from_dead_mirror(built: Built, http_mirror: HttpMirror) -> None:
    assert sha256(built.tarball) == rb.KNOWN_SHA256[VERSION]
    fetched = [x for x in built.fetch_lines if "fetching" in x]
    assert len(fetched) == 2 and http_mirror.base in fetched[1]
    assert len(built.fetch_lines) <= 7  # progress, not a flood


@pytest.mark.slow
def test_real_corrupt_mirror_refused(http_mirror: HttpMirror, tmp_path: Path) -> None:
    with pytest.raises(rb.FetchError) as err:
        rb.fetch_tarball(
            VERSION,
            [http_mirror.url("bad/")],
            rb.KNOWN_SHA256[VERSION],
            tmp_path / "cache",
            log=lambda _: None,
        )
    assert rb.KNOWN_SHA256[VERSION] in str(err.value) and "found" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_real_build_reports_version_and_protocol(built: Built) -> None:
    assert built.result.version == VERSION and built.result.protocol == 31
    assert not built.result.skipped
    out = subprocess.run(
        [built.prefix / "bin/rsync", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert rb.parse_version_output(out) == (VERSION, 31)
    assert out.splitlines()[0] == built.result.version_line
    phases = [x.split(":")[0] for x in built.build_lines[1:]]
    assert phases == ["configure", "make", "make install (staging)", "install"]
    log = Path(built.result.log_path).read_text()
    assert "--disable-openssl" in log and "=== make install" in log


@pytest.mark.slow
def test_real_rebuild_is_skipped_fast(built: Built) -> None:
    started = time.monotonic()
    again = build_real(built.tarball, built.prefix)
    assert again.skipped and again.version_line == built.result.version_line
    assert time.monotonic() - started < 2.0


@pytest.mark.slow
def test_real_build_failure_keeps_previous_install(built: Built, tmp_path: Path) -> None:
    binary = built.prefix / "bin/rsync"
    stamp = built.prefix / rb.STAMP_RELPATH
    before = sha256(binary), stamp.read_text()
    with pytest.raises(rb.BuildError) as err:
        build_real(built.tarball, built.prefix, extra_configure_args=["CC=/nonexistent/cc"],
                   log_dir=str(tmp_path))  # keeps the failed build's log out of /tmp
    assert err.value.phase == "configure"
    assert "C compiler" in err.value.log_tail  # configure's own complaint, from the log
    assert (sha256(binary), stamp.read_text()) == before


@pytest.mark.slow
def test_real_pull_with_built_binary_on_both_ends(built: Built, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    os.symlink("a.txt", src / "link")
    # A stand-in for ssh: drop the host name, run the remote command here, record it.
    seen = tmp_path / "remote-command"
    rsh = tmp_path / "fake-rsh"
    rsh.write_text(f'#!/bin/sh\nshift\necho "$@" > {seen}\nexec "$@"\n')
    rsh.chmod(0o755)
    rsync = str(built.prefix / "bin/rsync")
    subprocess.run(
        [
            rsync,
            "-aH",
            "--numeric-ids",
            "-e",
            str(rsh),
            f"--rsync-path={rsync}",
            f"localhost:{src}/",
            f"{dest}/",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seen.read_text().startswith(f"{rsync} --server --sender ")
    assert (dest / "a.txt").read_text() == "alpha\n"
    assert sha256(dest / "sub/b.bin") == sha256(src / "sub/b.bin")
    assert os.readlink(dest / "link") == "a.txt"
