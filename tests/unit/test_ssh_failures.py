"""The SSH failure table: ssh's and paramiko's own words in, the diagnosis out."""

from __future__ import annotations

import pytest

from roles.core import rsync_errors
from roles.core.pull import describe_failure
from roles.core.ssh_failures import classify_ssh_failure, clean_message

# What OpenSSH (9.x) and paramiko (3.x) really print, with rsync's words after them where
# a pull prints them.
CASES = [
    # A port that accepts and says nothing (the case: backup blamed the daemon).
    ("Connection timed out during banner exchange\nConnection to 127.0.0.1 port 42197 timed "
     "out\nrsync: did not see server greeting\nrsync error: error starting client-server "
     "protocol (code 5) at main.c(1954) [Receiver=3.5.0]", "not-sshd", "doctor"),
    ("No existing session", "not-sshd", "doctor"),  # paramiko, silent port
    ("Error reading SSH protocol bannertimed out", "not-sshd", "doctor"),
    ("banner exchange: Connection to 127.0.0.1 port 8080: invalid format", "not-sshd",
     "doctor"),
    # A port that accepts and closes at once.
    ("kex_exchange_identification: Connection closed by remote host\nConnection closed by "
     "127.0.0.1 port 56099", "closed", "doctor"),
    ("kex_exchange_identification: read: Connection reset by peer\nConnection reset by "
     "127.0.0.1 port 56099", "closed", "doctor"),
    ("ssh_exchange_identification: Connection closed by remote host", "closed", "doctor"),
    ("Error reading SSH protocol banner", "closed", "doctor"),
    ("Error reading SSH protocol banner[Errno 104] Connection reset by peer", "closed",
     "doctor"),
    # Nothing listening, no path, no name, no answer.
    ("ssh: connect to host 127.0.0.1 port 1: Connection refused", "refused", "doctor"),
    ("[Errno None] Unable to connect to port 22 on 127.0.0.1", "refused", "doctor"),
    ("ssh: connect to host 10.9.9.9 port 22: No route to host", "no-route", "doctor"),
    ("ssh: connect to host 10.9.9.9 port 22: Network is unreachable", "no-route", "doctor"),
    ("ssh: Could not resolve hostname nope.invalid: Name or service not known", "dns",
     "doctor"),
    ("ssh: connect to host 10.9.9.9 port 22: Connection timed out", "timeout", "doctor"),
    ("timed out", "timeout", "doctor"),
    # sshd answered.
    ("root@127.0.0.1: Permission denied (publickey).", "key-refused", "doctor"),
    ("Authentication failed.", "key-refused", "doctor"),
    ("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict "
     "checking.\nHost key verification failed.", "host-key", "trust-host"),
    ("Server '[127.0.0.1]:2222' not found in known_hosts", "host-key", "trust-host"),
    ("@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key "
     "verification failed.", "host-key-changed", "doctor"),
]


@pytest.mark.parametrize(("text", "kind", "task"), CASES)
def test_every_ssh_failure_is_named(text, kind, task):
    failure = classify_ssh_failure(text)
    assert failure is not None and (failure.kind, failure.task) == (kind, task)
    assert "\n" not in failure.describe("127.0.0.1:22")


@pytest.mark.parametrize("text", [
    "rsync: did not see server greeting\nrsync error: error starting client-server protocol "
    "(code 5) at main.c(1954) [Receiver=3.5.0]",
    "@ERROR: Unknown module 'system'",
    "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]",
    "protocol version mismatch -- is your shell clean?",
    "",
])
def test_rsync_failures_after_a_working_ssh_are_not_ssh_failures(text):
    assert classify_ssh_failure(text) is None


def test_a_pull_through_a_port_that_is_not_sshd_blames_ssh_not_the_daemon():
    """The issue: the daemon's missing greeting was reported, ssh's line was in the log."""
    errors = ["Connection timed out during banner exchange",
              "rsync: did not see server greeting",
              "rsync error: error starting client-server protocol (code 5) at main.c(1954) "
              "[Receiver=3.5.0]"]
    text = describe_failure(5, errors)
    assert text.startswith("ssh failed (rsync exit 5): Connection timed out during banner exchange -- ")
    assert "no SSH server answered" in text
    assert "forced command" not in text and "greeting" not in text.split(" -- ")[1]
    # rsync's own reading, once ssh got through, is unchanged.
    daemon = describe_failure(5, errors[1:])
    assert "forced command did not start an rsync daemon" in daemon
    assert daemon == describe_failure(5, errors[1:])  # and only the table says so
    assert rsync_errors.signature(daemon) is not None


@pytest.mark.parametrize(("raw", "host", "clean"), [
    ("[Errno None] Unable to connect to port 22 on 127.0.0.1", None,
     "Unable to connect to port 22 on 127.0.0.1"),
    ("web1: Error reading SSH protocol banner[Errno 104] Connection reset by peer", "web1",
     "Error reading SSH protocol banner: Connection reset by peer"),
    ("web1: cannot connect\n  to 10.0.0.1:22: [Errno 113] No route to host", "web1",
     "cannot connect to 10.0.0.1:22: No route to host"),
    ("web10: kept", "web1", "web10: kept"),
])
def test_messages_lose_errno_brackets_and_the_repeated_host(raw, host, clean):
    assert clean_message(raw, host) == clean
