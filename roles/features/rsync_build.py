"""Fetch, verify, build and install one pinned rsync, the same on every end.

The seed's protocol trouble came from two different rsync builds talking to each other.
pullback builds ONE upstream release from a checksum-verified tarball, on the backup client
and on each server, and calls it by full path on both sides.

Layers:
- pure: ``validate_version``, ``expected_sha256``, ``build_flags``, ``stamp_text``,
  ``parse_version_output``, ``security_warning`` (unit-tested tables);
- client only: ``fetch_tarball`` (mirrors tried in order, local cache, sha256 checked
  before anything is kept; then, optionally, upstream's ``.asc`` signature checked with gpg
  against the pinned signers in ``SIGNERS``: ``check_signature``);
- either end: ``installed_rsync``, ``ensure_toolchain`` and ``build_rsync`` take ``c``,
  a ``LocalShell`` (this machine) or a ``Session`` (a host): the same ``run(command,
  sudo=...)``, so the build is one function for both ends.
  The remote never needs internet: the caller uploads the verified tarball (SFTP, as the
  login user) and passes its path; it is verified again on that end before extraction.

Every shell command is built from argv lists with ``shlex.join``/``shlex.quote``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import invoke

from roles.core import platforms
from roles.core.hardened import Mode
from roles.core.outcome import State
from roles.core.render import render
from roles.core.rsync import (
    CLIENT_CVES,
    MIN_SAFE_CLIENT,
    STAMP_RELPATH,
    client_exposure,
    client_refusal,
    missing_capabilities,  # noqa: F401 - STAMP_RELPATH re-exported
    parse_version_output,
    validate_version,
    version_key,
)
from roles.hostfiles.plan import plan_forced_rsync
from roles.hostfiles.transaction import apply
from roles.local.keys import KeyFileError, read_public_key
from roles.remote.facts import gather
from roles.remote.session import Run, Session, needs_password_error, sudo_command

# SHA-256 of upstream ``rsync-VERSION.tar.gz`` from download.samba.org. Each sum was taken
# from at least one independent packaging recipe (OpenEmbedded, Spack, Homebrew, Nix); the
# 3.2.7 sum also matches Debian bookworm's rsync_3.2.7.orig.tar.gz byte for byte (see
# docs/build-rsync.md). A version not listed here needs ``rsync.sha256`` in the inventory.
KNOWN_SHA256: dict[str, str] = {
    "2.6.9": "ca437301becd890e73300bc69a39189ff1564baa761948ff149b3dd7bde633f9",
    "3.2.7": "4e7d9d3f6ed10878c58c5fb724a67dacf4b6aac7340b13e488fb2dc41346f2bb",
    "3.4.0": "8e942f95a44226a012fe822faffa6c7fc38c34047add3a0c941e9bc8b8b93aa4",
    "3.4.1": "2924bcb3a1ed8b551fc101f740b9f0fe0a202b115027647cf69850d65fd88c52",
    "3.4.2": "ff10aa2c151cd4b2dbbe6135126dbc854046113d2dfb49572a348233267eb315",
    "3.4.3": "c72e63ca3021cbc80ba86ec30102773f4c5631fbc492b52e773b3958f82a53d3",
    "3.4.4": "bd88cf82fa653da32314fb229136407c5c90f80d1758d8f4b091767877d8fa96",
    "3.5.0": "c7ffd1ef653e99540f661e47cb00b7f9cad1ee6b972399b16f93d672656e0d33",
    "3.5.1": "c55f9c9dc10fb8bec397b399a0fdded53cc9a2d8e30891bb0d63724d25c37bef",
}

DEFAULT_URL = "https://download.samba.org/pub/rsync/src/rsync-{version}.tar.gz"

# 3.2.0 added the optional libraries (openssl, xxhash, zstd, lz4) and the md2man step;
# disabling them lets the build succeed with nothing but a C compiler, make and libc headers.
NO_OPTIONAL_LIBS = [
    "--disable-openssl",
    "--disable-xxhash",
    "--disable-zstd",
    "--disable-lz4",
    "--disable-md2man",
]

# Releases before 3.2.0 predate GCC 10's -fno-common and GCC 14's stricter C defaults: with
# GCC 14 their configure misdetects features and make fails. These are the flags upstream's
# own script for old releases uses; -O2 is added because setting CFLAGS replaces autoconf's
# default "-g -O2". Harmless on GCC 12 (2.6.9 builds there with or without them).
LEGACY_CFLAGS = (
    "-O2 -std=gnu11 -fcommon -Wno-error -Wno-incompatible-pointer-types"
    " -Wno-implicit-function-declaration -Wno-int-conversion"
)

FETCH_TIMEOUT = 20.0
PROGRESS_STEP = 1 << 20  # one progress line per MiB at most
LOG_TAIL_LINES = 30

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MARK = "--pullback-mark--"
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._+/-]*$")

Log = Callable[[str], None]


class FetchError(RuntimeError):
    """No URL produced a tarball with the expected SHA-256."""


class BuildError(RuntimeError):
    """A build step failed; ``log_tail`` holds the end of the build log on that end."""

    def __init__(self, message: str, *, phase: str = "", log_tail: str = "", log_path: str = ""):
        super().__init__(message)
        self.phase = phase
        self.log_tail = log_tail
        self.log_path = log_path


class ToolchainError(RuntimeError):
    """No working C compiler or make, and pullback may not (or cannot) install them."""


# --------------------------------------------------------------------------- pure layer


def expected_sha256(version: str, configured: str | None = None,
                    pins: Mapping[str, str] = KNOWN_SHA256) -> str:
    """The SHA-256 a tarball of ``version`` must have.

    A pinned sum always wins; a configured sum is accepted for a known version only when it
    agrees (a disagreement is an error that names both). Unknown versions need a configured
    sum. ``pins`` is the pin table, ``KNOWN_SHA256`` everywhere but in tests.
    """
    validate_version(version)
    pinned = pins.get(version)
    if configured is not None:
        configured = configured.strip().lower()
        if not _SHA256_RE.match(configured):
            raise ValueError(f"rsync.sha256 {configured!r} is not a 64-digit hex SHA-256")
        if pinned is not None and configured != pinned:
            raise ValueError(
                f"rsync.sha256 for {version} is {configured} but pullback pins {pinned}; "
                "remove rsync.sha256 or fix it"
            )
        return configured
    if pinned is None:
        raise ValueError(
            f"pullback has no pinned sha256 for rsync {version}: set rsync.sha256 in the "
            f"inventory to the SHA-256 of rsync-{version}.tar.gz from a source you trust "
            f"(known: {', '.join(pins)})"
        )
    return pinned


@dataclass(frozen=True)
class BuildFlags:
    """What configure gets: ``env`` goes to configure's environment only.

    Never to make's command line: ``make CFLAGS=...`` overrides the Makefile's CFLAGS,
    which carry what configure added to them (2.6.9's ``-I./popt`` for its bundled popt:
    without it ``options.c`` fails on a missing ``popt.h``). configure writes the flags
    into the Makefile, so make and make install use them anyway.
    """

    configure_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def build_flags(version: str, extra_configure_args: Sequence[str] = ()) -> BuildFlags:
    """Configure arguments and environment for ``version`` (no optional libraries)."""
    key = version_key(version)
    args = list(NO_OPTIONAL_LIBS) if key >= (3, 2, 0) else []
    env = {"CFLAGS": LEGACY_CFLAGS} if key < (3, 2, 0) else {}
    return BuildFlags(configure_args=args + list(extra_configure_args), env=env)


def security_warning(version: str) -> str | None:
    """A warning for releases a client must not run unknowingly (before 3.4.1: no fixes for
    CVE-2024-12084..12088, or 3.4.0's regressions)."""
    if client_exposure(version) is None:
        return None
    return (
        f"rsync {version} is older than {MIN_SAFE_CLIENT} and lacks the fixes for "
        f"{CLIENT_CVES}: a malicious or compromised server can attack a client running it "
        "(memory corruption, file leaks, writes outside the destination); backup refuses "
        "such a local rsync unless rsync.allow_vulnerable is true. Prefer "
        f"{MIN_SAFE_CLIENT} or newer unless you need this version for compatibility."
    )


def client_build_refusals(hosts: Sequence[Any], version: str | None = None) -> list[str]:
    """What build-rsync refuses before anything is built: a LOCAL build older than 3.4.1
    for hosts without rsync.allow_vulnerable (backup would refuse to run it anyway). One
    line per version, naming the hosts; empty when everything may be built."""
    wanted: dict[str, list[str]] = {}
    for host in hosts:
        chosen = version or host.rsync.version
        if not host.rsync.allow_vulnerable and client_exposure(chosen) is not None:
            wanted.setdefault(chosen, []).append(host.name)
    source = "--version" if version else "rsync.version"
    return [client_refusal(chosen, f"the local build for {', '.join(names)} ({source})") or ""
            for chosen, names in wanted.items()]


def stamp_text(version: str, sha256: str, flags: BuildFlags) -> str:
    """Stable JSON describing a build; equal text means "already built like this"."""
    data = {
        "cflags": flags.env.get("CFLAGS", ""),
        "configure_args": list(flags.configure_args),
        "sha256": sha256,
        "stamp": 2,  # 2: 3.x builds must have ACLs and xattrs
        "version": version,
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def stamp_path(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{STAMP_RELPATH}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- fetching


def _download(url: str, dest: Path, log: Log) -> str:
    """Stream ``url`` into ``dest`` (already open-able), return its sha256."""
    h = hashlib.sha256()
    done = 0
    next_report = PROGRESS_STEP
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as resp, dest.open("wb") as out:  # noqa: S310 - scheme checked by caller
        total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        of_total = f" of {int(total) / 1e6:.1f} MB" if total and total.isdigit() else ""
        for chunk in iter(lambda: resp.read(1 << 16), b""):
            out.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if done >= next_report:
                log(f"  {done / 1e6:.1f} MB{of_total}")
                next_report = done + PROGRESS_STEP
    log(f"  {done / 1e6:.1f} MB received")
    return h.hexdigest()


@dataclass(frozen=True)
class Signer:
    """A key that signs upstream's ``rsync-VERSION.tar.gz.asc`` for a range of releases."""

    fingerprint: str  # the primary key's fingerprint, 40 hex digits
    name: str
    first: str  # first release signed with this key
    before: str | None = None  # first release no longer signed with it; None: still current

    def signs(self, version: str) -> bool:
        key = version_key(version)
        return key >= version_key(self.first) and (
            self.before is None or key < version_key(self.before)
        )


# Who signs upstream's detached ``rsync-VERSION.tar.gz.asc`` (beside each tarball on
# download.samba.org), by primary-key fingerprint (docs/build-rsync.md): releases up to
# 3.2.x are signed with Wayne Davison's DSA key, 3.4.0 and later with Andrew Tridgell's RSA
# key. Wayne's range starts at 2.6.9, the oldest release pullback knows; 3.3.x is not
# pinned (who signed it is not established), so its signature is "not checked". The
# SHA-256 pin above stays the primary check.
SIGNERS: tuple[Signer, ...] = (
    Signer("0048C8B026D4C96F0E589C2F6C859FB14B96A8C5", "Wayne Davison", "2.6.9", "3.3.0"),
    Signer("9FEF112DCE19A0DC7E882CB81BB24997A8535F6F", "Andrew Tridgell", "3.4.0"),
)

MAX_ASC_BYTES = 1 << 20  # a detached signature is well under 1 KiB
GPG_TIMEOUT = 60.0
_GPG_STATUS_RE = re.compile(r"^\[GNUPG:\] ([A-Z_]+)(?: (.*))?$")


class SignatureError(FetchError):
    """A BAD signature (tarball refused), or none checked when one is required."""


@dataclass(frozen=True)
class SignatureCheck:
    """``status`` is "good", "not checked" or "bad"; ``line`` is what the user sees."""

    status: str
    detail: str

    @property
    def line(self) -> str:
        return f"signature: {self.status} ({self.detail})"


def signers_for(version: str, signers: Sequence[Signer] = SIGNERS) -> list[Signer]:
    """The pinned keys allowed to sign ``version``'s tarball (empty: none pinned)."""
    return [s for s in signers if s.signs(version)]


def parse_gpg_status(text: str) -> list[tuple[str, list[str]]]:
    """``[(keyword, args), ...]`` from gpg's ``--status-fd`` lines; other lines ignored."""
    records: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = _GPG_STATUS_RE.match(line.rstrip("\r"))
        if m:
            records.append((m[1], m[2].split(" ") if m[2] else []))
    return records


def keyring_fingerprints(colons: str) -> set[str]:
    """Primary-key fingerprints in ``gpg --with-colons --list-keys`` output."""
    found: set[str] = set()
    primary = False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            primary = fields[0] == "pub"
        elif fields[0] == "fpr" and primary and len(fields) > 9:
            found.add(fields[9].upper())
            primary = False
    return found


def judge_gpg_status(status: str, returncode: int, allowed: Sequence[Signer]) -> SignatureCheck:
    """Verdict on one ``gpg --status-fd 1 --verify SIG FILE`` run.

    Good only when gpg exits 0, no signature in the file failed, and a VALIDSIG names one of
    ``allowed`` as its primary key. Call it only with a keyring that holds an allowed key:
    then a signature by a key missing from it (NO_PUBKEY) is someone else's, and refused.
    """
    pinned = " or ".join(f"{s.name} {s.fingerprint}" for s in allowed) or "nobody"
    by_fpr = {s.fingerprint.upper(): s for s in allowed}
    records = parse_gpg_status(status)
    if not records:
        return SignatureCheck("not checked", f"gpg failed, exit {returncode}, no status output")
    valid: list[str] = []
    for keyword, args in records:
        first = args[0] if args else "?"
        if keyword == "BADSIG":
            return SignatureCheck("bad", f"BAD signature by key {first}: the tarball and its "
                                         ".asc do not match")
        if keyword == "REVKEYSIG":
            return SignatureCheck("bad", f"made by key {first}, which is revoked")
        if keyword == "NODATA":
            return SignatureCheck("bad", "the .asc holds no readable OpenPGP signature")
        if keyword == "ERRSIG":
            # ERRSIG <keyid> <pkalgo> <hashalgo> <class> <time> <rc> [<issuer fingerprint>]
            rc = args[5] if len(args) > 5 else "?"
            issuer = args[6] if len(args) > 6 and args[6] != "-" else first
            if rc == "9":
                return SignatureCheck("bad", f"made by key {issuer}, which is not in the "
                                             f"keyring; rsync is signed by {pinned}")
            return SignatureCheck("not checked", f"gpg cannot check the signature by {issuer} "
                                                 f"(ERRSIG rc {rc})")
        if keyword == "VALIDSIG":
            # VALIDSIG <signing key fpr> ... 9 fields ... [<primary key fpr>]
            valid.append((args[9] if len(args) > 9 else first).upper())
    if returncode != 0:
        return SignatureCheck("bad", f"gpg --verify exited {returncode}")
    for fpr in valid:
        if fpr in by_fpr:
            return SignatureCheck("good", f"{by_fpr[fpr].name}, {fpr}")
    if valid:
        return SignatureCheck("bad", f"a good signature, but by key {valid[0]}, not {pinned}")
    return SignatureCheck("bad", "gpg reported no valid signature")


def _gpg(gpg: str, home: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run gpg with ``GNUPGHOME=home`` (never the user's ~/.gnupg), no agent, no tty."""
    env = {**os.environ, "GNUPGHOME": home, "LC_ALL": "C"}
    return subprocess.run(
        [gpg, "--batch", "--no-tty", "--no-autostart", *args],
        capture_output=True, text=True, env=env, timeout=GPG_TIMEOUT, check=False,
    )


def _fetch_asc(url: str, dest: Path) -> str | None:
    """Download ``url`` into ``dest`` (via a temp file); return None or why it failed."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310 - scheme checked by caller
                data = resp.read(MAX_ASC_BYTES + 1)
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:
            return str(e.reason)
        except (OSError, HTTPException, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        tmp.write_bytes(data[:MAX_ASC_BYTES])  # oversized: gpg finds no signature, refused
        tmp.chmod(0o644)
        os.replace(tmp, dest)
        return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_signature(
    tarball: Path,
    version: str,
    asc_urls: Sequence[str],
    keyring: str | Path | None,
    *,
    signers: Sequence[Signer] = SIGNERS,
) -> SignatureCheck:
    """Check upstream's detached signature of an already SHA-256-verified ``tarball``.

    Nothing is downloaded unless the check can run: gpg on PATH, a ``keyring`` file, a pinned
    signer for ``version`` among ``signers`` and that signer's key in the keyring. The
    signature is ``tarball.asc`` when cached, else the first of ``asc_urls`` that serves one
    (saved as ``tarball.asc``). gpg runs in a temporary GNUPGHOME on a copy of the keyring
    (dearmored if it is an armored export). Never raises for a bad signature: the caller
    decides (``fetch_tarball`` refuses it).
    """
    gpg = shutil.which("gpg")
    if gpg is None:
        return SignatureCheck("not checked", "no gpg on PATH")
    if keyring is None:
        return SignatureCheck("not checked", "no keyring: set rsync.gpg_keyring")
    allowed = signers_for(version, signers)
    if not allowed:
        return SignatureCheck("not checked", f"no pinned signer for rsync {version}")
    keyring = Path(keyring)
    if not keyring.is_file():
        raise FetchError(f"rsync.gpg_keyring {keyring}: no such file")
    asc = tarball.with_name(tarball.name + ".asc")
    with tempfile.TemporaryDirectory(prefix="pullback-gpg.") as home:
        ring = os.path.join(home, "signers.gpg")
        if keyring.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
            res = _gpg(gpg, home, ["--dearmor", "--output", ring, str(keyring)])
            if res.returncode != 0:
                raise FetchError(f"rsync.gpg_keyring {keyring}: gpg --dearmor failed: "
                                 f"{res.stderr.strip()}")
        else:
            shutil.copyfile(keyring, ring)
        keys = ["--no-default-keyring", "--keyring", ring]
        res = _gpg(gpg, home, [*keys, "--with-colons", "--list-keys"])
        held = keyring_fingerprints(res.stdout)
        if not any(s.fingerprint.upper() in held for s in allowed):
            names = " or ".join(f"{s.name} {s.fingerprint}" for s in allowed)
            return SignatureCheck("not checked", f"keyring {keyring} has no key of {names}")
        if not asc.is_file():
            failures: list[str] = []
            for url in asc_urls:
                why = _fetch_asc(url, asc)
                if why is None:
                    break
                failures.append(f"{url} ({why})")
            else:
                what = "; ".join(failures) or "no URL"
                return SignatureCheck("not checked", f"no .asc at {what}")
        res = _gpg(gpg, home, [*keys, "--status-fd", "1", "--verify", str(asc), str(tarball)])
        return judge_gpg_status(res.stdout, res.returncode, allowed)


def _signature_step(
    target: Path,
    version: str,
    asc_urls: Sequence[str],
    keyring: str | Path | None,
    *,
    require: bool,
    signers: Sequence[Signer],
    log: Log,
) -> None:
    """Log the one signature line; refuse a bad one (cached files removed) or a missing one
    when ``require``."""
    check = check_signature(target, version, asc_urls, keyring, signers=signers)
    log(f"{target.name}: {check.line}")
    if check.status == "bad":
        asc = target.with_name(target.name + ".asc")
        for path in (target, asc):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise SignatureError(
            f"{target.name}: REFUSED, bad signature: {check.detail}. The sha256 matched, so "
            f"the .asc or the keyring is wrong; removed {target} and its .asc from the cache"
        )
    if check.status != "good" and require:
        raise SignatureError(
            f"{target.name}: signature not checked ({check.detail}) and --require-signature "
            "asks for a good one"
        )


def fetch_tarball(
    version: str,
    urls: Sequence[str],
    sha256: str,
    cache_dir: Path,
    *,
    log: Log = print,
    keyring: str | Path | None = None,
    require_signature: bool = False,
    signers: Sequence[Signer] = SIGNERS,
) -> Path:
    """Return ``cache_dir/rsync-<version>.tar.gz``, verified against ``sha256``.

    ``urls`` are templates (``{version}`` is replaced) tried in order. A cached copy is
    re-verified and reused without any download. A download lands in a temporary file in
    ``cache_dir``; only a file with the right SHA-256 is renamed into place, so a bad
    download never reaches extraction. Raises ``FetchError`` listing each URL's failure.

    Then the signature (``check_signature``, one "signature: ..." line): ``<url>.asc`` of
    the URL that served the tarball (for a cached tarball: the cached .asc, else each URL's
    in order), checked against ``signers`` with ``keyring``. A bad one raises
    ``SignatureError`` and removes the cached tarball; "not checked" is an error only with
    ``require_signature``.
    """
    validate_version(version)
    sha256 = sha256.strip().lower()
    if not _SHA256_RE.match(sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"rsync-{version}.tar.gz"
    target = cache_dir / name

    if target.exists():
        found = sha256_file(target)
        if found == sha256:
            log(f"{name}: cached copy {target} verified (sha256 {sha256[:12]}...)")
            asc_urls = [t.replace("{version}", version) + ".asc" for t in urls]
            asc_urls = [u for u in asc_urls
                        if urllib.parse.urlsplit(u).scheme in ("http", "https", "file")]
            _signature_step(target, version, asc_urls, keyring,
                            require=require_signature, signers=signers, log=log)
            return target
        log(f"{name}: cached copy has sha256 {found}, expected {sha256}; discarding it")
        target.unlink()

    failures: list[str] = []
    for template in urls:
        url = template.replace("{version}", version)
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https", "file"):
            failures.append(f"{url}: unsupported URL scheme {scheme!r}")
            continue
        log(f"{name}: fetching {url}")
        fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                found = _download(url, tmp, log)
            except urllib.error.HTTPError as e:
                failures.append(f"{url}: HTTP {e.code} {e.reason}")
                continue
            except urllib.error.URLError as e:
                failures.append(f"{url}: {e.reason}")
                continue
            except (OSError, HTTPException, ValueError) as e:
                failures.append(f"{url}: {type(e).__name__}: {e}")
                continue
            if found != sha256:
                msg = f"{url}: sha256 mismatch: expected {sha256}, found {found}"
                log(f"{name}: REFUSED, {msg.split(': ', 1)[1]}")
                failures.append(msg)
                continue
            tmp.chmod(0o644)
            os.replace(tmp, target)
            log(f"{name}: sha256 verified, saved to {target}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with contextlib.suppress(FileNotFoundError):  # a stale .asc from an earlier source
            target.with_name(name + ".asc").unlink()
        _signature_step(target, version, [url + ".asc"], keyring,
                        require=require_signature, signers=signers, log=log)
        return target

    lines = "\n".join(f"  {f}" for f in failures) or "  (no URLs given)"
    raise FetchError(f"could not get a verified {name} (sha256 {sha256}):\n{lines}")


# --------------------------------------------------------------------------- either end


@dataclass(frozen=True)
class BuildResult:
    version_line: str
    protocol: int
    skipped: bool
    log_path: str
    version: str = ""

    @property
    def state(self) -> State:
        """OK: the build was already there; BUILT: built and installed now."""
        return State.OK if self.skipped else State.BUILT


def _sh(script: str) -> str:
    return shlex.join(["sh", "-c", script])


class LocalShell:
    """This machine's end of a build, with a ``Session``'s ``run``: root work is
    ``sudo -n`` (never a prompt answered with nothing; a sudo that wants a password fails
    with the same advice as on a host)."""

    def __init__(self, context: invoke.Context | None = None) -> None:
        self.context = context or invoke.Context()

    def run(self, command: str | list[str], *, sudo: bool = False, warn: bool = True) -> Any:
        if isinstance(command, list):
            command = shlex.join(command)
        if sudo:
            command = sudo_command(command, None)
        result = self.context.run(command, hide=True, warn=True, in_stream=False)
        if sudo and result.exited != 0 and "a password is required" in result.stderr:
            raise needs_password_error("local: sudo")
        if result.exited != 0 and not warn:
            raise invoke.UnexpectedExit(result)
        return result


def _run(c: Session | LocalShell, script: str, *, sudo: bool = False) -> Any:
    """Run ``script`` through ``sh -c`` (so sudo covers pipes and redirections); root work
    on a host goes through its session, which knows the host's stored sudo password."""
    return c.run(_sh(script), sudo=sudo)


@dataclass(frozen=True)
class BuildPlan:
    """What build-rsync will do on one end: nothing (the stamp and ``--version`` match) or
    a build, and what is there now."""

    version: str
    prefix: str
    up_to_date: bool
    installed: str  # ``PREFIX/bin/rsync --version`` line 1, "" when there is none

    def describe(self) -> str:
        if self.up_to_date:
            return f"{State.OK:8}{self.installed}"
        now = self.installed or f"no rsync in {self.prefix}"
        return f"would build rsync {self.version} into {self.prefix} (now: {now})"


def plan_build(version: str, sha256: str, flags: BuildFlags, prefix: str, stamp: str,
               version_out: str) -> BuildPlan:
    """Pure: from the stamp and the ``--version`` output found under ``prefix``."""
    first = version_out.strip().splitlines()[0].strip() if version_out.strip() else ""
    try:
        found, _ = parse_version_output(version_out)
    except ValueError:
        found = ""
    same = stamp == stamp_text(version, sha256, flags) and found == version
    return BuildPlan(version=version, prefix=prefix, up_to_date=same, installed=first)


def read_install(c: Session | LocalShell, prefix: str) -> tuple[str, str]:
    """One command: ``(stamp text, --version line 1)`` of the build under ``prefix``."""
    script = render("scripts/rsync_read_install.sh.j2", stamp=stamp_path(prefix), mark=_MARK,
                    binary=f"{prefix.rstrip('/')}/bin/rsync")
    r = _run(c, script)
    stamp, _, version_out = r.stdout.partition(f"\n{_MARK}\n")
    return stamp, version_out


def installed_rsync(
    c: Session | LocalShell, prefix: str, version: str, sha256: str, flags: BuildFlags
) -> BuildResult | None:
    """One command: is ``prefix`` already holding exactly this build? (stamp + --version)

    Callers can use it before uploading a tarball to skip the upload on a re-run.
    """
    plan = plan_build(version, sha256, flags, prefix, *read_install(c, prefix))
    if not plan.up_to_date:
        return None
    _, protocol = parse_version_output(plan.installed)
    return BuildResult(
        version_line=plan.installed,
        protocol=protocol,
        skipped=True,
        log_path="",
        version=version,
    )


def _install_script(stage_prefix: str, prefix: str, stamp_file: str) -> str:
    """Copy the staged tree over ``prefix`` file by file (temp + rename), stamp last."""
    stamp = stamp_path(prefix)
    return render("scripts/rsync_install.sh.j2", stamp=stamp, stamp_dir=os.path.dirname(stamp),
                  stage_prefix=stage_prefix, prefix=prefix.rstrip("/") or "/",
                  stamp_file=stamp_file)


def validate_build_path(path: str, what: str) -> str:
    """An absolute path that make can use unquoted (rsync's Makefile does not quote).

    Our own commands quote everything, but ``--prefix`` and ``DESTDIR`` end up in Makefile
    recipes as bare words: a space or ``$()`` there would split or run in make's shell.
    """
    if not _SAFE_PATH_RE.match(path):
        raise ValueError(
            f"{what} {path!r} must be an absolute path of letters, digits and . _ + - / only "
            "(the rsync Makefile uses it unquoted)"
        )
    return path.rstrip("/") or "/"


def build_rsync(
    c: Session | LocalShell,
    tarball_remote_path: str,
    version: str,
    sha256: str,
    prefix: str,
    *,
    sudo: bool,
    jobs: int | None = None,
    check: bool = False,
    log_dir: str | None = None,
    extra_configure_args: Sequence[str] = (),
    build_root: str | None = None,
    log: Log = print,
) -> BuildResult:
    """Build ``version`` from the tarball at ``tarball_remote_path`` on ``c``'s end.

    Skips everything when the stamp under ``prefix`` and ``prefix/bin/rsync --version``
    already match. Otherwise: re-verify the tarball's sha256 on that end, extract into a
    fresh ``mktemp -d`` dir, configure, make, optional ``make check``, ``make install`` into
    a staging dir, check the staged binary, then copy it over ``prefix`` (``sudo`` only for
    that copy) and write the stamp. Build output goes to a log on that end
    (``<log_dir>/rsync-<version>-build.log``, or ``<builddir>/build.log``); one line per
    phase is printed. On failure, ``BuildError`` carries the log tail and ``prefix`` is
    left as it was. ``extra_configure_args`` are recorded in the stamp; ``build_root``
    replaces ``$TMPDIR``/``/tmp`` as the parent of the build dir.
    """
    validate_version(version)
    prefix = validate_build_path(prefix, "prefix")
    if build_root is not None:
        build_root = validate_build_path(build_root, "build_root")
    flags = build_flags(version, extra_configure_args)
    stamp = stamp_text(version, sha256, flags)

    done = installed_rsync(c, prefix, version, sha256, flags)
    if done is not None:
        log(f"rsync {version} already installed in {prefix} (stamp matches): {done.version_line}")
        return done

    r = _run(c, render("scripts/rsync_verify.sh.j2", tarball=tarball_remote_path))
    kv = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    found = kv.get("sum", "")
    if found != sha256:
        raise BuildError(
            f"{tarball_remote_path}: sha256 mismatch: expected {sha256}, found "
            f"{found or '<no such file or no sha256sum/shasum>'}; refusing to extract",
            phase="verify",
        )
    ncpu = int(kv["ncpu"]) if kv.get("ncpu", "").isdigit() else 2
    # build_root: for hosts whose /tmp is noexec (configure runs the programs it compiles).
    r = _run(c, render("scripts/rsync_builddir.sh.j2",
                       build_root=build_root.rstrip("/") if build_root else ""))
    builddir = r.stdout.strip()
    if r.exited != 0 or not builddir.startswith("/"):
        raise BuildError(f"mktemp -d failed: {r.stderr.strip()}", phase="prepare")
    if not _SAFE_PATH_RE.match(builddir):
        _run(c, shlex.join(["rmdir", builddir]))
        raise BuildError(
            f"build dir {builddir!r} (from $TMPDIR) has characters make cannot handle; "
            "pass build_root",
            phase="prepare",
        )
    src = f"{builddir}/src"
    stage = f"{builddir}/stage"
    stage_prefix = f"{stage}{prefix}" if prefix != "/" else stage
    log_path = (
        f"{log_dir.rstrip('/')}/rsync-{version}-build.log" if log_dir else f"{builddir}/build.log"
    )
    n_jobs = jobs if jobs and jobs > 0 else ncpu
    log(f"building rsync {version} in {builddir} (log: {log_path})")

    def cleanup() -> None:
        # The sources and staging tree go; the log stays (in log_dir, or alone in builddir).
        doomed = [builddir] if log_dir else [src, stage, f"{builddir}/rsync.stamp"]
        _run(c, shlex.join(["rm", "-rf", *doomed]))

    def fail(phase_name: str, message: str) -> BuildError:
        tail = _run(c, render("scripts/rsync_log_tail.sh.j2", lines=LOG_TAIL_LINES,
                              log=log_path)).stdout.rstrip()
        cleanup()
        return BuildError(
            f"rsync {version}: {message}; the install in {prefix} was not touched. "
            f"Last lines of {log_path}:\n{tail}",
            phase=phase_name,
            log_tail=tail,
            log_path=log_path,
        )

    def phase(name: str, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        words = (["env", *(f"{k}={v}" for k, v in env.items())] if env else []) + argv
        started = time.monotonic()
        res = _run(c, render("scripts/rsync_phase.sh.j2", src=src, argv=words, log=log_path))
        elapsed = time.monotonic() - started
        if res.exited != 0:
            raise fail(name, f"{name} failed (exit {res.exited}) after {elapsed:.1f} s")
        log(f"{name}: ok in {elapsed:.1f} s")

    res = _run(c, render("scripts/rsync_extract.sh.j2", log_dir=os.path.dirname(log_path),
                         log=log_path, src=src, tarball=tarball_remote_path, stamp=stamp,
                         stamp_file=builddir + "/rsync.stamp"))
    if res.exited != 0:
        raise fail("extract", f"extracting {tarball_remote_path} failed ({res.stderr.strip()})")

    phase("configure", ["./configure", f"--prefix={prefix}", *flags.configure_args], env=flags.env)
    phase("make", ["make", f"-j{n_jobs}"])
    if check:
        phase("make check", ["make", "check"])
    phase("make install (staging)", ["make", "install", f"DESTDIR={stage}"])

    # Never replace a working install with a binary that does not even start.
    staged_bin = f"{stage_prefix}/bin/rsync"
    res = _run(c, render("scripts/rsync_version.sh.j2", binary=staged_bin, first_line=False))
    try:
        staged_version, _ = parse_version_output(res.stdout)
    except ValueError:
        staged_version = ""
    if staged_version != version:
        first = (res.stdout or res.stderr).strip().splitlines()[:1]
        raise fail(
            "verify build",
            f"the staged {staged_bin} does not report version {version} "
            f"({first[0] if first else ''!r})",
        )
    missing = missing_capabilities(res.stdout) if version_key(version) >= (3, 0, 0) else []
    if missing:
        raise fail(
            "verify build",
            f"the build has {', '.join('no ' + m for m in missing)}: the default options "
            "(-A, -X) would fail every backup; install the ACL headers (Debian: "
            "libacl1-dev, RHEL: libacl-devel) and build again",
        )

    started = time.monotonic()
    res = _run(c, _install_script(stage_prefix, prefix, builddir + "/rsync.stamp"), sudo=sudo)
    if res.exited != 0:
        cleanup()
        raise BuildError(
            f"rsync {version}: copying the build into {prefix} failed (exit {res.exited}): "
            f"{(res.stderr or res.stdout).strip()}; the stamp was removed so the next run "
            "rebuilds",
            phase="install",
            log_path=log_path,
        )
    log(f"install: ok in {time.monotonic() - started:.1f} s ({prefix}/bin/rsync)")
    cleanup()

    res = _run(c, render("scripts/rsync_version.sh.j2", binary=prefix + "/bin/rsync",
                         first_line=True))
    installed_version, protocol = parse_version_output(res.stdout)
    if installed_version != version:
        raise BuildError(
            f"{prefix}/bin/rsync reports {installed_version} after installing {version}",
            phase="install",
            log_path=log_path,
        )
    return BuildResult(
        version_line=res.stdout.strip(),
        protocol=protocol,
        skipped=False,
        log_path=log_path,
        version=installed_version,
    )


def local_install_needs_sudo(prefix: Path) -> bool:
    """True when this (non-root) process cannot write ``prefix`` or its nearest parent."""
    if os.geteuid() == 0:
        return False
    p = Path(prefix)
    while not p.exists():
        p = p.parent
    return not os.access(p, os.W_OK | os.X_OK)


# --------------------------------------------------------------------------- toolchain


# The only per-OS difference in a build is how to get a C compiler, make and libc headers:
# the package managers and their packages live in the per-OS table (roles/core/platforms.py).
PackageManager = platforms.PackageManager
PACKAGE_MANAGERS: tuple[PackageManager, ...] = platforms.PACKAGE_MANAGERS
MACOS_HINT = next(p.toolchain_hint for p in platforms.PLATFORMS if p.name == "macos")


@dataclass(frozen=True)
class Toolchain:
    cc: str
    make: str
    installed_with: str | None = None  # the package manager used, if any


@dataclass(frozen=True)
class ToolchainFacts:
    cc: str
    make: str
    compiles: bool
    package_manager: str
    os_name: str  # `uname -s`
    os_id: str = ""  # /etc/os-release ID, when there is one
    acl: bool = True  # <sys/acl.h> compiles (Linux: libacl's headers, for rsync -A)

    @property
    def platform(self) -> platforms.Platform | None:
        return platforms.lookup(self.os_id, kernel=self.os_name)

    @property
    def ok(self) -> bool:
        return bool(self.cc and self.make and self.compiles and self.acl)


def toolchain_probe() -> str:
    return render("scripts/toolchain_probe.sh.j2",
                  package_managers=[pm.name for pm in PACKAGE_MANAGERS])


def gather_toolchain(c: Session | LocalShell) -> ToolchainFacts:
    """One command: compiler, make, whether a hello-world links, package manager, OS."""
    r = _run(c, toolchain_probe())
    kv = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return ToolchainFacts(
        cc=kv.get("cc", ""),
        make=kv.get("make", ""),
        compiles=kv.get("compiles") == "yes",
        package_manager=kv.get("pm", ""),
        os_name=kv.get("os", ""),
        os_id=kv.get("id", ""),
        acl=kv.get("acl", "no") == "yes",
    )


def install_commands(pm_name: str, *, sudo: bool) -> list[str]:
    """Human-runnable commands that install the toolchain with ``pm_name``."""
    pm = next(p for p in PACKAGE_MANAGERS if p.name == pm_name)
    return [("sudo " if sudo else "") + shlex.join(cmd) for cmd in pm.commands]


def ensure_toolchain(c: Session | LocalShell, *, install: bool, sudo: bool,
                     log: Log = print) -> Toolchain:
    """Make sure ``c``'s end can compile C and run make; install packages if allowed."""
    facts = gather_toolchain(c)
    if facts.ok:
        return Toolchain(cc=facts.cc, make=facts.make)
    missing = ", ".join(
        what
        for what, gone in (
            ("a C compiler", not facts.cc),
            (
                "working C headers/libc (a test program did not build)",
                bool(facts.cc) and not facts.compiles,
            ),
            ("make", not facts.make),
            ("the ACL headers (libacl, for rsync -A)", not facts.acl),
        )
        if gone
    )
    platform = facts.platform
    if platform is not None and platform.package_manager is None and platform.toolchain_hint:
        raise ToolchainError(f"missing {missing}; {platform.toolchain_hint}")
    if not facts.package_manager:
        raise ToolchainError(
            f"missing {missing} and no known package manager "
            f"({', '.join(p.name for p in PACKAGE_MANAGERS)}); install gcc and make yourself"
        )
    commands = install_commands(facts.package_manager, sudo=sudo)
    if not install:
        raise ToolchainError(f"missing {missing}; to install it run: {' && '.join(commands)}")
    pm = next(p for p in PACKAGE_MANAGERS if p.name == facts.package_manager)
    log(f"missing {missing}: installing with {pm.name}")
    for cmd in pm.commands:
        r = _run(c, shlex.join(cmd), sudo=sudo)
        if r.exited != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
            raise ToolchainError(f"{shlex.join(cmd)} failed (exit {r.exited}):\n{tail}")
    facts = gather_toolchain(c)
    if not facts.ok:
        raise ToolchainError(
            f"installed packages with {pm.name} but still no working compiler/make: {facts}"
        )
    return Toolchain(cc=facts.cc, make=facts.make, installed_with=pm.name)


# --------------------------------------------------------------------------- both ends


@dataclass
class EndResult:
    """One end's outcome: the local machine (``end == "local"``) or a host."""

    end: str
    result: BuildResult | None = None
    error: str | None = None
    plan: BuildPlan | None = None  # --dry-run: what a real run would do on this end


def finish_key_line(conn: Session, host: Any, log: Log) -> None:
    """Point the backup key's daemon forced command at the build now in ``rsync.prefix``.

    Whichever order setup-remote and build-rsync run in, the end state is the same: run
    first, setup-remote could only name the host's own rsync. Nothing happens without a
    backup key or a key line (setup-remote writes it later, with the build), or in captured
    mode (the gate runs the rsync it was captured with: ``invoke capture-command`` again).
    """
    if host.forced_command != Mode.DAEMON:
        return  # no round trip: the gate keeps the rsync it was captured with
    try:
        public_key = read_public_key(host)
    except KeyFileError:
        return
    facts = gather(conn, [host.rsync.remote_binary])
    plan = plan_forced_rsync(facts, host, public_key)
    if plan is None:
        return
    outcome = apply(conn, plan)
    if outcome.error:
        raise BuildError(f"rsync is installed in {host.rsync.prefix}, but pointing the "
                         f"forced command at it failed: {outcome.error}",
                         phase="forced command")
    log(f"forced command: now runs {host.rsync.remote_binary}")


def _remote_end(host: Any, tarball: Path, version: str, sha256: str, *, check: bool,
                install_packages: bool, log: Log, sessions: Run) -> BuildResult:
    with sessions.open(host) as conn:
        result = _build_remote(conn, host, tarball, version, sha256, check=check,
                               install_packages=install_packages, log=log)
        finish_key_line(conn, host, log)
        return result


def _build_remote(conn: Session, host: Any, tarball: Path, version: str, sha256: str, *,
                  check: bool, install_packages: bool, log: Log) -> BuildResult:
    flags = build_flags(version)
    done = installed_rsync(conn, host.rsync.prefix, version, sha256, flags)
    if done is not None:
        log(f"rsync {version} already installed in {host.rsync.prefix}: {done.version_line}")
        return done
    ensure_toolchain(conn, install=install_packages, sudo=True, log=log)
    # SFTP writes as the login user; only the final install runs through sudo.
    res = _run(conn, "mktemp /tmp/pullback-rsync-src.XXXXXXXX")
    remote_tar = res.stdout.strip()
    if res.exited != 0 or not remote_tar.startswith("/tmp/pullback-rsync-src."):
        raise BuildError(f"mktemp failed on the host: {res.stderr.strip()}", phase="upload")
    try:
        started = time.monotonic()
        conn.upload(tarball, remote_tar)
        log(f"upload: {tarball.stat().st_size // 1024} KiB in "
            f"{time.monotonic() - started:.1f} s")
        return build_rsync(conn, remote_tar, version, sha256, host.rsync.prefix,
                           sudo=True, check=check, log=log)
    finally:
        _run(conn, shlex.join(["rm", "-f", remote_tar]))


def _local_end(prefix: str, tarball: Path, version: str, sha256: str, *, check: bool,
               install_packages: bool, log: Log) -> BuildResult:
    c = LocalShell()
    sudo = local_install_needs_sudo(Path(prefix))
    flags = build_flags(version)
    done = installed_rsync(c, prefix, version, sha256, flags)
    if done is not None:
        log(f"rsync {version} already installed in {prefix}: {done.version_line}")
        return done
    ensure_toolchain(c, install=install_packages, sudo=sudo, log=log)
    return build_rsync(c, str(tarball), version, sha256, prefix, sudo=sudo, check=check,
                       log=log)


def _run_ends(jobs: list[tuple[str, Any]], field: str) -> list[EndResult]:
    """Run each end's work at the same time; its return value goes to ``EndResult.field``."""

    def run(job: tuple[str, Any]) -> EndResult:
        name, work = job
        try:
            return EndResult(name, **{field: work()})
        except Exception as exc:  # noqa: BLE001 - one end failing never stops the others
            return EndResult(name, error=f"{type(exc).__name__}: {exc}")

    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        return list(pool.map(run, jobs))


def _plan_everywhere(hosts: list[Any], *, version: str | None, local: bool, remote: bool,
                     pins: Mapping[str, str], sessions: Run) -> list[EndResult]:
    """build-rsync --dry-run: every end's plan, read concurrently."""
    jobs: list[tuple[str, Any]] = []
    seen_local: set[str] = set()
    results: list[EndResult] = []
    for host in hosts:
        wanted = version or host.rsync.version
        try:
            sha = expected_sha256(
                wanted, host.rsync.sha256 if wanted == host.rsync.version else None, pins)
        except ValueError as exc:
            results.append(EndResult(host.name, error=str(exc)))
            continue
        flags = build_flags(wanted)
        if remote:
            def remote_plan(h: Any = host, v: str = wanted, s: str = sha,
                            f: BuildFlags = flags) -> BuildPlan:
                with sessions.open(h) as conn:
                    return plan_build(v, s, f, h.rsync.prefix,
                                      *read_install(conn, h.rsync.prefix))
            jobs.append((host.name, remote_plan))
        prefix = host.rsync.local_prefix
        if local and prefix not in seen_local:
            seen_local.add(prefix)
            jobs.append((f"local:{prefix}:{wanted}",
                         lambda v=wanted, s=sha, p=prefix, f=flags: plan_build(
                             v, s, f, p, *read_install(LocalShell(), p))))

    results.extend(_run_ends(jobs, "plan"))
    return results


def build_everywhere(hosts: list[Any], *, version: str | None = None, local: bool = True,
                     remote: bool = True, check: bool = False, install_packages: bool = True,
                     cache_dir: Path, require_signature: bool = False,
                     log: Log = print, dry_run: bool = False,
                     pins: Mapping[str, str] = KNOWN_SHA256,
                     sessions: Run | None = None) -> list[EndResult]:
    """Fetch + verify once, then build on the local end and every host at the same time.

    Every end must end up reporting the same version; a mismatch is an error on that end.
    ``pins`` is a seam for tests only: no task and no inventory field reaches it, so the
    official sums stay the only ones a user's build accepts. The tests build the card's
    2.6.9 from a source tree made from upstream's git tag (the release tarball cannot be
    fetched offline); that tree is not byte-identical to the release, so they pass its
    own sum here rather than relax the pin.

    ``dry_run``: fetch nothing, build nothing; read each end's stamp and ``--version`` (one
    command per end) and say what a real run would do (``EndResult.plan``).
    """
    sessions = sessions or Run()
    if dry_run:
        return _plan_everywhere(hosts, version=version, local=local, remote=remote, pins=pins,
                                sessions=sessions)
    jobs: list[tuple[str, Any]] = []
    tarballs: dict[str, tuple[Path, str]] = {}
    results: list[EndResult] = []
    local_versions: dict[str, str] = {}  # local prefix -> the one version built into it
    for host in hosts:
        wanted = version or host.rsync.version
        refused = client_build_refusals([host], version) if local else []
        if refused:  # never build a client that backup would refuse to run
            results.append(EndResult(f"local:{host.rsync.local_prefix}:{wanted}",
                                     error=refused[0]))
            continue
        try:
            validate_version(wanted)
            # rsync.sha256 pins the inventory's rsync.version, also when --version names it.
            sha = expected_sha256(
                wanted, host.rsync.sha256 if wanted == host.rsync.version else None, pins
            )
            if wanted in tarballs and tarballs[wanted][1] != sha:
                raise ValueError(
                    f"rsync.sha256 of {host.name} ({sha}) differs from the one already used "
                    f"for rsync {wanted} in this run ({tarballs[wanted][1]}); fix the inventory"
                )
            if wanted not in tarballs:
                warning = security_warning(wanted)
                if warning:
                    log(f"warning: {warning}")
                path = fetch_tarball(wanted, host.rsync.urls, sha, cache_dir, log=log,
                                     keyring=host.rsync.gpg_keyring,
                                     require_signature=require_signature)
                tarballs[wanted] = (path, sha)
        except (ValueError, FetchError) as exc:
            results.append(EndResult(host.name, error=str(exc)))
            continue
        path, sha = tarballs[wanted]
        if remote:
            jobs.append((host.name, lambda h=host, p=path, s=sha, v=wanted: _remote_end(
                h, p, v, s, check=check, install_packages=install_packages,
                log=lambda m, n=h.name: log(f"{n}: {m}"), sessions=sessions)))
        local_prefix = host.rsync.local_prefix
        local_key = f"local:{local_prefix}:{wanted}"
        if local and local_prefix not in local_versions:
            local_versions[local_prefix] = wanted
            jobs.append((local_key, lambda h=host, p=path, s=sha, v=wanted: _local_end(
                h.rsync.local_prefix, p, v, s, check=check, install_packages=install_packages,
                log=lambda m: log(f"local: {m}"))))
        elif local and local_versions[local_prefix] != wanted:
            # Two builds must never install into one prefix at the same time.
            results.append(EndResult(local_key, error=(
                f"{host.name} wants rsync {wanted} but {local_prefix} is already getting "
                f"{local_versions[local_prefix]} in this run; give the hosts one version")))

    results.extend(_run_ends(jobs, "result"))
    versions = {r.result.version for r in results if r.result}
    if len(versions) > 1:
        for r in results:
            if r.result:
                r.error = r.error or f"ends disagree on the rsync version: {sorted(versions)}"
    return results
