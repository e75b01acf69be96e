"""roles.core.root_trust (pure), roles.local.trust_paths and pullback-backup's refusal as root:
an inventory or virtualenv that another user could change is never run by root."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from roles.cli import unattended
from roles.core.root_trust import Entry, check_entries, problem_of
from roles.local import trust_paths

DIR, FILE, LINK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK


@pytest.mark.parametrize("entry,needle", [
    (Entry("/opt/p", DIR | 0o755, 0), None),
    (Entry("/opt/p/inventory.yaml", FILE | 0o644, 0), None),
    (Entry("/opt/p/inventory.yaml", FILE | 0o600, 0), None),
    (Entry("/tmp", DIR | 0o1777, 0), None),  # sticky: others cannot rename root's entries
    (Entry("/opt/p/python", LINK | 0o777, 0), None),  # a link's mode means nothing
    (Entry("/opt/p", DIR | 0o775, 0), "writable by its group (mode 0775)"),
    (Entry("/opt/p/inventory.yaml", FILE | 0o666, 0), "writable by its group and others"),
    (Entry("/opt/p/inventory.yaml", FILE | 0o602, 0), "writable by others (mode 0602)"),
    (Entry("/opt/p/x.py", FILE | 0o1666, 0), "writable by its group and others"),  # not a dir
    (Entry("/opt/p/inventory.yaml", FILE | 0o600, 1000), "belongs to uid 1000, not root"),
    (Entry("/opt/p/python", LINK | 0o777, 1000), "belongs to uid 1000"),
    (Entry("/home/u", DIR | 0o1777, 1000), "belongs to uid 1000"),
])
def test_problem_of(entry, needle):
    problem = problem_of(entry)
    if needle is None:
        assert problem is None
    else:
        assert needle in problem and entry.path in problem and "fix: " in problem


def test_check_entries_names_the_first_problem_and_what_it_belongs_to():
    entries = [Entry("/", DIR | 0o755, 0), Entry("/srv", DIR | 0o777, 0),
               Entry("/srv/inv.yaml", FILE | 0o644, 1000)]
    assert check_entries("the inventory /srv/inv.yaml", entries) == (
        "refused to run as root: the inventory /srv/inv.yaml is not under root's sole "
        "control: /srv is writable by its group and others (mode 0777): they could change "
        "what root runs; fix: chmod go-w /srv")
    assert check_entries("x", entries[:1]) is None


@pytest.fixture
def layout(tmp_path):
    """A root-owned 0755 copy of the layout: inventory, venv, package."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the files must belong to root")
    top = tmp_path / "opt"
    for folder in ("venv/bin", "venv/lib/site-packages/dep", "roles/cli"):
        (top / folder).mkdir(parents=True)
    for file in ("inventory.yaml", "venv/pyvenv.cfg", "venv/lib/site-packages/dep/__init__.py",
                 "roles/__init__.py", "roles/cli/unattended.py"):
        (top / file).write_text("x\n")
    os.symlink(sys.executable, top / "venv" / "bin" / "python")
    for path in (tmp_path, *tmp_path.parents):
        if path == Path("/"):
            break
        assert not os.stat(path).st_mode & 0o022 or os.stat(path).st_mode & stat.S_ISVTX
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return top


def problem(top: Path) -> str | None:
    return trust_paths.root_job_problem(top / "inventory.yaml", prefix=str(top / "venv"),
                                        package=top / "roles", executable=sys.executable)


def test_a_root_only_layout_passes(layout):
    assert problem(layout) is None


@pytest.mark.parametrize("path,change,what,needle", [
    ("inventory.yaml", "chmod 0664", "the inventory", "is writable by its group"),
    ("inventory.yaml", "chown 1000", "the inventory", "belongs to uid 1000"),
    (".", "chmod 0777", "the inventory", "writable by its group and others"),
    ("venv/lib/site-packages/dep/__init__.py", "chmod 0646", "the virtualenv",
     "writable by others"),
    ("venv/lib/site-packages/dep", "chown 1000", "the virtualenv", "belongs to uid 1000"),
    ("roles/cli/unattended.py", "chown 1000", "pullback's own code", "belongs to uid 1000"),
])
def test_each_path_that_another_user_could_change_is_refused(layout, path, change, what,
                                                            needle):
    target = layout / path
    verb, arg = change.split()
    if verb == "chmod":
        target.chmod(int(arg, 8))
    else:
        os.chown(target, int(arg), -1)
    found = problem(layout)
    assert found is not None and found.startswith(f"refused to run as root: {what} ")
    assert needle in found and str(target.resolve()) in found


def test_a_link_on_the_way_is_followed(layout, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(layout / "inventory.yaml", elsewhere)
    os.symlink(elsewhere, layout / "inventory.yaml")
    assert problem(layout) is None
    elsewhere.chmod(0o666)
    assert f"{elsewhere} is writable by its group and others" in problem(layout)


def test_pullback_backup_as_root_refuses_a_writable_inventory(tmp_path, capsys, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts: {}\n")
    inventory.chmod(0o666)
    tmp_path.chmod(0o755)
    monkeypatch.setattr(unattended.backup, "pull_all",
                        lambda *a, **k: pytest.fail("the backup must not start"))
    assert unattended.main(["--inventory", str(inventory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pullback-backup: refused to run as root: the inventory {inventory} ")
    assert f"{inventory} is writable by its group and others (mode 0666)" in err
    # Not root: no check (the user's own files are theirs to trust); the inventory's own
    # problem is what fails then.
    monkeypatch.setattr(unattended.os, "geteuid", lambda: 1000)
    assert unattended.main(["--inventory", str(inventory)]) == 2
    assert "refused to run as root" not in capsys.readouterr().err
