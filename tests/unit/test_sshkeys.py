"""One SSH fingerprint for the whole toolkit, checked against ssh-keygen itself."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from roles.config.rootkey import fingerprint, parse_public_key
from roles.core.sshkeys import fingerprint_of
from roles.remote.hostkeys import HostKey


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path, kind: str):
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
    line = (tmp_path / "key.pub").read_text()
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(key) + ".pub"],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    key_type, blob = line.split()[:2]
    assert fingerprint_of(base64.b64decode(blob)) == printed
    assert fingerprint(parse_public_key(line)) == printed  # the backup key's
    assert HostKey(key_type, blob).fingerprint == printed  # a host key's
