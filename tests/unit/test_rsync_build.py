"""Pure parts of roles.features.rsync_build, plus fetch_tarball against file:// URLs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from roles.core.outcome import State
from roles.features import rsync_build as rb
from roles.remote.session import Run, Session

# ----------------------------------------------------------------------------- sums


def test_known_sums_cover_the_pinned_versions() -> None:
    assert set(rb.KNOWN_SHA256) == {
        "2.6.9",
        "3.2.7",
        "3.4.0",
        "3.4.1",
        "3.4.2",
        "3.4.3",
        "3.4.4",
        "3.5.0",
        "3.5.1",
    }
    for version, digest in rb.KNOWN_SHA256.items():
        rb.validate_version(version)
        assert re.fullmatch(r"[0-9a-f]{64}", digest), version
    assert len(set(rb.KNOWN_SHA256.values())) == len(rb.KNOWN_SHA256)
    assert rb.KNOWN_SHA256["3.2.7"] == (
        "4e7d9d3f6ed10878c58c5fb724a67dacf4b6aac7340b13e488fb2dc41346f2bb"
    )
    assert rb.DEFAULT_URL.format(version="3.2.7") == (
        "https://download.samba.org/pub/rsync/src/rsync-3.2.7.tar.gz"
    )


@pytest.mark.parametrize("version", ["2.6.9", "3.2.7", "3.4.0pre1", "10.20.30"])
def test_valid_versions(version: str) -> None:
    assert rb.validate_version(version) == version


@pytest.mark.parametrize(
    "version", ["3.2", "3.2.7.1", "v3.2.7", "3.2.7-1", "3.2.7rc1", "../x", "3.2.7 ", ""]
)
def test_invalid_versions(version: str) -> None:
    with pytest.raises(ValueError, match="invalid rsync version"):
        rb.validate_version(version)


def test_expected_sha256_pinned_wins_and_agreeing_config_is_fine() -> None:
    pinned = rb.KNOWN_SHA256["3.4.1"]
    assert rb.expected_sha256("3.4.1", None) == pinned
    assert rb.expected_sha256("3.4.1", pinned.upper()) == pinned


def test_expected_sha256_disagreeing_config_names_both() -> None:
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        rb.expected_sha256("3.2.7", wrong)
    assert wrong in str(err.value) and rb.KNOWN_SHA256["3.2.7"] in str(err.value)


def test_expected_sha256_unknown_version() -> None:
    with pytest.raises(ValueError, match=r"set rsync\.sha256"):
        rb.expected_sha256("3.1.3")
    assert rb.expected_sha256("3.1.3", "AB" * 32) == "ab" * 32
    with pytest.raises(ValueError, match="64-digit"):
        rb.expected_sha256("3.1.3", "abc")


# ----------------------------------------------------------------------------- flags

DISABLES = [
    "--disable-openssl",
    "--disable-xxhash",
    "--disable-zstd",
    "--disable-lz4",
    "--disable-md2man",
]


@pytest.mark.parametrize("version", ["3.2.7", "3.4.1", "3.5.0", "3.5.1"])
def test_flags_modern(version: str) -> None:
    flags = rb.build_flags(version)
    assert flags.configure_args == DISABLES
    assert flags.env == {}


def test_flags_269_old_compiler_cflags_to_configure_only() -> None:
    flags = rb.build_flags("2.6.9")
    assert flags.configure_args == []
    cflags = flags.env["CFLAGS"].split()
    for flag in [
        "-std=gnu11",
        "-fcommon",
        "-Wno-error",
        "-Wno-incompatible-pointer-types",
        "-Wno-implicit-function-declaration",
        "-Wno-int-conversion",
    ]:
        assert flag in cflags
    # make's command line would override the Makefile's CFLAGS and lose configure's
    # -I./popt (2.6.9: "popt.h: No such file or directory").
    assert not hasattr(flags, "make_args")


def test_flags_extra_configure_args_are_appended() -> None:
    assert rb.build_flags("3.2.7", ["--with-rrsync"]).configure_args == [*DISABLES, "--with-rrsync"]


@pytest.mark.parametrize(
    ("version", "warned"),
    [("2.6.9", True), ("3.2.7", True), ("3.4.0pre1", True), ("3.4.0", True),
     ("3.4.1pre1", True), ("3.4.1", False), ("3.5.1", False)],
)
def test_security_warning(version: str, warned: bool) -> None:
    warning = rb.security_warning(version)
    assert (warning is not None) == warned
    if warning:
        assert "CVE-2024-12084" in warning and version in warning


# ------------------------------------------------------------- the client's version policy


@pytest.mark.parametrize(("version", "key"), [
    ("2.6.9", (2, 6, 9, 1)), ("3.4.1pre1", (3, 4, 1, 0)), ("3.4.1", (3, 4, 1, 1)),
    ("v3.4.2dev", (3, 4, 2, 1)), ("3.10", (3, 10, 0, 1)), ("junk", None), ("", None),
])
def test_release_key_orders_releases(version: str, key: tuple[int, ...] | None) -> None:
    from roles.core.rsync import release_key

    assert release_key(version) == key


def test_client_exposure_and_refusal_are_one_line_with_the_fix() -> None:
    from roles.core.rsync import client_exposure, client_refusal

    assert client_exposure("3.4.1") is None and client_refusal("3.5.1") is None
    refusal = client_refusal("3.2.7", "the local rsync /usr/bin/rsync")
    assert refusal == (
        "refused: the local rsync /usr/bin/rsync is rsync 3.2.7, older than 3.4.1: it lacks "
        "the fixes for CVE-2024-12084..12088 (and the later fixes up to 3.4.x), so any server "
        "it pulls from could attack this backup host; fix: build 3.4.1 or newer "
        "(rsync.version, default 3.5.1, then `invoke build-rsync --local-only`), or set "
        "rsync.allow_vulnerable: true knowingly")
    unknown = client_refusal("weird")
    assert unknown is not None and "cannot read ('weird')" in unknown and "may lack" in unknown


@dataclass
class _Rsync:
    version: str
    allow_vulnerable: bool = False
    local_prefix: str = "/nonexistent/prefix"
    sha256: str | None = None
    urls: tuple[str, ...] = ("file:///nonexistent/rsync-{version}.tar.gz",)
    gpg_keyring: str | None = None


@dataclass
class _Host:
    name: str
    rsync: _Rsync


def test_build_rsync_refuses_an_exposed_local_build_naming_the_hosts() -> None:
    hosts = [_Host("web1", _Rsync("3.2.7")), _Host("web2", _Rsync("3.2.7")),
             _Host("old", _Rsync("2.6.9", allow_vulnerable=True)), _Host("new", _Rsync("3.5.1"))]
    (line,) = rb.client_build_refusals(hosts)
    assert line.startswith("refused: the local build for web1, web2 (rsync.version) is rsync "
                           "3.2.7, older than 3.4.1: it lacks the fixes for CVE-2024-12084")
    # --version overrides the inventory's version for every host, the switch still counts.
    (line,) = rb.client_build_refusals(hosts, "3.4.0")
    assert "for web1, web2, new (--version) is rsync 3.4.0" in line
    assert rb.client_build_refusals(hosts, "3.4.1") == []


def test_build_everywhere_never_builds_a_refused_client(tmp_path: Path) -> None:
    logged: list[str] = []
    results = rb.build_everywhere([_Host("web1", _Rsync("3.2.7"))], cache_dir=tmp_path,
                                  log=logged.append)
    (result,) = results
    assert result.end == "local:/nonexistent/prefix:3.2.7" and result.result is None
    assert result.error is not None and result.error.startswith("refused: the local build")
    assert logged == [] and list(tmp_path.iterdir()) == []  # nothing fetched


# ----------------------------------------------------------------------------- parsing

V269 = """rsync  version 2.6.9  protocol version 29
Copyright (C) 1996-2006 by Andrew Tridgell, Wayne Davison, and others.
<http://rsync.samba.org/>
Capabilities: 64-bit files, socketpairs, hard links, symlinks, batchfiles,
              inplace, IPv6, 64-bit system inums, 64-bit internal inums
