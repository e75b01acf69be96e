"""build-rsync's optional ``.asc`` check with a real gpg against a loopback HTTP mirror.

The tarball is the real upstream ``rsync-3.2.7.tar.gz`` (Debian bookworm's byte-identical
orig, fetched offline by ``lab.mirror``). Upstream's signing keys are not available here,
so the test makes two throwaway ed25519 keys in a temporary GNUPGHOME, signs the tarball,
and pins its own key through ``fetch_tarball(signers=...)``. No rsync is built: the whole
file runs in a few seconds. A missing gpg makes these tests FAIL, never skip.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab import hosts as lab
from lab.mirror import fetch_debian_orig
from roles.features import rsync_build as rb
from tests.integration.conftest import closed_port, serve_directory

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
VERSION = "3.2.7"
SHA = rb.KNOWN_SHA256[VERSION]
NAME = f"rsync-{VERSION}.tar.gz"
UPSTREAM_PATH = "pub/rsync/src/rsync-{version}.tar.gz"


@dataclass
class Keys:
    fpr_a: str  # the key the tests pin
    fpr_b: str  # another throwaway key, never pinned
    ring_a: Path  # binary export of A's public key
    ring_a_armored: Path  # armored export of A's public key
    ring_ab: Path  # both public keys

    @property
    def pin_a(self) -> tuple[rb.Signer, ...]:
        return (rb.Signer(self.fpr_a, "Test Signer A", "3.0.0"),)


@dataclass
class Mirror:
    base: str
    keys: Keys

    def url(self, sub: str) -> str:
        return f"{self.base}/{sub}/{UPSTREAM_PATH}"


def gpg(home: str, *args: str, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, "GNUPGHOME": home, "LC_ALL": "C"}
    res = subprocess.run(
        ["gpg", "--batch", "--no-tty", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, (args, res.stderr.decode(errors="replace"))
    return res.stdout


def fingerprint(home: str, uid: str) -> str:
    colons = gpg(home, "--with-colons", "--list-keys", uid).decode()
    return sorted(rb.keyring_fingerprints(colons))[0]


def sign(home: str, fpr: str, data: bytes) -> bytes:
    return gpg(home, "--armor", "--local-user", fpr, "--detach-sign", "--output", "-", stdin=data)


def damage_armor(asc: bytes) -> bytes:
    """Change one byte inside the signature packet and re-armor without a CRC line."""
    lines = asc.decode().splitlines()
    body = [x for x in lines[1:-1] if x and not x.startswith("=")]
    raw = bytearray(base64.b64decode("".join(body)))
    raw[len(raw) // 2] ^= 0x40
    b64 = base64.b64encode(bytes(raw)).decode()
    chunks = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([lines[0], "", *chunks, lines[-1], ""]).encode()


def garble(asc: bytes) -> bytes:
    """Change one base64 character, keep the armor's CRC line."""
    lines = asc.decode().splitlines()
    line = lines[2]
    lines[2] = line[:10] + ("A" if line[10] != "A" else "B") + line[11:]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    assert shutil.which("gpg"), "gpg is needed (apt-get install gpg)"
    assert shutil.which("apt-get"), "apt-get is needed to fetch rsync's source from Debian"
    data = fetch_debian_orig(VERSION, lab.STATE / "cache").read_bytes()
    root = tmp_path_factory.mktemp("sig-mirror")
    # A short GNUPGHOME: gpg-agent's socket path must stay under the sun_path limit.
    home = tempfile.mkdtemp(prefix="pb-gpg.")
    try:
        for uid in ("Test Signer A <a@example.invalid>", "Test Signer B <b@example.invalid>"):
            gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        fpr_a = fingerprint(home, "a@example.invalid")
        fpr_b = fingerprint(home, "b@example.invalid")
        good = sign(home, fpr_a, data)
        signatures = {
            "good": good,
            "other": sign(home, fpr_b, data),  # a valid signature, by the wrong key
            "badsig": sign(home, fpr_a, data + b"\n"),  # right key, other bytes: BADSIG
            "damaged": damage_armor(good),  # one byte of the signature changed
            "garbled": garble(good),  # armor checksum wrong: no readable signature
        }
        keys = Keys(fpr_a, fpr_b, root / "ring-a.gpg", root / "ring-a.asc", root / "ring-ab.gpg")
        keys.ring_a.write_bytes(gpg(home, "--export", fpr_a))
        keys.ring_a_armored.write_bytes(gpg(home, "--armor", "--export", fpr_a))
        keys.ring_ab.write_bytes(gpg(home, "--export", fpr_a, fpr_b))
    finally:
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"],
            env={**os.environ, "GNUPGHOME": home},
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)
    for sub in ("good", "other", "badsig", "damaged", "garbled", "nosig"):
        tarball = root / "www" / sub / UPSTREAM_PATH.format(version=VERSION)
        tarball.parent.mkdir(parents=True)
        tarball.write_bytes(data)
        if sub in signatures:
            tarball.with_name(NAME + ".asc").write_bytes(signatures[sub])
    with serve_directory(root / "www") as base:
        yield Mirror(base, keys)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/{UPSTREAM_PATH}"


