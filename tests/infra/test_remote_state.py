"""The hardened state setup-remote leaves on a host, checked over SSH with testinfra: the
wanted values come from ``roles.core.hardened``, the definition setup plans from.

Run by `invoke verify` (see roles/features/verify.py); each check's docstring is its name in the
report. The expected values come from the inventory given with ``--pullback-inventory``:
the host's mode (daemon or captured), rsyncd module, rsync prefix and version, backup key
and ``from``. Root work goes through ``host.sudo()``; the admin login itself tells which
address the server sees (the effective sshd settings depend on it).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from roles.config import gate as gate_scripts
from roles.config import rootkey, rsyncd
from roles.core import hardened
from roles.core.hardened import Mode
from roles.core.rsync import parse_version_output
from roles.core.spec import HostSpec
from roles.core.sshd_output import parse_sshd_T
from roles.features import capture
from roles.inventory.schema import load
from roles.local import capture_record
from roles.remote.facts import AUTHORIZED_KEYS, PULLBACK_DIR, PULLBACK_RSYNCD_CONF, RSYNCD_CONF


@pytest.fixture(scope="module", autouse=True)
def login(host) -> None:
    """Every check needs the admin login: one clear error instead of a traceback each."""
    try:
        host.run("true")
    except RuntimeError as exc:  # testinfra's ssh backend: ssh itself failed (exit 255)
        result = exc.args[0] if exc.args else None
        stderr = getattr(result, "stderr", "") or str(exc)
        pytest.fail(f"cannot log in as the admin: {' '.join(stderr.split())}", pytrace=False)


@pytest.fixture(scope="module")
def expected(host, request) -> HostSpec:
    inventory = load(request.config.getoption("--pullback-inventory"))
    return inventory.hosts[host.backend.get_hostname()]


@pytest.fixture(scope="module")
def client_addr(host) -> str:
    out = host.check_output('printf "PULLBACK_ADDR %s\\n" "${SSH_CONNECTION%% *}"')
    match = re.search(r"^PULLBACK_ADDR (\S+)$", out, re.MULTILINE)
    assert match, f"the admin login has no $SSH_CONNECTION: {out!r}"
    return match[1]


@pytest.fixture(scope="module")
def sshd_settings(host, client_addr) -> dict[str, str]:
    spec = f"user=root,host={client_addr},addr={client_addr}"
    with host.sudo():
        result = host.run(f'"$(command -v sshd || echo /usr/sbin/sshd)" -T -C {shlex.quote(spec)}')
    assert result.rc == 0, f"sshd -T -C {spec} fails: {result.stderr.strip()}"
    return parse_sshd_T(result.stdout)


@pytest.fixture(scope="module")
def key_line(host, expected) -> rootkey.KeyLine | None:
    blob = rootkey.parse_public_key(Path(expected.backup_pubkey).read_text()).blob
    with host.sudo():
        keys = host.file(AUTHORIZED_KEYS)
        content = keys.content if keys.exists else None
    return rootkey.find_key_line(content, blob)


def _mode(host, path: str) -> tuple[str, int, int, int]:
    with host.sudo():
        f = host.file(path)
        assert f.exists, f"{path} does not exist"
        kind = "folder" if f.is_directory else "file"
        return (kind, f.mode, f.uid, f.gid)


def _record(expected: HostSpec) -> capture_record.CaptureRecord:
    try:
        record = capture_record.load_record(expected)
    except capture.CaptureError as exc:
        pytest.fail(str(exc), pytrace=False)
    assert record is not None, f"no capture record {capture_record.record_path(expected)}"
    return record


def test_permit_root_login(sshd_settings, client_addr):
    """sshd -T: PermitRootLogin forced-commands-only for the backup host"""
    value = sshd_settings.get("permitrootlogin")
    assert value == hardened.PERMIT_ROOT_LOGIN, f"sshd applies permitrootlogin {value} to root from {client_addr}"


def test_pubkey_authentication(sshd_settings):
    """sshd -T: PubkeyAuthentication yes"""
    value = sshd_settings.get("pubkeyauthentication")
    assert value == "yes", f"pubkeyauthentication is {value}"


def test_root_ssh_folder(host):
    """/root/.ssh is a 0700 root:root folder"""
    kind, mode, uid, gid = _mode(host, hardened.ROOT_SSH)
    assert (kind, (mode, uid, gid)) == ("folder", hardened.PRIVATE), \
        f"{hardened.ROOT_SSH} is a {kind} with mode {mode:04o}, owner {uid}:{gid}"


def test_authorized_keys_file(host):
    """/root/.ssh/authorized_keys is a 0600 root:root file"""
    kind, mode, uid, gid = _mode(host, AUTHORIZED_KEYS)
    assert (kind, (mode, uid, gid)) == ("file", hardened.ROOT_ONLY), \
        f"{AUTHORIZED_KEYS} is a {kind} with mode {mode:04o}, owner {uid}:{gid}"


def test_key_line_forced_command(key_line, expected):
    """the backup key's line forces the command of the inventory's mode"""
    assert key_line is not None, f"the backup key is not in {AUTHORIZED_KEYS}"
    assert key_line.count == 1, f"the backup key is on {key_line.count} lines"
    forced = key_line.forced
    assert forced is not None, "the backup key's line has no command="
    if expected.forced_command == Mode.DAEMON:
        wanted = hardened.daemon_command(forced.binary)
        assert forced.text == wanted, f"command={forced.text!r} is not {wanted!r}"
    else:
        assert forced.text == hardened.GATE, \
            f"command={forced.text!r} is not pullback's capture gate {hardened.GATE}"


def test_key_line_restrictions(key_line, expected, client_addr):
    """the backup key's line has restrict or every no-* option, and the inventory's from="""
    assert key_line is not None, f"the backup key is not in {AUTHORIZED_KEYS}"
    assert not key_line.problem, key_line.problem
    missing = key_line.missing_restrictions
    assert not missing, f"no `restrict` and missing {', '.join(missing)}"
    wanted = hardened.wanted_from(expected.from_, client_addr)
    assert key_line.from_ == wanted, \
        f"from={key_line.from_!r}, wanted {wanted!r} (inventory from: {expected.from_!r}, " \
        f"this client {client_addr})"


def test_rsyncd_module(host, expected):
    """rsyncd.conf module: path /, uid 0, gid 0, read only, list false (daemon mode)"""
    if expected.forced_command != Mode.DAEMON:
        pytest.skip("captured mode uses no rsyncd module")
    with host.sudo():
        conf = host.file(PULLBACK_RSYNCD_CONF)
        content = conf.content if conf.exists else None
    assert content is not None, f"{PULLBACK_RSYNCD_CONF} does not exist"
    problems = rsyncd.check_module(content, expected.backup.module, path="/")
    assert not problems, f"[{expected.backup.module}]: " + "; ".join(problems)


def test_rsyncd_file_private(host, expected):
    """/etc/pullback/rsyncd.conf is a 0600 root:root file in a root folder no one else can write"""
    if expected.forced_command != Mode.DAEMON:
        pytest.skip("captured mode uses no rsyncd module")
    kind, mode, uid, gid = _mode(host, PULLBACK_RSYNCD_CONF)
    assert (kind, (mode, uid, gid)) == ("file", hardened.ROOT_ONLY), \
        f"{PULLBACK_RSYNCD_CONF} is a {kind} with mode {mode:04o}, owner {uid}:{gid}"
    kind, mode, uid, gid = _mode(host, PULLBACK_DIR)
    assert kind == "folder" and uid == 0 and not mode & 0o022, \
        f"{PULLBACK_DIR} is a {kind} with mode {mode:04o}, owner {uid}:{gid}"


def test_no_module_in_shared_rsyncd_conf(host):
    """/etc/rsyncd.conf holds no pullback module (any rsync daemon would serve it)"""
    with host.sudo():
        conf = host.file(RSYNCD_CONF)
        content = conf.content if conf.exists else None
    if content is None:
        return
    old = rsyncd.legacy_modules(rsyncd.parse_rsyncd_conf(content))
    assert not old, (f"{RSYNCD_CONF} still holds pullback's "
                     f"{', '.join(f'[{s.name}]' for s in old)}: run `invoke setup-remote`")


def test_capture_gate(host, expected):
    """captured mode: the gate is 0700 root:root and rendered from the local capture record"""
    if expected.forced_command != Mode.CAPTURED:
        pytest.skip("daemon mode uses no gate")
    record = _record(expected)
    kind, mode, uid, gid = _mode(host, hardened.GATE)
    assert (kind, (mode, uid, gid)) == ("file", hardened.PRIVATE), \
        f"{hardened.GATE} is a {kind} with mode {mode:04o}, owner {uid}:{gid}"
    with host.sudo():
        content = host.file(hardened.GATE).content
    assert content == gate_scripts.gate_file(record).content, \
        f"{hardened.GATE} is not the gate of {capture_record.record_path(expected)}"


def test_forced_command_rsync_path(key_line, expected):
    """the forced command runs the pinned rsync (rsync.prefix/bin/rsync)"""
    assert key_line is not None and key_line.forced is not None, "no forced command"
    if expected.forced_command == Mode.CAPTURED:
        runs = _record(expected).remote_rsync
    else:
        runs = key_line.forced.binary
    assert runs == expected.rsync.remote_binary, \
        f"the forced command runs {runs}, not {expected.rsync.remote_binary}"


def test_remote_rsync_version(host, expected):
    """rsync.prefix/bin/rsync reports the inventory's rsync.version"""
    binary = expected.rsync.remote_binary
    result = host.run(f"{shlex.quote(binary)} --version")
    assert result.rc == 0, f"{binary} does not run: {result.stderr.strip() or result.rc}"
    version, protocol = parse_version_output(result.stdout)
    assert version == expected.rsync.version, \
        f"{binary} is rsync {version} (protocol {protocol}), not {expected.rsync.version}"