"""
V327 = """rsync  version 3.2.7  protocol version 31
Copyright (C) 1996-2022 by Andrew Tridgell, Wayne Davison, and others.
Web site: https://rsync.samba.org/
Capabilities:
    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,
"""
V350 = """rsync  version 3.5.0  protocol version 32
Copyright (C) 1996-2025 by Andrew Tridgell, Wayne Davison, and others.
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (V269, ("2.6.9", 29)),
        (V327, ("3.2.7", 31)),
        (V350, ("3.5.0", 32)),
        ("rsync  version v3.2.3  protocol version 31\n", ("3.2.3", 31)),
        ("rsync  version 3.4.0pre1  protocol version 32.PR1\n", ("3.4.0pre1", 32)),
    ],
)
def test_parse_version_output(text: str, expected: tuple[str, int]) -> None:
    assert rb.parse_version_output(text) == expected


@pytest.mark.parametrize("text", ["", "bash: rsync: command not found\n", "openrsync: protocol 29"])
def test_parse_version_output_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        rb.parse_version_output(text)


# ----------------------------------------------------------------------------- stamp


def test_stamp_text_is_stable_json() -> None:
    sha = rb.KNOWN_SHA256["3.2.7"]
    a = rb.stamp_text("3.2.7", sha, rb.build_flags("3.2.7"))
    assert a == rb.stamp_text("3.2.7", sha, rb.build_flags("3.2.7"))
    assert a.endswith("}\n")
    assert json.loads(a) == {
        "cflags": "",
        "configure_args": DISABLES,
        "sha256": sha,
        "stamp": 2,
        "version": "3.2.7",
    }
    assert list(json.loads(a)) == sorted(json.loads(a))  # key order fixed
    assert a != rb.stamp_text("3.2.7", sha, rb.build_flags("3.2.7", ["--with-rrsync"]))
    assert a != rb.stamp_text("3.2.7", "0" * 64, rb.build_flags("3.2.7"))
    old = json.loads(rb.stamp_text("2.6.9", rb.KNOWN_SHA256["2.6.9"], rb.build_flags("2.6.9")))
    assert old["cflags"] == rb.LEGACY_CFLAGS and old["configure_args"] == []
    assert rb.stamp_path("/opt/pullback/") == "/opt/pullback/share/pullback/rsync.stamp"


