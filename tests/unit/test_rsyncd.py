"""roles.config.rsyncd: pullback's own rsyncd.conf, the migration away from /etc/rsyncd.conf,
and check_module."""

from __future__ import annotations

import hashlib

import pytest

from roles.config.rsyncd import (
    REFUSE_OPTIONS,
    RsyncdSettings,
    check_module,
    hosts_allow_for,
    parse_rsyncd_conf,
    plan_legacy_removal,
    plan_pullback_conf,
    plan_remove_pullback_conf,
    render_legacy_module,
    render_module,
)

REFUSE = ("delete* remove-* backup* suffix partial-dir temp-dir inplace append* mkpath "
          "write-devices write-batch only-write-batch read-batch log-file*")

BLOCK = f"""\
# managed by pullback
# Read only by the backup key's forced command (rsync --server --daemon --config=...);
# never by an rsync daemon on TCP 873, which reads /etc/rsyncd.conf.
[system]
    path = /
    comment = pullback full-system backup (read-only)
    read only = yes
    list = false
    uid = 0
    gid = 0
    numeric ids = yes
    max connections = 1
    lock file = /run/rsyncd-pullback.lock
    refuse options = {REFUSE}
""".encode()

# What the previous version wrote into the shared /etc/rsyncd.conf (its template, copied
# here on purpose: the migration must recognise exactly these bytes).
LEGACY = b"""\
# managed by pullback
[system]
    path = /
    comment = pullback full-system backup (read-only)
    read only = yes
    list = false
    uid = 0
    gid = 0
    numeric ids = yes
    max connections = 1
    lock file = /run/rsyncd-pullback.lock
"""

SEED = b"max connections = 1\n\n[system]\n    path = /\n    list = false\n"

GLOBALS_AND_PUB = b"""\
# global settings
pid file = /run/rsyncd.pid
log file = /var/log/rsyncd.log
uid = nobody
use chroot = yes

[pub]
    path = /srv/pub
    read only = yes
"""


def test_render_module_default() -> None:
    assert render_module(RsyncdSettings()).encode() == BLOCK
    assert " ".join(REFUSE_OPTIONS) == REFUSE


def test_render_module_hosts_allow() -> None:
    settings = RsyncdSettings(hosts_allow=("192.0.2.7", "2001:db8::/64"))
    assert render_module(settings).encode() == BLOCK + (
        b"    hosts allow = 192.0.2.7 2001:db8::/64\n    hosts deny = *\n")


def test_render_module_custom() -> None:
    settings = RsyncdSettings(
        module="backup_1", path="/srv/data", lock_file="/var/lock/pb.lock", comment="data"
    )
    text = render_module(settings)
    assert "\n[backup_1]\n    path = /srv/data\n    comment = data\n" in text
    assert "    lock file = /var/lock/pb.lock\n    refuse options = " in text


def test_render_legacy_module_is_the_old_template() -> None:
    assert render_legacy_module("system") == LEGACY
    assert render_legacy_module("full") == LEGACY.replace(b"[system]", b"[full]")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("module", "sys tem", "letters, digits"),
        ("module", "", "letters, digits"),
        ("module", "a]b", "letters, digits"),
        ("module", "Global", "rsyncd's global section"),
        ("path", "srv", "absolute path"),
        ("path", "/srv/%HOME%", "%VAR%"),
        ("path", "/srv/ ", "no surrounding blanks"),
        ("path", "/srv\\", "no surrounding blanks"),
        ("lock_file", "run/x.lock", "absolute path"),
        ("comment", "two\nlines", "printable text"),
        ("hosts_allow", ("10.0.0.1 10.0.0.2",), "an IP address"),
        ("hosts_allow", ("*.example.com",), "an IP address"),
        ("hosts_allow", ("10.0.0.1\n",), "an IP address"),
    ],
)
def test_settings_rejects(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RsyncdSettings(**{field: value})


# --- hosts allow --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_", "client", "allow", "warned"),
    [
        (None, "192.0.2.7", ("192.0.2.7",), False),
        ("10.1.0.0/16,192.0.2.7", "192.0.2.7", ("10.1.0.0/16", "192.0.2.7"), False),
        ("backup.example.com", "192.0.2.7", ("192.0.2.7",), False),  # no DNS in rsyncd
        ("10.*", "10.0.0.3", ("10.0.0.3",), False),
        ("!10.0.0.9,10.0.0.0/8", "10.0.0.3", ("10.0.0.3",), False),
        (None, "::1", ("::1",), False),
        (None, "", (), True),
    ],
)
def test_hosts_allow_for(from_, client, allow, warned) -> None:
    got, warnings = hosts_allow_for(from_, client)
    assert got == allow
    assert bool(warnings) is warned


