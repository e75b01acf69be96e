"""roles.config.rootkey: key parsing, option quoting, the authorized_keys plan.

Key material: real keys made once with ``ssh-keygen -t ... -N ''``; the fingerprints are
``ssh-keygen -l`` output for the same keys.
"""

from __future__ import annotations

import pytest

from roles.config.rootkey import (
    KeysPlan,
    PublicKey,
    build_options,
    find_key_line,
    fingerprint,
    forced_command_of,
    parse_options,
    parse_public_key,
    plan_authorized_keys,
    render_key_line,
    validate_key_line,
)

ED_BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIOjU+F2JOd0QARlf267qaP3SXDRhcS6OKWP3RfcIOxyH"
ED = f"ssh-ed25519 {ED_BLOB} ed25519@test"
ED_FP = "SHA256:K6d+/k2Zv1gUDb2qBr+5pfPg4HgqPF2O8inj0hXyPP4"
ECDSA_BLOB = (
    "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHoow/7z3pgt6jkmqKKvaX9EA/pkihQ"
    "ecOk0VVsEtfgdCPLsF3RXYCufm+oerkeyXxKZDyc29YfVqfWMrlBd9P4="
)
ECDSA = f"ecdsa-sha2-nistp256 {ECDSA_BLOB}"
ECDSA_FP = "SHA256:Yk63cpOficg4c+812TqeTJNPDx46QEV5UxH5plY/58I"
RSA_BLOB = (
    "AAAAB3NzaC1yc2EAAAADAQABAAAAgQCjZeIkOUJIcOVWK+GaLchwhlq6nONClZL8S5nWNgcg/gjchLNrp7NPadx"
    "5COa6QmvURFL3A0sEk4s7M8w6SLqB5QaBbbBaDJ4yFTcgU+EOkxHZpZvS+H4rE1gxK118Bic0HKRYJceLykiYPlOJ"
    "NLd8+lvAr7hc/kkBUEiKSXwLCQ=="
)
RSA = f"ssh-rsa {RSA_BLOB} rsa@test"
RSA_FP = "SHA256:r5TyTv7sHh0YiwtZ7CiGXT27Rq6pzqenhNuLGhSMpKY"
ADMIN_BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAICZ/IEIT0hJaNTMxNmcI7Wtzg8UynHcjO21FR2llK3EO"
ADMIN = f"ssh-ed25519 {ADMIN_BLOB} admin@laptop"
ADMIN_FP = "SHA256:3pRYCzx9QgV2FGcKl8JDRPy20ThSceYgZsQQPOF7bpw"
OPS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINZ7H1H/rswfWtSRW2D+rgvXetQbus/lEarnyfTTxmFn ops"
OPS_FP = "SHA256:ykn0Loa7o6kSbl5WRGpJYgw4ck/ljPswkBl477jii9Y"

KEY = parse_public_key(ED)
DAEMON = "rsync --server --daemon ."
NO = "no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty"
LINE = f'restrict,command="{DAEMON}",{NO} ssh-ed25519 {ED_BLOB} pullback-backup'
OLD_LINE = (
    'command="rsync --server --sender -vlogDtprxz --numeric-ids . /",'
    f"{NO} ssh-ed25519 {ED_BLOB} ed25519@test"
)