# ----------------------------------------------------------------------------- fetch


def make_tarball(path: Path, version: str = "9.9.9", size: int = 1000) -> str:
    """A small real .tar.gz; returns its sha256."""
    payload = (b"rsync test payload\n" * (size // 19 + 1))[:size]
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"rsync-{version}/README")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Mirror:
    root: Path
    sha: str

    @property
    def url(self) -> str:
        return f"file://{self.root}/rsync-{{version}}.tar.gz"


@pytest.fixture
def mirror(tmp_path: Path) -> Mirror:
    root = tmp_path / "mirror"
    root.mkdir()
    return Mirror(root, make_tarball(root / "rsync-9.9.9.tar.gz"))


def test_fetch_good_tarball(tmp_path: Path, mirror: Mirror) -> None:
    lines: list[str] = []
    cache = tmp_path / "cache"
    got = rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, cache, log=lines.append)
    assert got == cache / "rsync-9.9.9.tar.gz"
    assert got.read_bytes() == (mirror.root / "rsync-9.9.9.tar.gz").read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["rsync-9.9.9.tar.gz"]  # no .part left
    assert any("sha256 verified" in line for line in lines)


def test_fetch_refuses_one_changed_byte(tmp_path: Path, mirror: Mirror) -> None:
    tarball = mirror.root / "rsync-9.9.9.tar.gz"
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    tarball.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(rb.FetchError) as err:
        rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, cache, log=lambda _: None)
    assert mirror.sha in str(err.value) and found in str(err.value)
    assert "mismatch" in str(err.value)
    assert list(cache.iterdir()) == []  # nothing kept, nothing extracted


def test_fetch_falls_back_to_next_url(tmp_path: Path, mirror: Mirror) -> None:
    missing = f"file://{tmp_path}/nowhere/rsync-{{version}}.tar.gz"
    got = rb.fetch_tarball(
        "9.9.9", [missing, mirror.url], mirror.sha, tmp_path / "c", log=lambda _: None
    )
    assert rb.sha256_file(got) == mirror.sha


