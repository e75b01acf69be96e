"""The backup key on the backup host: create it once, never overwrite, never expose it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from roles.core.errors import PullbackError
from roles.core.spec import HostSpec
from roles.local import folders


class KeyFileError(PullbackError):
    """The backup key is missing, unreadable, or readable by others."""


def check_private_key(path: Path) -> None:
    """Refuse a missing key, or one whose mode lets the group or others at it.

    ssh refuses such a key too ("UNPROTECTED PRIVATE KEY FILE"), but only when a run
    starts; checking first gives the ``chmod`` that fixes it. Any group/other bit counts
    (ssh's own rule: ``mode & 077``).
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist: create it with `invoke keygen`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} has mode {mode:04o}: others can read the key that reads every file on "
            f"your servers; fix with: chmod 600 {path}"
        )


def key_has_passphrase(path: Path) -> bool:
    """True when ``path`` is encrypted: ``ssh-keygen -y`` cannot read it with an empty
    passphrase. The passphrase itself is never asked for here."""
    result = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(path)], check=False,
                            capture_output=True, stdin=subprocess.DEVNULL)
    return result.returncode != 0


def ensure_backup_key(path: Path, *, passphrase: bool = False) -> str:
    """Create an ed25519 key at ``path`` (0600) unless one exists; return what happened."""
    if path.exists():
        check_private_key(path)
        if not path.with_name(path.name + ".pub").exists():
            raise KeyFileError(f"{path} exists but {path}.pub is missing: ssh-keygen -y -f {path}")
        return f"{path}: exists, kept"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-C",
            f"pullback-backup@{os.uname().nodename}", "-f", str(path)]
    if not passphrase:
        argv[2:2] = ["-N", ""]
    # With a passphrase, ssh-keygen prompts on the terminal itself: it never passes
    # through this program and is never stored.
    result = subprocess.run(argv, check=False, stdin=None if passphrase else subprocess.DEVNULL)
    if result.returncode != 0:
        raise KeyFileError(f"ssh-keygen failed with exit {result.returncode}")
    if passphrase and not key_has_passphrase(path):
        # No terminal: ssh-keygen read an empty passphrase. A key said to be protected
        # must be, so this one goes rather than stay unprotected under that name.
        for made in (path, path.with_name(path.name + ".pub")):
            made.unlink(missing_ok=True)
        raise KeyFileError("no passphrase was set (ssh-keygen had no terminal to ask on); "
                           "run `invoke keygen --passphrase` on a terminal")
    path.chmod(0o600)
    return f"{path}: created (ed25519{', with passphrase' if passphrase else ''})"


def ensure_destination(path: Path) -> str:
    """Create the local backup folder with mode 0700 (it will hold copies of root files),
    missing parents 0700 too; FolderError when a folder on the way is unsafe
    (``roles.local.folders``)."""
    existed = path.exists()
    note = folders.make_private(path)
    return note or f"{path}: {'exists' if existed else 'created'} (0700)"

def read_public_key(host: HostSpec) -> str:
    try:
        with open(host.backup_pubkey, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read the backup public key {host.backup_pubkey}: {exc.strerror}; "
            "run `invoke keygen` first"
        ) from None