# --- pullback's own file ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "changed"),
    [(None, True), (b"", True), (LEGACY, True), (BLOCK + b"[pub]\n path=/srv\n", True),
     (BLOCK, False)],
    ids=["missing", "empty", "old-module", "extra-module", "current"],
)
def test_plan_pullback_conf(current: bytes | None, changed: bool) -> None:
    plan = plan_pullback_conf(current, RsyncdSettings())
    assert (plan.path, plan.old, plan.new, plan.changed) == (
        "/etc/pullback/rsyncd.conf", current, BLOCK, changed)
    again = plan_pullback_conf(plan.new, RsyncdSettings())
    assert (again.changed, again.diff()) == (False, "")
    assert check_module(plan.new, "system") == []


def test_pullback_conf_diff() -> None:
    diff = plan_pullback_conf(None, RsyncdSettings()).diff()
    assert diff.startswith("--- /dev/null\n+++ b/etc/pullback/rsyncd.conf\n@@ -0,0 +1,14 @@\n"
                           "+# managed by pullback\n")
    assert f"+    refuse options = {REFUSE}\n" in diff


def test_plan_remove_pullback_conf() -> None:
    plan = plan_remove_pullback_conf(BLOCK)
    assert (plan.new, plan.changed) == (None, True)
    assert plan.diff().startswith("--- a/etc/pullback/rsyncd.conf\n+++ /dev/null\n")
    assert not plan_remove_pullback_conf(None).changed


# --- migration: the old module leaves /etc/rsyncd.conf ----------------------------------

CRLF_OTHERS = b"# caf\xe9\r\npid file = /run/r.pid\r\n\r\n[pub]\r\n path = /srv\r\n"

MIGRATION_CASES = [
    # id, current /etc/rsyncd.conf, expected (None: remove the file), warned
    ("missing", None, None, False),
    ("empty-untouched", b"", b"", False),
    ("no-module-of-ours", GLOBALS_AND_PUB, GLOBALS_AND_PUB, False),
    ("unmarked-system-is-not-ours", SEED, SEED, False),
    ("only-ours", LEGACY, None, False),
    # The old writer appended a blank line and the block: both go.
    ("appended-after-others", GLOBALS_AND_PUB + b"\n" + LEGACY, GLOBALS_AND_PUB, False),
    ("appended-after-trailing-blank", b"uid = nobody\n\n" + LEGACY, b"uid = nobody\n", False),
    ("crlf-non-utf8", CRLF_OTHERS + b"\n" + LEGACY, CRLF_OTHERS, False),
    ("no-final-newline-after",
     b"uid = 0\n\n" + LEGACY + b"\n; the public area\n[pub]\n    path = /srv/pub",
     b"uid = 0\n\n\n; the public area\n[pub]\n    path = /srv/pub", False),
    ("in-the-middle",
     b"uid = nobody\n\n" + LEGACY + b"\n[pub]\n path = /srv\n",
     b"uid = nobody\n\n\n[pub]\n path = /srv\n", False),
    ("renamed-module", GLOBALS_AND_PUB + b"\n" + LEGACY.replace(b"[system]", b"[full]"),
     GLOBALS_AND_PUB, False),
    ("edited-by-hand",
     b"[pub]\n path = /srv\n\n# managed by pullback\n[system]\n    path = /\n"
     b"    read only = no\n# kept: a comment after the section\n",
     b"[pub]\n path = /srv\n\n# kept: a comment after the section\n", True),
    ("edited-by-hand-appended-line",
     GLOBALS_AND_PUB + b"\n" + LEGACY + b"    hosts allow = 10.0.0.1\n", GLOBALS_AND_PUB, True),
    ("two-old-modules",
     LEGACY + b"\n[pub]\n path = /srv\n\n" + LEGACY.replace(b"[system]", b"[old]"),
     b"\n[pub]\n path = /srv\n", False),
]


@pytest.mark.parametrize(
    ("current", "expected", "warned"),
    [case[1:] for case in MIGRATION_CASES],
    ids=[case[0] for case in MIGRATION_CASES],
)
def test_plan_legacy_removal(current: bytes | None, expected: bytes | None,
                             warned: bool) -> None:
    plan = plan_legacy_removal(current)
    assert plan.path == "/etc/rsyncd.conf"
    assert plan.new == expected
    assert plan.changed is (current != expected)
    assert bool(plan.warnings) is warned
    if expected is not None:
        assert b"managed by pullback" not in expected
        again = plan_legacy_removal(expected)
        assert (again.changed, again.warnings) == (False, ())


def test_legacy_removal_keeps_the_rest_byte_for_byte() -> None:
    others = CRLF_OTHERS + b"[www]\r\n path = /var/www\r\n"
    plan = plan_legacy_removal(others + b"\n" + LEGACY)
    assert hashlib.sha256(plan.new or b"").hexdigest() == hashlib.sha256(others).hexdigest()


def test_legacy_removal_diff() -> None:
    plan = plan_legacy_removal(b"uid = nobody\n\n" + LEGACY)
    assert plan.diff() == (
        "--- a/etc/rsyncd.conf\n+++ b/etc/rsyncd.conf\n@@ -1,13 +1 @@\n uid = nobody\n-\n"
        + "".join("-" + line for line in LEGACY.decode().splitlines(True)))
    assert plan_legacy_removal(LEGACY).diff().endswith("+++ /dev/null\n@@ -1,11 +0,0 @@\n"
                                                       + "".join(
        "-" + line for line in LEGACY.decode().splitlines(True)))