def test_fetch_bad_first_mirror_then_good(tmp_path: Path, mirror: Mirror) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    make_tarball(bad / "rsync-9.9.9.tar.gz", size=2000)  # same name, different bytes
    lines: list[str] = []
    got = rb.fetch_tarball(
        "9.9.9",
        [f"file://{bad}/rsync-{{version}}.tar.gz", mirror.url],
        mirror.sha,
        tmp_path / "c",
        log=lines.append,
    )
    assert rb.sha256_file(got) == mirror.sha
    assert any("REFUSED" in line and mirror.sha in line for line in lines)


def test_fetch_all_fail_lists_each_url(tmp_path: Path) -> None:
    urls = [f"file://{tmp_path}/a/rsync-{{version}}.tar.gz", "ftp://example.invalid/x.tgz"]
    with pytest.raises(rb.FetchError) as err:
        rb.fetch_tarball("9.9.9", urls, "0" * 64, tmp_path / "c", log=lambda _: None)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[1].strip().startswith(f"file://{tmp_path}/a/rsync-9.9.9.tar.gz: ")
    assert "unsupported URL scheme 'ftp'" in lines[2]


def test_fetch_reuses_verified_cache_without_urls(tmp_path: Path, mirror: Mirror) -> None:
    cache = tmp_path / "cache"
    rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, cache, log=lambda _: None)
    (mirror.root / "rsync-9.9.9.tar.gz").unlink()
    lines: list[str] = []
    got = rb.fetch_tarball(
        "9.9.9", ["http://127.0.0.1:9/never"], mirror.sha, cache, log=lines.append
    )
    assert rb.sha256_file(got) == mirror.sha
    assert lines and "cached copy" in lines[0] and not any("fetching" in x for x in lines)


def test_fetch_replaces_corrupt_cache(tmp_path: Path, mirror: Mirror) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "rsync-9.9.9.tar.gz").write_bytes(b"garbage")
    got = rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, cache, log=lambda _: None)
    assert rb.sha256_file(got) == mirror.sha