# --- parse_public_key / fingerprint -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "fp"),
    [
        (ED + "\n", PublicKey("ssh-ed25519", ED_BLOB, "ed25519@test"), ED_FP),
        (ECDSA, PublicKey("ecdsa-sha2-nistp256", ECDSA_BLOB, ""), ECDSA_FP),
        (RSA, PublicKey("ssh-rsa", RSA_BLOB, "rsa@test"), RSA_FP),
        (
            f"  ssh-ed25519\t{ED_BLOB}  two words  ",
            PublicKey("ssh-ed25519", ED_BLOB, "two words"),
            ED_FP,
        ),
    ],
    ids=["ed25519-pub-file", "ecdsa-no-comment", "rsa", "blanks"],
)
def test_parse_public_key(text: str, expected: PublicKey, fp: str) -> None:
    key = parse_public_key(text)
    assert key == expected
    assert fingerprint(key) == fp


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAJFs root@vm", "DSA keys are removed from current OpenSSH"),
        ("ssh-ed25519 AAAA!!!notbase64 x", "not valid base64"),
        (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOjU+F2JOd0QARlf267qaP3SXDRhcS6OKWP3RfcIOxy x",
            "not valid base64",
        ),
        (f"ssh-rsa {ED_BLOB} x", "key blob is for 'ssh-ed25519', not 'ssh-rsa'"),
        (f"ecdsa-sha2-nistp384 {ECDSA_BLOB}", "not 'ecdsa-sha2-nistp384'"),
        ("ssh-ed25519 AAA= x", "key blob is truncated"),
        (f"{ED}\n{ADMIN}", "single line"),
        (f"ssh-ed25519 {ED_BLOB}\rx", "single line"),
        (f'command="{DAEMON}" {ED}', "options in front of the key are not accepted"),
        (f"restrict {ED}", "options in front of the key are not accepted"),
        (f"ssh-ed25519-cert-v01@openssh.com {ED_BLOB}", "unsupported key type"),
        (f"ssh-foo {ED_BLOB}", "unknown key type 'ssh-foo'"),
        ("ssh-ed25519", "has no base64 blob"),
        ("  \n", "empty public key"),
    ],
    ids=[
        "dss",
        "bad-chars",
        "bad-padding",
        "type-mismatch",
        "curve-mismatch",
        "truncated",
        "two-lines",
        "cr",
        "command-option",
        "restrict-option",
        "certificate",
        "unknown-type",
        "no-blob",
        "empty",
    ],
)
def test_parse_public_key_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        parse_public_key(text)
    assert "\n" not in str(err.value)


# --- build_options / render_key_line --------------------------------------------------


@pytest.mark.parametrize(
    ("command", "restrict", "from_", "expected"),
    [
        (DAEMON, True, None, LINE),
        (DAEMON, False, None, f'command="{DAEMON}",{NO} ssh-ed25519 {ED_BLOB} pullback-backup'),
        (
            DAEMON,
            True,
            "192.0.2.10,2001:db8::/32,!*.example",
            f'restrict,command="{DAEMON}",from="192.0.2.10,2001:db8::/32,!*.example",{NO}'
            f" ssh-ed25519 {ED_BLOB} pullback-backup",
        ),
        (
            'rrsync -ro "/srv/a b"',
            True,
            None,
            f'restrict,command="rrsync -ro \\"/srv/a b\\"",{NO} ssh-ed25519 {ED_BLOB}'
            " pullback-backup",
        ),
        # sshd unescapes only \" : other backslashes are literal and stay single.
        (
            "printf 'a\\d' \\\"x",
            False,
            None,
            f'command="printf \'a\\d\' \\\\"x",{NO} ssh-ed25519 {ED_BLOB} pullback-backup',
        ),
    ],
    ids=["restrict", "no-restrict", "from", "quotes", "backslashes"],
)
def test_render_key_line(command: str, restrict: bool, from_: str | None, expected: str) -> None:
    line = render_key_line(KEY, build_options(command, restrict=restrict, from_=from_))
    assert line == expected
    assert validate_key_line(line, forced_command=command) == PublicKey(
        "ssh-ed25519", ED_BLOB, "pullback-backup"
    )


def test_render_key_line_custom_comment() -> None:
    line = render_key_line(KEY, build_options(DAEMON, restrict=True, from_=None), comment="pb@h1")
    assert line == LINE.replace("pullback-backup", "pb@h1")


@pytest.mark.parametrize(
    ("command", "from_", "message"),
    [
        ("rsync\n--daemon", None, "newline, CR or NUL"),
        ("rsync\r", None, "newline, CR or NUL"),
        ("rsync\0", None, "newline, CR or NUL"),
        ("  ", None, "forced command is empty"),
        ("echo \\", None, "cannot end with a backslash"),
        (DAEMON, "10.0.0.1 evil", "only letters, digits"),
        (DAEMON, '10.0.0.1"', "only letters, digits"),
        (DAEMON, "", "only letters, digits"),
    ],
    ids=[
        "newline",
        "cr",
        "nul",
        "empty",
        "trailing-backslash",
        "from-space",
        "from-quote",
        "from-empty",
    ],
)
def test_build_options_rejects(command: str, from_: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_options(command, restrict=True, from_=from_)


# --- parse_options / validate_key_line ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "options", "rest"),
    [
        (ED, [], ED),
        (f"  \t{ED}", [], ED),
        (
            f'command="a,b c",no-pty {ED}',
            ['command="a,b c"', "no-pty"],
            ED,
        ),
        (
            f'from="10.0.0.1,10.0.0.2",command="say \\"hi, there\\"",restrict\t {ED}',
            ['from="10.0.0.1,10.0.0.2"', 'command="say \\"hi, there\\""', "restrict"],
            ED,
        ),
        (f"no-pty {ED}", ["no-pty"], ED),
    ],
    ids=["no-options", "leading-blanks", "quoted-comma-and-space", "escaped-quotes", "flag"],
)
def test_parse_options(line: str, options: list[str], rest: str) -> None:
    assert parse_options(line) == (options, rest)