# --- parse_rsyncd_conf ------------------------------------------------------------------


def test_parse_rsyncd_conf() -> None:
    conf = parse_rsyncd_conf(
        b"; comment\nMax  Connections = 2\n\n[Backup]\n  ReadOnly = no\n  # x = y\n"
        b"  path = /a = b\n[global]\n  log file = /l\n[other]\n  path=/o\n"
    )
    assert [s.name for s in conf.sections] == [None, "Backup", "global", "other"]
    assert [s.name for s in conf.modules] == ["Backup", "other"]
    assert [s.name for s in conf.global_sections] == [None, "global"]
    first, backup, _, other = conf.sections
    assert first.get("max connections") == "2"
    assert [(p.name, p.value, p.line) for p in backup.params] == [
        ("ReadOnly", "no", 4),
        ("path", "/a = b", 6),
    ]
    assert backup.get("read only") == "no"
    assert (backup.start, backup.end) == (3, 7)
    assert conf.find_module("backup") == (backup,)
    assert conf.effective("other", "max connections") == "2"
    # A later [global] sets defaults for the modules created after it only (loadparm.c).
    assert conf.effective("other", "log file") == "/l"
    assert conf.effective("Backup", "log file") is None


def test_parse_rsyncd_conf_rejects_unclosed_header() -> None:
    with pytest.raises(ValueError, match="line 2: section header without"):
        parse_rsyncd_conf(b"uid = 0\n[system\n")


# --- check_module -----------------------------------------------------------------------

UID = "uid is not set: a root daemon drops to nobody and cannot read /"
GID = "gid is not set: a root daemon drops to nobody and cannot read /"
REF = ("refuse options lacks delete* remove-*: the key could ask the daemon to delete files "
       "(--remove-source-files, --delete)")


@pytest.mark.parametrize(
    ("conf", "problems"),
    [
        (BLOCK, []),
        (BLOCK.decode(), []),
        (
            SEED,
            [
                UID,
                GID,
                "max connections without a lock file: rsyncd falls back to /var/run/rsyncd.lock",
                REF,
            ],
        ),
        (b"[pub]\n path = /srv\n", ["no [system] module in rsyncd.conf"]),
        (
            b"[system]\n path = /srv\n uid = nobody\n gid = nogroup\n read only = no\n"
            b" list = yes\n max connections = 0\n",
            [
                "path is '/srv', not '/'",
                "uid is 'nobody', not 0: the daemon cannot read all of /",
                "gid is 'nogroup', not 0: the daemon cannot read all of /",
                "read only is 'no', should be yes",
                "list is 'yes', should be no",
                "max connections is not set: overlapping pulls can run at once",
                REF,
            ],
        ),
        (
            b"uid = root\ngid = 0\nlock file = /run/l\nmax connections = 1\nlist = no\n\n"
            b"[system]\n path = /\n refuse options = remove-* delete*\n",
            [],
        ),
        (
            b"[System]\n  path = /\n  uid = 0\n  gid = 0\n  list = off\n  Max Connections = 1\n"
            b"  lock file = /run/l\n  ReadOnly = False\n  write only = maybe\n",
            ["read only is 'False', should be yes", "write only is 'maybe', not a boolean", REF],
        ),
        (
            b"[system]\n uid = 0\n gid = 0\n list = no\n max connections = one\n",
            [
                "no path: rsyncd refuses a module without one",
                "max connections is 'one', not a number",
                REF,
            ],
        ),
        (
            BLOCK + b"[pub]\n path = /srv\n[system]\n read only = no\n",
            [
                "[system] is defined 2 times; rsyncd merges them",
                "read only is 'no', should be yes",
            ],
        ),
        (
            b"[system]\n path = /\n",
            [
                UID,
                GID,
                "list is not set (defaults to yes)",
                "max connections is not set: overlapping pulls can run at once",
                REF,
            ],
        ),
    ],
    ids=[
        "rendered",
        "rendered-str",
        "seed",
        "missing",
        "all-wrong",
        "globals-inherited",
        "spelling-variants",
        "no-path-bad-number",
        "duplicate-overrides",
        "bare",
    ],
)
def test_check_module(conf: bytes | str, problems: list[str]) -> None:
    assert check_module(conf, "system") == problems


def test_check_module_global_after_module_not_inherited() -> None:
    conf = b"[system]\n path = /\n list = no\n max connections = 1\n[global]\n uid = 0\n gid = 0\n"
    assert check_module(conf, "system") == [
        UID,
        GID,
        "max connections without a lock file: rsyncd falls back to /var/run/rsyncd.lock",
        REF,
    ]


def test_check_module_path_skipped() -> None:
    assert check_module(render_module(RsyncdSettings(path="/srv")), "system", path=None) == []