def test_fetch_progress_does_not_flood(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    blob = bytes(range(256)) * (5 * 4096)  # 5 MiB
    (root / "rsync-9.9.9.tar.gz").write_bytes(blob)
    lines: list[str] = []
    rb.fetch_tarball(
        "9.9.9",
        [f"file://{root}/rsync-{{version}}.tar.gz"],
        hashlib.sha256(blob).hexdigest(),
        tmp_path / "c",
        log=lines.append,
    )
    progress = [x for x in lines if x.strip().endswith("MB") or " MB of " in x]
    assert 3 <= len(progress) <= 6
    assert len(lines) <= 9


# ----------------------------------------------------------------------------- toolchain


@dataclass
class FakeResult:
    stdout: str
    stderr: str = ""
    exited: int = 0


class FakeContext:
    """Answers the one toolchain probe with canned facts and records every command."""

    def __init__(self, probe_output: str) -> None:
        self.probe_output = probe_output
        self.commands: list[tuple[str, str]] = []
        self.passwords: list[object] = []

    def run(self, command: str, **kwargs: object) -> FakeResult:
        assert kwargs == {"hide": True, "warn": True, "in_stream": False}
        self.commands.append(("run", command))
        return FakeResult(self.probe_output)

    def sudo(self, command: str, **kwargs: object) -> FakeResult:
        self.commands.append(("sudo", command))
        self.passwords.append(kwargs.get("password"))
        return FakeResult("")


def as_host(c: FakeContext, password: str | None = None) -> Session:
    """A host's session over the stand-in connection (a password typed once, or none)."""
    return Session(SimpleNamespace(name="web1", admin_user="admin"), c, Run(), password)


NO_CC_DEBIAN = "cc=\nmake=/usr/bin/make\ncompiles=no\npm=apt-get\nos=Linux\n"


def test_toolchain_ok_needs_one_command() -> None:
    c = FakeContext("cc=/usr/bin/cc\nmake=/usr/bin/make\ncompiles=yes\npm=apt-get\nos=Linux\nacl=yes\n")
    tc = rb.ensure_toolchain(as_host(c), install=False, sudo=True)
    assert tc == rb.Toolchain("/usr/bin/cc", "/usr/bin/make")
    assert len(c.commands) == 1


def test_toolchain_missing_without_install_names_exact_command() -> None:
    c = FakeContext(NO_CC_DEBIAN)
    with pytest.raises(rb.ToolchainError) as err:
        rb.ensure_toolchain(as_host(c), install=False, sudo=True)
    assert (
        "sudo apt-get update && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "
        "gcc make libc6-dev libacl1-dev"
    ) in str(err.value)
    assert all(kind == "run" for kind, _ in c.commands)  # nothing installed


INSTALL = [
    "sh -c 'apt-get update'",
    "sh -c 'env DEBIAN_FRONTEND=noninteractive apt-get install -y gcc make libc6-dev libacl1-dev'",
]


def test_toolchain_install_runs_table_commands_with_sudo() -> None:
    c = FakeContext(NO_CC_DEBIAN)
    with pytest.raises(rb.ToolchainError, match="still no working"):
        rb.ensure_toolchain(as_host(c), install=True, sudo=True, log=lambda _: None)  # probe stays bad
    # No stored password: sudo -n, never a prompt answered with nothing.
    sudo = [cmd.removeprefix("sudo -n ") for kind, cmd in c.commands
            if kind == "run" and cmd.startswith("sudo -n ")]
    assert sudo == INSTALL


def test_toolchain_install_uses_the_stored_sudo_password() -> None:
    """build-rsync's root work goes through the one runner: a host with
    ``sudo_password: true`` gets the password typed once for the run."""
    c = FakeContext(NO_CC_DEBIAN)
    with pytest.raises(rb.ToolchainError, match="still no working"):
        rb.ensure_toolchain(as_host(c, "typed once"), install=True, sudo=True, log=lambda _: None)
    assert [cmd for kind, cmd in c.commands if kind == "sudo"] == INSTALL
    assert c.passwords == ["typed once", "typed once"]


def test_toolchain_without_acl_headers_installs_them() -> None:
    """A compiler is not enough: without libacl's headers rsync 3.x builds "no ACLs" and the
    default -A fails every backup."""
    c = FakeContext("cc=/usr/bin/cc\nmake=/usr/bin/make\ncompiles=yes\npm=apt-get\nos=Linux\n"
                    "acl=no\n")
    with pytest.raises(rb.ToolchainError) as err:
        rb.ensure_toolchain(as_host(c), install=False, sudo=True)
    assert "missing the ACL headers (libacl, for rsync -A)" in str(err.value)
    assert "libacl1-dev" in str(err.value)


def test_missing_capabilities_reads_the_version_output() -> None:
    from roles.core.rsync import missing_capabilities
    built_without = ("Capabilities:\n    64-bit files, hardlink-symlinks, IPv6, atimes, "
                     "batchfiles, inplace, append, no ACLs,\n    xattrs, optional secluded-args")
    assert missing_capabilities(built_without) == ["ACLs"]
    assert missing_capabilities("append, ACLs,\n    xattrs, iconv") == []
    assert missing_capabilities("append, no\n    xattrs") == ["xattrs"]


@pytest.mark.parametrize(
    ("pm", "expected"),
    [
        ("dnf", ["dnf install -y gcc make libacl-devel"]),
        ("yum", ["yum install -y gcc make libacl-devel"]),
        ("zypper", ["zypper --non-interactive install gcc make libacl-devel"]),
        ("apk", ["apk add --no-cache build-base acl-dev"]),
    ],
)
def test_install_commands_table(pm: str, expected: list[str]) -> None:
    assert rb.install_commands(pm, sudo=False) == expected


def test_toolchain_macos_hint() -> None:
    c = FakeContext("cc=\nmake=\ncompiles=no\npm=\nos=Darwin\n")
    with pytest.raises(rb.ToolchainError, match="xcode-select --install"):
        rb.ensure_toolchain(as_host(c), install=True, sudo=False)


# ----------------------------------------------------------------------------- signature

WAYNE = "0048C8B026D4C96F0E589C2F6C859FB14B96A8C5"
TRIDGE = "9FEF112DCE19A0DC7E882CB81BB24997A8535F6F"
SUBKEY = "1111111111111111111111111111111111111111"
OTHER = "2222222222222222222222222222222222222222"


def validsig(signing: str, primary: str | None = None) -> str:
    tail = f" {primary}" if primary else ""
    return f"[GNUPG:] VALIDSIG {signing} 2025-01-15 1736900000 0 4 0 1 10 00{tail}"


def test_signer_table_pins_the_two_upstream_keys() -> None:
    assert {s.fingerprint for s in rb.SIGNERS} == {WAYNE, TRIDGE}
    for s in rb.SIGNERS:
        assert re.fullmatch(r"[0-9A-F]{40}", s.fingerprint), s
    assert [s.name for s in rb.signers_for("2.6.9")] == ["Wayne Davison"]
    assert [s.name for s in rb.signers_for("3.2.7")] == ["Wayne Davison"]
    assert [s.name for s in rb.signers_for("3.4.0")] == ["Andrew Tridgell"]
    assert [s.name for s in rb.signers_for("3.5.1")] == ["Andrew Tridgell"]
    assert rb.signers_for("3.3.0") == []  # not pinned: "not checked", never "good"
    assert rb.signers_for("2.6.8") == []
    for version in rb.KNOWN_SHA256:  # every pinned tarball has exactly one pinned signer
        assert len(rb.signers_for(version)) == 1, version


def test_signers_for_takes_an_injected_table() -> None:
    mine = (rb.Signer(OTHER, "Test", "3.0.0", "3.1.0"),)
    assert rb.signers_for("3.0.9", mine) == list(mine)
    assert rb.signers_for("3.1.0", mine) == []


def test_parse_gpg_status_keeps_only_status_lines() -> None:
    text = (
        "gpg: Signature made Thu\n"
        "[GNUPG:] NEWSIG\n"
        "[GNUPG:] GOODSIG 6C859FB14B96A8C5 Wayne Davison <wayne@opencoder.net>\r\n"
        f"{validsig(WAYNE, WAYNE)}\n"
        "[GNUPG:] not a keyword\n"
    )
    records = rb.parse_gpg_status(text)
    assert [k for k, _ in records] == ["NEWSIG", "GOODSIG", "VALIDSIG"]
    assert records[0][1] == []
    assert records[1][1][:2] == ["6C859FB14B96A8C5", "Wayne"]
    assert records[2][1][0] == WAYNE and records[2][1][9] == WAYNE


def test_keyring_fingerprints_takes_primary_keys_only() -> None:
    colons = (
        "tru::1:1736900000:0:3:1:5\n"
        "pub:-:4096:1:1BB24997A8535F6F:1:::-:::scESC::::::23::0:\n"
        f"fpr:::::::::{TRIDGE}:\n"
        "uid:-::::1::X::Andrew Tridgell <tridge@samba.org>::::::::::0:\n"
        "sub:-:4096:1:0000000000000001:1:::::s::::::23:\n"
        f"fpr:::::::::{SUBKEY}:\n"
        "pub:-:1024:17:6C859FB14B96A8C5:1:::-:::scESC::::::23::0:\n"
        f"fpr:::::::::{WAYNE.lower()}:\n"
    )
    assert rb.keyring_fingerprints(colons) == {TRIDGE, WAYNE}


def test_judge_good_signature_names_the_pinned_signer() -> None:
    tridge = rb.signers_for("3.4.1")
    status = f"[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 1BB24997A8535F6F A\n{validsig(TRIDGE, TRIDGE)}\n"
    check = rb.judge_gpg_status(status, 0, tridge)
    assert check == rb.SignatureCheck("good", f"Andrew Tridgell, {TRIDGE}")
    assert check.line == f"signature: good (Andrew Tridgell, {TRIDGE})"


def test_judge_subkey_signature_counts_for_its_primary_key() -> None:
    status = validsig(SUBKEY, TRIDGE)
    assert rb.judge_gpg_status(status, 0, rb.signers_for("3.4.1")).status == "good"
    # Without the primary-key field, the signing key itself must be the pinned one.
    assert rb.judge_gpg_status(validsig(TRIDGE), 0, rb.signers_for("3.4.1")).status == "good"
    assert rb.judge_gpg_status(validsig(SUBKEY), 0, rb.signers_for("3.4.1")).status == "bad"


def test_judge_wrong_pinned_signer_for_the_version_is_bad() -> None:
    # Wayne's key is pinned, but not for 3.4.x: a 3.4.1 tarball signed by it is refused.
    check = rb.judge_gpg_status(validsig(WAYNE, WAYNE), 0, rb.signers_for("3.4.1"))
    assert check.status == "bad" and WAYNE in check.detail and TRIDGE in check.detail


@pytest.mark.parametrize(
    ("status", "rc", "words"),
    [
        ("[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 6C859FB14B96A8C5 Wayne\n", 1, "BAD signature"),
        ("[GNUPG:] NODATA 4\n", 2, "no readable OpenPGP signature"),
        ("[GNUPG:] REVKEYSIG 6C859FB14B96A8C5 Wayne\n" + validsig(WAYNE, WAYNE), 0, "revoked"),
        (
            f"[GNUPG:] ERRSIG 018E93526F6814C4 22 8 00 1795691358 9 {OTHER}\n"
            "[GNUPG:] NO_PUBKEY 018E93526F6814C4\n",
            2,
            f"{OTHER}, which is not in the keyring",
        ),
        (validsig(OTHER, OTHER), 0, f"by key {OTHER}, not Wayne Davison {WAYNE}"),
        (validsig(WAYNE, WAYNE), 2, "exited 2"),
        ("[GNUPG:] NEWSIG\n", 0, "no valid signature"),
        # One good signature does not cover a bad one in the same file.
        (f"{validsig(WAYNE, WAYNE)}\n[GNUPG:] BADSIG 1 X\n", 1, "BAD signature"),
    ],
)
def test_judge_refuses(status: str, rc: int, words: str) -> None:
    check = rb.judge_gpg_status(status, rc, rb.signers_for("3.2.7"))
    assert check.status == "bad" and words in check.detail, check


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("", "gpg failed"),
        ("[GNUPG:] ERRSIG 6C859FB14B96A8C5 17 2 00 1666000000 4 -\n", "ERRSIG rc 4"),
    ],
)
def test_judge_cannot_tell(status: str, words: str) -> None:
    check = rb.judge_gpg_status(status, 2, rb.signers_for("3.2.7"))
    assert check.status == "not checked" and words in check.detail, check


