"""roles.features.trust: known_hosts names, fingerprints, matching (plain, hashed, revoked), the
add / already / refuse decision, and trust_host's file handling with a stand-in fetch.
The real key exchange against sshd is in tests/integration/test_schedule.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from roles.core.outcome import Trust
from roles.core.spec import HostSpec
from roles.features import trust as t
from roles.inventory.schema import validate_host


def new_key(tmp_path: Path, name: str, kind: str = "ed25519") -> t.HostKey:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)
    key_type, blob = path.with_suffix(".pub").read_text().split()[:2]
    return t.HostKey(key_type, blob)


@pytest.fixture
def keys(tmp_path):
    return new_key(tmp_path, "a"), new_key(tmp_path, "b"), new_key(tmp_path, "c", "ecdsa")


@pytest.mark.parametrize("address, port, name", [
    ("192.0.2.10", 22, "192.0.2.10"), ("192.0.2.10", 2222, "[192.0.2.10]:2222"),
    ("web1.example.com", 22, "web1.example.com"), ("2001:db8::1", 2222, "[2001:db8::1]:2222"),
])
def test_known_hosts_name(address, port, name):
    assert t.known_hosts_name(address, port) == name


def test_fingerprint_matches_ssh_keygen(tmp_path, keys):
    for key in keys:
        path = tmp_path / "pub"
        path.write_text(f"{key.type} {key.blob}\n")
        out = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True,
                             check=True).stdout
        assert out.split()[1] == key.fingerprint


def test_pinned_keys_finds_plain_listed_and_hashed_entries(tmp_path, keys):
    a, b, c = keys
    name = "[127.0.0.1]:2222"
    hashed = tmp_path / "hashed"
    hashed.write_text(f"{name} {c.type} {c.blob}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    hashed_line = hashed.read_text().splitlines()[-1]
    assert hashed_line.startswith("|1|")
    text = "\n".join([
        "# comment",
        f"other.example.com {b.type} {b.blob}",
        f"other.example.com,{name} {a.type} {a.blob} comment",
        hashed_line,
        f"@cert-authority {name} {b.type} {b.blob}",
        f"@revoked {name} {b.type} {b.blob}",
        "garbage",
        f"127.0.0.1 {b.type} {b.blob}",  # the same address on port 22 is another name
    ])
    found = t.pinned_keys(text, name)
    assert [(p.lineno, p.key, p.revoked) for p in found] == [
        (3, a, False), (4, c, False), (6, b, True)]


def pinned(*entries: tuple[t.HostKey, bool]) -> list[t.Pinned]:
    return [t.Pinned(i + 1, key, revoked) for i, (key, revoked) in enumerate(entries)]


def test_plan_trust_decisions(keys):
    a, b, c = keys
    name, kh = "[h]:22", "/kh"
    assert t.plan_trust([], a, name, kh) == t.Decision(t.Action.ADD)
    assert t.plan_trust(pinned((a, False)), a, name, kh) == t.Decision(t.Action.ALREADY)
    assert t.plan_trust(pinned((c, False)), a, name, kh) == t.Decision(t.Action.ADD)  # other
    refused = t.plan_trust(pinned((c, False), (b, False)), a, name, kh)
    assert refused.action is t.Action.REFUSE
    assert refused.reason.startswith(f"HOST KEY MISMATCH for [h]:22: /kh:2 pins ssh-ed25519 "
                                     f"{b.fingerprint}, the host now offers {a.fingerprint}")
    assert "ssh-keygen -R '[h]:22' -f /kh" in refused.reason
    revoked = t.plan_trust(pinned((a, True)), a, name, kh)
    assert revoked.action is t.Action.REFUSE and "@revoked" in revoked.reason


@pytest.mark.parametrize("old, want", [
    (b"", b"L\n"), (b"x y z\n", b"x y z\nL\n"), (b"x y z", b"x y z\nL\n"),
])
def test_appended_keeps_existing_bytes(old, want):
    assert t.appended(old, "L\n") == want


# --- trust_host with a stand-in key exchange ---------------------------------------------------


def host(tmp_path: Path, port: int = 2222) -> HostSpec:
    return validate_host({
        "name": "web1", "address": "127.0.0.1", "port": port, "admin_user": "admin",
        "backup_key": "/keys/backup", "known_hosts": str(tmp_path / "ssh" / "known_hosts")})


@pytest.fixture
def offered(monkeypatch, keys):
    calls = []

    def fake(address, port, *, key_types=None, timeout=10):
        calls.append((address, port, key_types))
        return keys[0]

    monkeypatch.setattr(t, "fetch_host_key", fake)
    return calls


def test_an_unknown_key_is_added_after_a_yes(tmp_path, keys, offered):
    shown, asked = [], []
    h = host(tmp_path)
    outcome = t.trust_host(h, lambda q: asked.append(q) or True, show=shown.append)
    path = Path(h.known_hosts)
    assert outcome.state is Trust.ADDED
    assert path.read_text() == f"[127.0.0.1]:2222 ssh-ed25519 {keys[0].blob}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert keys[0].fingerprint in shown[0] and "ssh_host_ed25519_key.pub" in shown[0]
    assert asked == [f"Trust this key for web1 and add it to {path}? [y/N] "]
    assert offered == [("127.0.0.1", 2222, None)]
    # Again: nothing asked, nothing written, and the negotiation asks for the pinned type.
    outcome = t.trust_host(h, lambda q: pytest.fail("asked again"), show=shown.append)
    assert outcome.state is Trust.ALREADY
    assert offered[-1] == ("127.0.0.1", 2222, ["ssh-ed25519"])


def test_port_22_is_written_without_brackets_and_other_lines_are_kept(tmp_path, keys, offered):
    h = host(tmp_path, port=22)
    path = Path(h.known_hosts)
    path.parent.mkdir()
    path.write_text(f"other {keys[1].type} {keys[1].blob}")  # no final newline
    path.chmod(0o600)
    t.trust_host(h, lambda q: True, show=lambda m: None)
    assert path.read_text() == (f"other {keys[1].type} {keys[1].blob}\n"
                                f"127.0.0.1 ssh-ed25519 {keys[0].blob}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["known_hosts"]


def test_a_different_pinned_key_is_refused_and_never_replaced(tmp_path, keys, offered):
    h = host(tmp_path)
    path = Path(h.known_hosts)
    path.parent.mkdir()
    before = f"[127.0.0.1]:2222 {keys[1].type} {keys[1].blob}\n"
    path.write_text(before)
    with pytest.raises(t.TrustError, match="HOST KEY MISMATCH"):
        t.trust_host(h, lambda q: pytest.fail("must not ask"), show=lambda m: None)
    assert path.read_text() == before


def test_a_no_writes_nothing(tmp_path, offered):
    h = host(tmp_path)
    assert t.trust_host(h, lambda q: False, show=lambda m: None).state is Trust.DECLINED
    assert not Path(h.known_hosts).exists()


def test_trust_host_prints_its_outcome_words_as_ever(tmp_path, keys, offered, monkeypatch,
                                                     capsys):
    """``invoke trust-host``'s line per host: the ``Trust`` words, byte for byte; a declined
    or refused host exits 1."""
    import invoke

    import tasks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    known_hosts = tmp_path / "ssh" / "known_hosts"
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"hosts:\n  web1: {{address: 127.0.0.1, port: 2222, admin_user: "
                         f"admin, backup_key: /keys/backup, known_hosts: {known_hosts}}}\n")
    tail = f"[127.0.0.1]:2222 ssh-ed25519 {keys[0].fingerprint} ({known_hosts})\n"
    run = tasks.trust_host.body
    run(invoke.Context(), inventory=str(inventory), host=["web1"], yes=True)
    assert capsys.readouterr().out.endswith(f"web1: added: {tail}")
    run(invoke.Context(), inventory=str(inventory), host=["web1"], yes=True)
    assert capsys.readouterr().out == f"web1: already trusted: {tail}"
    known_hosts.unlink()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    with pytest.raises(invoke.exceptions.Exit) as exited:
        run(invoke.Context(), inventory=str(inventory), host=["web1"], yes=False)
    assert exited.value.code == 1 and exited.value.message == "trust-host: not trusted: web1"
    assert capsys.readouterr().out.endswith(f"web1: declined: {tail}")
    known_hosts.write_text(f"[127.0.0.1]:2222 {keys[1].type} {keys[1].blob}\n")
    with pytest.raises(invoke.exceptions.Exit):
        run(invoke.Context(), inventory=str(inventory), host=["web1"], yes=True)
    assert capsys.readouterr().err.startswith(
        "web1: refused: web1: HOST KEY MISMATCH for [127.0.0.1]:2222: ")


def test_a_file_changed_while_asking_is_not_overwritten(tmp_path, offered):
    h = host(tmp_path)
    path = Path(h.known_hosts)

    def answer(question):
        path.parent.mkdir()
        path.write_text("someone else's line\n")
        return True

    with pytest.raises(t.TrustError, match="changed while waiting"):
        t.trust_host(h, answer, show=lambda m: None)
    assert path.read_text() == "someone else's line\n"


def test_fetch_refuses_an_unreachable_host():
    with pytest.raises(t.HostKeyError, match="cannot connect to 127.0.0.1:1"):
        t.fetch_host_key("127.0.0.1", 1, timeout=2)
