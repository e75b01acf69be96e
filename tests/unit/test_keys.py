"""roles.local.keys: a private key others can read is refused with the chmod that fixes it;
a passphrase is detected without ever asking for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from roles.local import keys


def make_key(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_private_key_only_its_owner_can_read_is_accepted(tmp_path, mode):
    key = make_key(tmp_path / "key")
    key.chmod(mode)
    keys.check_private_key(key)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o777])
def test_a_key_with_any_group_or_other_bit_is_refused_with_the_fix(tmp_path, mode):
    key = make_key(tmp_path / "key")
    key.chmod(mode)
    with pytest.raises(keys.KeyFileError) as info:
        keys.check_private_key(key)
    assert str(info.value) == (
        f"{key} has mode {mode:04o}: others can read the key that reads every file on your "
        f"servers; fix with: chmod 600 {key}")


def test_a_missing_key_or_a_folder_is_refused(tmp_path):
    with pytest.raises(keys.KeyFileError, match="does not exist: create it with `invoke keygen`"):
        keys.check_private_key(tmp_path / "missing")
    with pytest.raises(keys.KeyFileError, match="is not a regular file"):
        keys.check_private_key(tmp_path)


def test_ensure_backup_key_refuses_an_existing_readable_key(tmp_path):
    key = make_key(tmp_path / "key")
    key.chmod(0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.ensure_backup_key(key)
    assert key.stat().st_mode & 0o777 == 0o644  # reported, never changed behind your back


def test_key_has_passphrase(tmp_path):
    assert not keys.key_has_passphrase(make_key(tmp_path / "open"))
    assert keys.key_has_passphrase(make_key(tmp_path / "locked", "correct horse battery"))


def test_ensure_destination_makes_every_new_level_0700_and_refuses_a_shared_parent(tmp_path):
    from roles.local import folders

    dest = tmp_path / "backups" / "web1"
    assert keys.ensure_destination(dest) == f"{dest}: created (0700)"
    assert [p.stat().st_mode & 0o777 for p in (dest.parent, dest)] == [0o700, 0o700]
    dest.chmod(0o755)
    assert keys.ensure_destination(dest) == f"{dest}: mode 0755 -> 0700"
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(folders.FolderError, match="writable by its group and others"):
        keys.ensure_destination(tmp_path / "open" / "b" / "web1")
    assert list((tmp_path / "open").iterdir()) == []


def test_a_passphrase_key_without_a_terminal_is_refused_not_made_bare(tmp_path):
    """ssh-keygen without a terminal reads an empty passphrase: the key must not stay."""
    key = tmp_path / "k" / "backup"
    with pytest.raises(keys.KeyFileError, match="no passphrase was set"):
        keys.ensure_backup_key(key, passphrase=True)
    assert not key.exists() and not key.with_name("backup.pub").exists()


def test_keygen_passphrase_without_a_terminal_exits_2_before_anything(tmp_path):
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([str(Path(sys.executable).parent / "invoke"), "keygen",
                             "--passphrase", "--inventory", str(tmp_path / "none.yaml")],
                            cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("keygen: --passphrase needs a terminal: ssh-keygen asks "
                                     "for it there")