def test_parse_options_unbalanced_quote() -> None:
    with pytest.raises(ValueError, match="unbalanced double quote"):
        parse_options(f'command="rsync --daemon,no-pty {ED}')


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"no-pty {ED}", "no command= option"),
        (f'command="a",command="b" {ED}', "more than one command= option"),
        (f'command="a",permit-everything {ED}', "unknown key option"),
        (f"command=rsync {ED}", "must be double-quoted"),
        (f'command="a"b {ED}', "unexpected text after"),
        (f'command="{DAEMON}" ssh-dss AAAAB3NzaC1kc3MAAACB', "DSA keys are removed"),
        (f'command="{DAEMON}" ssh-ed25519 AAAA!! x', "not valid base64"),
        (f'command="x" {ED}', "forced command is 'x', expected"),
    ],
    ids=[
        "no-command",
        "two-commands",
        "unknown-option",
        "unquoted",
        "trailing-text",
        "dss",
        "bad-blob",
        "wrong-command",
    ],
)
def test_validate_key_line_rejects(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_key_line(line, forced_command=DAEMON)


# --- plan_authorized_keys ---------------------------------------------------------------

ADMIN_B = ADMIN.encode()
OPS_B = OPS.encode()
LINE_B = LINE.encode()
OLD_B = OLD_LINE.encode()
ED_B = ED.encode()

PLAN_CASES = [
    # id, current, expected new, replaced, unrestricted root keys
    ("missing-file", None, LINE_B + b"\n", 0, ()),
    ("empty-file", b"", LINE_B + b"\n", 0, ()),
    (
        "others-and-comments",
        b"# admin keys\n"
        + ADMIN_B
        + b"\n\n   \n"
        + b'command="/usr/local/bin/check" '
        + OPS_B
        + b"\n",
        b"# admin keys\n"
        + ADMIN_B
        + b"\n\n   \n"
        + b'command="/usr/local/bin/check" '
        + OPS_B
        + b"\n"
        + LINE_B
        + b"\n",
        0,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "old-options-in-place",
        ADMIN_B + b"\n" + OLD_B + b"\n# trailing comment\n",
        ADMIN_B + b"\n" + LINE_B + b"\n# trailing comment\n",
        1,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "duplicates-collapsed",
        OLD_B + b"\n" + ADMIN_B + b"\n" + LINE_B + b"\nno-pty " + ED_B + b"\n" + ED_B + b"\n",
        LINE_B + b"\n" + ADMIN_B + b"\n",
        4,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "crlf-append",
        b"# crlf\r\n" + ADMIN_B + b"\r\n",
        b"# crlf\r\n" + ADMIN_B + b"\r\n" + LINE_B + b"\r\n",
        0,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "crlf-replace",
        b"# crlf\r\n" + OLD_B + b"\r\n" + b'command="x" ' + OPS_B + b"\r\n",
        b"# crlf\r\n" + LINE_B + b"\r\n" + b'command="x" ' + OPS_B + b"\r\n",
        1,
        (),
    ),
    (
        "missing-final-newline",
        b"# admins\n" + ADMIN_B,
        b"# admins\n" + ADMIN_B + b"\n" + LINE_B + b"\n",
        0,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "managed-last-line-without-newline",
        ADMIN_B + b"\n" + OLD_B,
        ADMIN_B + b"\n" + LINE_B + b"\n",
        1,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "non-utf8-bytes-kept",
        b"# caf\xe9 \xff\xfe\n" + b'command="x" ' + ADMIN_B + b" \xe9t\xe9\n",
        b"# caf\xe9 \xff\xfe\n" + b'command="x" ' + ADMIN_B + b" \xe9t\xe9\n" + LINE_B + b"\n",
        0,
        (),
    ),
    (
        "commented-out-copy-is-not-ours",
        b"# " + LINE_B + b"\n",
        b"# " + LINE_B + b"\n" + LINE_B + b"\n",
        0,
        (),
    ),
    (
        "broken-quotes-with-our-blob",
        b'command="rsync --daemon ' + ED_B + b"\n" + ADMIN_B + b"\n",
        LINE_B + b"\n" + ADMIN_B + b"\n",
        1,
        (f"{ADMIN_FP} admin@laptop",),
    ),
    (
        "already-current",
        b'command="x" ' + ADMIN_B + b"\n" + LINE_B + b"\n",
        b'command="x" ' + ADMIN_B + b"\n" + LINE_B + b"\n",
        1,
        (),
    ),
]


@pytest.mark.parametrize(
    ("current", "expected", "replaced", "unrestricted"),
    [case[1:] for case in PLAN_CASES],
    ids=[case[0] for case in PLAN_CASES],
)
def test_plan_authorized_keys(
    current: bytes | None, expected: bytes, replaced: int, unrestricted: tuple[str, ...]
) -> None:
    plan = plan_authorized_keys(current, LINE, KEY)
    assert plan.new == expected
    assert plan.old == current
    assert plan.changed is (current != expected)
    assert plan.replaced == replaced
    assert plan.unrestricted_root_keys == unrestricted
    # Idempotence: planning on the result changes nothing.
    again = plan_authorized_keys(plan.new, LINE, KEY)
    assert (again.new, again.changed) == (plan.new, False)


def test_unrestricted_root_keys_listed() -> None:
    current = "\n".join(
        [
            ADMIN,
            f"restrict {OPS}",
            ECDSA,
            f'restrict,command="rsync --server --sender -e.LsfxC . /" {RSA}',
            f'COMMAND="uptime" {RSA}',
            OLD_LINE,
            "",
        ]
    ).encode()
    plan = plan_authorized_keys(current, LINE, KEY)
    assert plan.unrestricted_root_keys == (f"{ADMIN_FP} admin@laptop", f"{OPS_FP} ops", ECDSA_FP)


def test_plan_rejects_line_for_another_key() -> None:
    with pytest.raises(ValueError, match="one authorized_keys line for this key"):
        plan_authorized_keys(None, LINE, parse_public_key(ADMIN))


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (
            plan_authorized_keys(None, LINE, KEY),
            f"--- /dev/null\n+++ b/root/.ssh/authorized_keys\n@@ -0,0 +1 @@\n+{LINE}\n",
        ),
        (
            plan_authorized_keys(b"# x", LINE, KEY),
            "--- a/root/.ssh/authorized_keys\n+++ b/root/.ssh/authorized_keys\n@@ -1 +1,2 @@\n"
            f"-# x\n\\ No newline at end of file\n+# x\n+{LINE}\n",
        ),
        (plan_authorized_keys(LINE_B + b"\n", LINE, KEY), ""),
    ],
    ids=["new-file", "missing-newline", "unchanged"],
)
def test_diff(plan: KeysPlan, expected: str) -> None:
    assert plan.diff() == expected


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (None, b""),
        (b"", b""),
        (b"# admin\r\n" + ADMIN_B + b"\r\n" + LINE_B + b"\r\n", b"# admin\r\n" + ADMIN_B + b"\r\n"),
        (OLD_B + b"\n" + ADMIN_B + b"\n" + LINE_B, ADMIN_B + b"\n"),  # every copy goes
        (ADMIN_B + b"\n", ADMIN_B + b"\n"),  # not there: nothing changes
    ],
    ids=["missing-file", "empty-file", "crlf-others-kept", "duplicates", "absent"],
)
def test_plan_removes_the_managed_key(current: bytes | None, expected: bytes) -> None:
    plan = plan_authorized_keys(current, None, KEY)
    assert plan.new == expected
    assert plan.changed == (current is not None and expected != current)


# --- reading the key line back: one reading for setup-remote, doctor and verify ----------------


@pytest.mark.parametrize("content, command", [
    (LINE_B + b"\n", DAEMON),
    # the blob inside another key's comment is not that key's line; the next line is ours
    (ADMIN_B + b" was-" + ED_BLOB.encode() + b"\n" + LINE_B + b"\n", DAEMON),
    # sshd uses the first line carrying the key: the second command is never run
    (LINE_B + b"\n" + LINE_B.replace(b"--daemon", b"--sender") + b"\n", DAEMON),
    # a first line sshd cannot parse: nothing to report as the forced command
    (b'command="unbalanced ssh-ed25519 ' + ED_BLOB.encode() + b"\n" + LINE_B + b"\n", None),
    # a form feed is not a line break for sshd (it reads lines up to \n)
    (b"# note\x0c" + LINE_B + b"\n", None),
    (None, None),
])
def test_forced_command_of_reads_the_line_sshd_uses(content, command) -> None:
    assert forced_command_of(content, ED_BLOB) == command
    key = find_key_line(content, ED_BLOB)
    assert (key.command if key is not None and not key.problem else None) == command
