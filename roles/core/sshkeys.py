"""SSH public keys, pure: the fingerprint as ``ssh-keygen -l`` and ssh print it."""

from __future__ import annotations

import base64
import hashlib


def fingerprint_of(blob: bytes) -> str:
    """``SHA256:...``: the unpadded base64 of the SHA-256 of the key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