def fetch(mirror: Mirror, cache: Path, urls: list[str], lines: list[str], **kw: object) -> Path:
    kw.setdefault("signers", mirror.keys.pin_a)
    return rb.fetch_tarball(VERSION, urls, SHA, cache, log=lines.append, **kw)  # type: ignore[arg-type]


def signature_lines(lines: list[str]) -> list[str]:
    return [x.split(": ", 1)[1] for x in lines if ": signature: " in x]


def test_good_signature_is_reported_and_cached(mirror: Mirror, tmp_path: Path) -> None:
    cache, lines = tmp_path / "cache", []
    # The dead first URL serves nothing; the .asc comes from the URL that served the tarball.
    got = fetch(
        mirror,
        cache,
        [closed_port_url(), mirror.url("good")],
        lines,
        keyring=mirror.keys.ring_a,
        require_signature=True,
    )
    assert signature_lines(lines) == [f"signature: good (Test Signer A, {mirror.keys.fpr_a})"]
    assert sorted(p.name for p in cache.iterdir()) == [NAME, NAME + ".asc"]
    assert rb.sha256_file(got) == SHA
    # Re-run: tarball and .asc both from the cache, nothing fetched, well under a second.
    lines.clear()
    started = time.monotonic()
    fetch(
        mirror,
        cache,
        [closed_port_url()],
        lines,
        keyring=mirror.keys.ring_a,
        require_signature=True,
    )
    assert time.monotonic() - started < 1.0
    assert signature_lines(lines) == [f"signature: good (Test Signer A, {mirror.keys.fpr_a})"]
    assert not any("fetching" in x for x in lines)


def test_armored_keyring_works_too(mirror: Mirror, tmp_path: Path) -> None:
    lines: list[str] = []
    fetch(
        mirror, tmp_path / "cache", [mirror.url("good")], lines, keyring=mirror.keys.ring_a_armored
    )
    assert signature_lines(lines) == [f"signature: good (Test Signer A, {mirror.keys.fpr_a})"]


def test_cached_tarball_without_asc_fetches_it(mirror: Mirror, tmp_path: Path) -> None:
    cache, lines = tmp_path / "cache", []
    fetch(mirror, cache, [mirror.url("good")], lines)  # no keyring: no .asc fetched
    assert [p.name for p in cache.iterdir()] == [NAME]
    lines.clear()
    fetch(
        mirror, cache, [mirror.url("nosig"), mirror.url("good")], lines, keyring=mirror.keys.ring_a
    )
    assert signature_lines(lines) == [f"signature: good (Test Signer A, {mirror.keys.fpr_a})"]
    assert (cache / (NAME + ".asc")).is_file()


