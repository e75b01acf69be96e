"""roles.config.rsyncd: the module block, the rsyncd.conf plan and check_module."""

from __future__ import annotations

import pytest

from roles.config.rsyncd import (
    RsyncdSettings,
    check_module,
    parse_rsyncd_conf,
    plan_rsyncd_conf,
    render_module,
)

BLOCK = b"""\
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


def test_render_module_custom() -> None:
    settings = RsyncdSettings(
        module="backup_1", path="/srv/data", lock_file="/var/lock/pb.lock", comment="data"
    )
    assert render_module(settings) == (
        "# managed by pullback\n[backup_1]\n    path = /srv/data\n    comment = data\n"
        "    read only = yes\n    list = false\n    uid = 0\n    gid = 0\n"
        "    numeric ids = yes\n    max connections = 1\n    lock file = /var/lock/pb.lock\n"
    )


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
    ],
)
def test_settings_rejects(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RsyncdSettings(**{field: value})


# --- plan_rsyncd_conf -------------------------------------------------------------------

PLAN_CASES = [
    # id, current, expected new
    ("missing", None, BLOCK),
    ("empty", b"", BLOCK),
    ("blank-only", b"\n\n", BLOCK),
    ("seed", SEED, b"max connections = 1\n\n" + BLOCK),
    ("globals-and-other-module", GLOBALS_AND_PUB, GLOBALS_AND_PUB + b"\n" + BLOCK),
    ("globals-only-trailing-blank", b"uid = nobody\n\n", b"uid = nobody\n\n" + BLOCK),
    ("missing-final-newline", b"[pub]\n path = /srv", b"[pub]\n path = /srv\n\n" + BLOCK),
    (
        "stale-values-replaced-in-place",
        b"uid = nobody\n\n# managed by pullback\n[system]\n    path = /data\n"
        b"    read only = no\n    hosts allow = 10.0.0.1\n\n; the public area\n[pub]\n"
        b"    path = /srv/pub\n",
        b"uid = nobody\n\n" + BLOCK + b"\n; the public area\n[pub]\n    path = /srv/pub\n",
    ),
    (
        "case-and-spacing-of-name",
        b"[ System ]\n readonly=no\n",
        BLOCK,
    ),
    (
        "continuation-lines",
        b"[system]\n    path = \\\n        /\n    uid = 0\n# next\n[pub]\n path=/srv\n",
        BLOCK + b"# next\n[pub]\n path=/srv\n",
    ),
    (
        "duplicates-removed",
        b"[system]\n path = /\n\n[pub]\n path = /srv\n\n# managed by pullback\n[SYSTEM]\n"
        b" read only = no\n",
        BLOCK + b"\n[pub]\n path = /srv\n\n",
    ),
    (
        "crlf-and-non-utf8-kept",
        b"# caf\xe9\r\npid file = /run/r.pid\r\n\r\n[pub]\r\n path = /srv\r\n",
        b"# caf\xe9\r\npid file = /run/r.pid\r\n\r\n[pub]\r\n path = /srv\r\n\n" + BLOCK,
    ),
    ("already-current", b"uid = 0\n\n" + BLOCK, b"uid = 0\n\n" + BLOCK),
]


@pytest.mark.parametrize(
    ("current", "expected"),
    [case[1:] for case in PLAN_CASES],
    ids=[case[0] for case in PLAN_CASES],
)
def test_plan_rsyncd_conf(current: bytes | None, expected: bytes) -> None:
    plan = plan_rsyncd_conf(current, RsyncdSettings())
    assert plan.new == expected
    assert plan.old == current
    assert plan.changed is (current != expected)
    again = plan_rsyncd_conf(plan.new, RsyncdSettings())
    assert (again.new, again.changed) == (plan.new, False)
    assert check_module(plan.new, "system") == []


@pytest.mark.parametrize(
    ("current", "warnings"),
    [
        (SEED, ()),
        (
            b"[system]\n path = /\n[System]\n uid = nobody\n",
            (
                "[system] appeared 2 times; rsyncd merges sections of the same name, so the 1"
                " later one(s) are removed",
            ),
        ),
        (
            b"&include /etc/rsyncd.d\n",
            ("rsyncd.conf has '&include /etc/rsyncd.d': a [system] defined there is not checked",),
        ),
        (
            b"# managed by pullback\n[old]\n path = /\n",
            ("[old] is also managed by pullback: remove it if unused",),
        ),
    ],
    ids=["none", "duplicate", "include", "other-managed-module"],
)
def test_plan_warnings(current: bytes, warnings: tuple[str, ...]) -> None:
    assert plan_rsyncd_conf(current, RsyncdSettings()).warnings == warnings


def test_plan_custom_module_keeps_system() -> None:
    settings = RsyncdSettings(module="full", lock_file="/run/pb-full.lock")
    plan = plan_rsyncd_conf(SEED, settings)
    assert plan.new == SEED + b"\n" + render_module(settings).encode()


def test_diff() -> None:
    plan = plan_rsyncd_conf(b"[system]\n    path = /\n    list = false\n", RsyncdSettings())
    assert plan.diff() == (
        "--- a/etc/rsyncd.conf\n+++ b/etc/rsyncd.conf\n@@ -1,3 +1,11 @@\n"
        "+# managed by pullback\n [system]\n     path = /\n"
        "+    comment = pullback full-system backup (read-only)\n+    read only = yes\n"
        "     list = false\n+    uid = 0\n+    gid = 0\n+    numeric ids = yes\n"
        "+    max connections = 1\n+    lock file = /run/rsyncd-pullback.lock\n"
    )
    assert plan_rsyncd_conf(BLOCK, RsyncdSettings()).diff() == ""
    assert (
        plan_rsyncd_conf(None, RsyncdSettings())
        .diff()
        .startswith(
            "--- /dev/null\n+++ b/etc/rsyncd.conf\n@@ -0,0 +1,11 @@\n+# managed by pullback\n"
        )
    )


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
            ],
        ),
        (
            b"uid = root\ngid = 0\nlock file = /run/l\nmax connections = 1\nlist = no\n\n"
            b"[system]\n path = /\n",
            [],
        ),
        (
            b"[System]\n  path = /\n  uid = 0\n  gid = 0\n  list = off\n  Max Connections = 1\n"
            b"  lock file = /run/l\n  ReadOnly = False\n  write only = maybe\n",
            ["read only is 'False', should be yes", "write only is 'maybe', not a boolean"],
        ),
        (
            b"[system]\n uid = 0\n gid = 0\n list = no\n max connections = one\n",
            [
                "no path: rsyncd refuses a module without one",
                "max connections is 'one', not a number",
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
    ]


def test_check_module_path_skipped() -> None:
    assert check_module(render_module(RsyncdSettings(path="/srv")), "system", path=None) == []