def test_check_signature_without_gpg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb.shutil, "which", lambda _name: None)
    check = rb.check_signature(
        tmp_path / "t.tar.gz", "3.2.7", ["http://127.0.0.1:9/x.asc"], tmp_path / "ring.gpg"
    )
    assert check == rb.SignatureCheck("not checked", "no gpg on PATH")


def test_check_signature_no_keyring_no_signer_missing_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rb.shutil, "which", lambda _name: "/nonexistent/gpg")
    never = ["http://127.0.0.1:9/never.asc"]  # nothing may be fetched in these cases
    check = rb.check_signature(tmp_path / "t.tar.gz", "3.2.7", never, None)
    assert check.line == "signature: not checked (no keyring: set rsync.gpg_keyring)"
    check = rb.check_signature(tmp_path / "t.tar.gz", "3.3.0", never, tmp_path / "ring.gpg")
    assert check.line == "signature: not checked (no pinned signer for rsync 3.3.0)"
    with pytest.raises(rb.FetchError, match="gpg_keyring .*ring.gpg: no such file"):
        rb.check_signature(tmp_path / "t.tar.gz", "3.2.7", never, tmp_path / "ring.gpg")
    assert list(tmp_path.iterdir()) == []


def test_fetch_prints_one_signature_line(tmp_path: Path, mirror: Mirror) -> None:
    lines: list[str] = []
    rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, tmp_path / "c", log=lines.append)
    sig = [x for x in lines if "signature:" in x]
    assert sig == [
        "rsync-9.9.9.tar.gz: signature: not checked (no keyring: set rsync.gpg_keyring)"
    ] or sig == ["rsync-9.9.9.tar.gz: signature: not checked (no gpg on PATH)"]