@pytest.mark.parametrize(
    ("sub", "ring", "words"),
    [
        ("other", "ring_ab", "a good signature, but by key {fpr_b}, not Test Signer A"),
        ("other", "ring_a", "made by key {fpr_b}, which is not in the keyring"),
        ("badsig", "ring_a", "BAD signature by key"),
        ("damaged", "ring_a", "BAD signature by key"),
        ("garbled", "ring_a", "no readable OpenPGP signature"),
    ],
)
def test_bad_signature_is_refused_and_cache_emptied(
    mirror: Mirror, tmp_path: Path, sub: str, ring: str, words: str
) -> None:
    cache, lines = tmp_path / "cache", []
    words = words.format(fpr_b=mirror.keys.fpr_b)
    with pytest.raises(rb.SignatureError) as err:
        fetch(mirror, cache, [mirror.url(sub)], lines, keyring=getattr(mirror.keys, ring))
    assert words in str(err.value) and "REFUSED" in str(err.value)
    assert [x for x in signature_lines(lines) if x.startswith("signature: bad (")]
    assert list(cache.iterdir()) == []  # neither the tarball nor the .asc is kept


def test_no_asc_on_the_mirror(mirror: Mirror, tmp_path: Path) -> None:
    cache, lines = tmp_path / "cache", []
    url = mirror.url("nosig").replace("{version}", VERSION) + ".asc"
    fetch(mirror, cache, [mirror.url("nosig")], lines, keyring=mirror.keys.ring_a)
    assert signature_lines(lines) == [
        f"signature: not checked (no .asc at {url} (HTTP 404 File not found))"
    ]
    with pytest.raises(rb.SignatureError, match="--require-signature"):
        fetch(
            mirror,
            cache,
            [mirror.url("nosig")],
            [],
            keyring=mirror.keys.ring_a,
            require_signature=True,
        )
    assert [p.name for p in cache.iterdir()] == [NAME]  # sha256-verified: kept


def test_no_keyring_configured(mirror: Mirror, tmp_path: Path) -> None:
    lines: list[str] = []
    fetch(mirror, tmp_path / "cache", [mirror.url("good")], lines)
    assert signature_lines(lines) == ["signature: not checked (no keyring: set rsync.gpg_keyring)"]
    with pytest.raises(rb.SignatureError, match="--require-signature"):
        fetch(mirror, tmp_path / "cache", [mirror.url("good")], [], require_signature=True)


def test_default_table_pins_upstream_keys_only(mirror: Mirror, tmp_path: Path) -> None:
    """A key in the user's keyring is not enough: only the pinned upstream signers count."""
    lines: list[str] = []
    rb.fetch_tarball(
        VERSION,
        [mirror.url("good")],
        SHA,
        tmp_path / "cache",
        log=lines.append,
        keyring=mirror.keys.ring_ab,
    )
    assert signature_lines(lines) == [
        f"signature: not checked (keyring {mirror.keys.ring_ab} has no key of Wayne Davison "
        "0048C8B026D4C96F0E589C2F6C859FB14B96A8C5)"
    ]


def test_build_everywhere_passes_keyring_and_require(mirror: Mirror, tmp_path: Path) -> None:
    """The inventory's rsync.gpg_keyring and --require-signature reach the fetch."""

    def host(name: str, keyring: Path | None) -> SimpleNamespace:
        return SimpleNamespace(
            name=name,
            rsync=SimpleNamespace(
                version=VERSION,
                sha256=None,
                urls=[mirror.url("nosig")],
                gpg_keyring=keyring,
                local_prefix=str(tmp_path / "prefix"),
            ),
        )

    lines: list[str] = []
    results = rb.build_everywhere(
        [host("h1", mirror.keys.ring_a)],
        local=False,
        remote=False,
        cache_dir=tmp_path / "cache",
        log=lines.append,
    )
    # The keyring arrived (not "no keyring"); the default table pins upstream's keys.
    assert results == []
    assert any(f"keyring {mirror.keys.ring_a} has no key of Wayne" in x for x in lines)
    results = rb.build_everywhere(
        [host("h1", None)],
        local=False,
        remote=False,
        cache_dir=tmp_path / "cache",
        require_signature=True,
        log=lambda _: None,
    )
    assert len(results) == 1 and results[0].end == "h1"
    assert "--require-signature" in (results[0].error or "")


def test_cli_has_the_flag() -> None:
    out = subprocess.run(
        [str(ROOT / ".venv/bin/invoke"), "--help", "build-rsync"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--require-signature" in out
