"""The receiving rsync's sandbox, pure: the bwrap argv and the pull's xattr filter.

The attacks on a real sandbox are in tests/integration/test_sandbox.py."""

from __future__ import annotations

import dataclasses

import pytest

from roles.core import sandbox
from roles.core.pull import build_argv
from roles.core.spec import HostSpec
from roles.inventory.schema import validate_host


def pairs(argv: list[str], flag: str) -> list[tuple[str, ...]]:
    """The operands of every ``flag`` in bwrap's part of ``argv`` (before ``--``)."""
    head = argv[:argv.index("--")]
    width = {"--bind": 2, "--ro-bind": 2, "--tmpfs": 1, "--cap-add": 1, "--cap-drop": 1}[flag]
    return [tuple(head[i + 1:i + 1 + width]) for i, word in enumerate(head) if word == flag]


def test_only_the_writable_folders_are_bound_read_write_after_root_read_only():
    argv = sandbox.build_sandbox(["rsync", "-a", "x"], bwrap="/usr/bin/bwrap",
                                 writable=["/srv/backups/web1"],
                                 hidden=["/srv/backups"], readable=["/etc/pullback/key"])
    assert argv[:5] == ["/usr/bin/bwrap", "--ro-bind", "/", "/", "--dev"]
    assert pairs(argv, "--bind") == [("/srv/backups/web1", "/srv/backups/web1")]
    assert pairs(argv, "--ro-bind") == [("/", "/"), ("/etc/pullback/key", "/etc/pullback/key")]
    assert pairs(argv, "--tmpfs") == [("/tmp",), ("/var/tmp",), ("/run",), ("/srv/backups",)]
    # Mounts apply in order: the hiding tmpfs first, then what is bound over it.
    assert argv.index("/srv/backups") < argv.index("/srv/backups/web1") \
        < argv.index("/etc/pullback/key")
    assert argv[argv.index("--") + 1:] == ["rsync", "-a", "x"]


def test_capabilities_are_dropped_to_the_small_set_never_sys_admin_or_read_search():
    argv = sandbox.build_sandbox(["true"], bwrap="bwrap", writable=[])
    assert pairs(argv, "--cap-drop") == [("ALL",)]
    added = [cap for (cap,) in pairs(argv, "--cap-add")]
    assert added == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                     "CAP_MKNOD", "CAP_SETFCAP"]
    assert "CAP_SYS_ADMIN" not in argv and "CAP_DAC_READ_SEARCH" not in argv
    assert argv.index("--cap-drop") < argv.index("--cap-add")


@pytest.mark.parametrize(("new_session", "present"), [(True, True), (False, False)])
def test_own_session_pid_and_ipc_namespaces(new_session, present):
    argv = sandbox.build_sandbox(["true"], bwrap="bwrap", writable=[],
                                 new_session=new_session)
    head = argv[:argv.index("--")]
    assert {"--unshare-pid", "--unshare-ipc", "--die-with-parent"} <= set(head)
    assert ("--new-session" in head) is present
    assert "--unshare-net" not in head  # ssh needs the network


def test_a_relative_path_is_refused():
    with pytest.raises(ValueError, match="absolute"):
        sandbox.build_sandbox(["true"], bwrap="bwrap", writable=["backups/web1"])


def make_host(options: tuple[str, ...] | None = None, version: str = "3.2.7") -> HostSpec:
    backup: dict = {"destination": "/srv/backups/{name}"}
    if options is not None:  # reduced on purpose: which options carry -X is the point
        backup.update(options=options, allow_inexact=True)
    return validate_host({"name": "web1", "address": "192.0.2.10",
                          "admin_user": "admin", "backup_key": "/keys/backup",
                          "known_hosts": "/keys/known_hosts",
                          "rsync": {"version": version, "allow_vulnerable": True},
                          "backup": backup})


def unsandboxed(host: HostSpec) -> HostSpec:
    return dataclasses.replace(host, backup=dataclasses.replace(host.backup, sandbox=False))


@pytest.mark.parametrize(("options", "version", "sandboxed", "filtered"), [
    (None, "3.2.7", True, True),               # the defaults: -HAXS
    (None, "3.2.7", False, False),             # no sandbox: trusted.* is kept
    (("-a", "--xattrs"), "3.2.7", True, True),
    (("-avzx", "--numeric-ids"), "3.2.7", True, False),  # no -X: no xattrs to filter
    (None, "2.6.9", True, False),              # 2.6.9's defaults have no -X
])
def test_a_sandboxed_pull_filters_the_xattrs_it_cannot_set(options, version, sandboxed,
                                                           filtered):
    argv = build_argv(make_host(options, version), dry_run=False, tty=False,
                      local_rsync="rsync", dest="/srv/backups/web1/tree", sandboxed=sandboxed)
    assert ("--filter=-x trusted.*" in argv) is filtered
    assert argv[-2:] == ["root@192.0.2.10::system/", "/srv/backups/web1/tree/"]


def test_the_sandbox_is_on_by_default_and_can_be_turned_off():
    assert make_host().backup.sandbox is True
    host = unsandboxed(make_host())
    assert host.backup.sandbox is False


def test_doctor_names_a_missing_bwrap_and_a_sandbox_turned_off(tmp_path, monkeypatch):
    from roles.features import doctor

    (found,) = doctor.check_sandbox(make_host())
    assert found.level == "ok" and "bwrap" in found.what  # ./dev installs bubblewrap
    monkeypatch.setenv("PATH", str(tmp_path))
    (missing,) = doctor.check_sandbox(make_host())
    assert missing.level == "error" and "bwrap is not installed" in missing.what
    off = unsandboxed(make_host())
    (warned,) = doctor.check_sandbox(off)
    assert warned.level == "warn" and "without the sandbox" in warned.what