def test_fetch_require_signature_refuses_unchecked(tmp_path: Path, mirror: Mirror) -> None:
    cache = tmp_path / "c"
    with pytest.raises(rb.SignatureError, match="--require-signature") as err:
        rb.fetch_tarball(
            "9.9.9", [mirror.url], mirror.sha, cache, log=lambda _: None, require_signature=True
        )
    assert isinstance(err.value, rb.FetchError)  # build_everywhere reports it per host
    # The tarball itself passed its sha256: it stays cached, only the build is refused.
    assert [p.name for p in cache.iterdir()] == ["rsync-9.9.9.tar.gz"]


@pytest.mark.parametrize("cached", [False, True])
def test_fetch_bad_signature_removes_cached_files(
    tmp_path: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    cache = tmp_path / "c"
    if cached:
        rb.fetch_tarball("9.9.9", [mirror.url], mirror.sha, cache, log=lambda _: None)
    seen: list[tuple[list[str], object]] = []

    def bad(
        tarball: Path, version: str, asc_urls: list[str], keyring: object, *, signers: object
    ) -> rb.SignatureCheck:
        seen.append((asc_urls, signers))
        tarball.with_name(tarball.name + ".asc").write_text("sig")
        return rb.SignatureCheck("bad", "BAD signature by key 1234")

    monkeypatch.setattr(rb, "check_signature", bad)
    lines: list[str] = []
    with pytest.raises(rb.SignatureError, match="REFUSED, bad signature: BAD signature"):
        rb.fetch_tarball(
            "9.9.9",
            [mirror.url],
            mirror.sha,
            cache,
            log=lines.append,
            keyring=tmp_path / "ring.gpg",
        )
    assert list(cache.iterdir()) == []
    assert "rsync-9.9.9.tar.gz: signature: bad (BAD signature by key 1234)" in lines
    assert seen == [([mirror.url.replace("{version}", "9.9.9") + ".asc"], rb.SIGNERS)]


def test_inventory_gpg_keyring_is_optional_and_absolute() -> None:
    from roles.inventory.schema import RsyncSettings

    assert RsyncSettings().gpg_keyring is None
    assert RsyncSettings(gpg_keyring="/etc/pullback/rsync.gpg").gpg_keyring == (
        "/etc/pullback/rsync.gpg"
    )
    assert RsyncSettings(gpg_keyring="~/k.gpg").gpg_keyring == str(Path("~/k.gpg").expanduser())
    with pytest.raises(ValueError, match="absolute"):
        RsyncSettings(gpg_keyring="k.gpg")


# --- build-rsync --dry-run: the plan per end (pure) ------------------------------------------


def test_plan_build_says_what_a_run_would_do() -> None:
    sha = rb.KNOWN_SHA256["3.2.7"]
    flags = rb.build_flags("3.2.7")
    line = "rsync  version 3.2.7  protocol version 31\n"
    done = rb.plan_build("3.2.7", sha, flags, "/usr/local",
                         rb.stamp_text("3.2.7", sha, flags), line)
    assert done.up_to_date and done.describe() == "ok      rsync  version 3.2.7  protocol version 31"
    # Debian's own 3.2.7 in the prefix, without pullback's stamp: a build.
    other = rb.plan_build("3.2.7", sha, flags, "/usr/local", "", line)
    assert not other.up_to_date
    assert other.describe() == ("would build rsync 3.2.7 into /usr/local (now: rsync  version "
                                "3.2.7  protocol version 31)")
    nothing = rb.plan_build("3.5.1", rb.KNOWN_SHA256["3.5.1"], rb.build_flags("3.5.1"),
                            "/opt/x", "", "")
    assert nothing.describe() == "would build rsync 3.5.1 into /opt/x (now: no rsync in /opt/x)"
    # A stamp of another version (an upgrade): a build.
    old = rb.plan_build("3.5.1", rb.KNOWN_SHA256["3.5.1"], rb.build_flags("3.5.1"),
                        "/usr/local", rb.stamp_text("3.2.7", sha, flags), line)
    assert not old.up_to_date


def test_an_end_reports_ok_or_built_as_a_state() -> None:
    """build-rsync's per-end word is a ``State`` that prints as the words it always printed,
    padded as before (``invoke build-rsync``: ``END  built  rsync  version ...``)."""
    line = "rsync  version 3.2.7  protocol version 31"
    there, new = (rb.BuildResult(version_line=line, protocol=31, skipped=skipped, log_path="")
                  for skipped in (True, False))
    assert (there.state, new.state) == (State.OK, State.BUILT)
    assert type(there.state) is State and type(new.state) is State
    assert [f"{r.state:6} {r.version_line}" for r in (there, new)] == [
        f"ok     {line}", f"built  {line}"]

